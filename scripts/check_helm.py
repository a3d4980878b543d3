#!/usr/bin/env python3
"""Checks helm/keyward: lints it, renders it with several value sets, validates every
manifest against the Kubernetes schemas, and checks what the chart promises (required
existingSecret, probes, non-root, read-only root filesystem, no capabilities, native
and legacy sidecars, secrets only as environment from the Secret, the sidecar on the
pod's loopback, the data Service only with the data token, the admin Service off by
default, no second embedded replica). Exits non-zero on the first problem.

Needs the PyPI packages helm-python-sdk (Helm's SDK, no helm binary) and
kubernetes-validate; scripts/test.sh installs them.
"""
import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = "helm/keyward"
KUBE = "1.30.0"
BASE = {"existingSecret": "keyward-secrets"}
SECRETS = {
    "KEYWARD_ADMIN_TOKEN",
    "KEYWARD_DATA_TOKEN",
    "KEYWARD_ENCRYPTION_KEY",
    "KEYWARD_ENCRYPTION_KEYS_PREVIOUS",
    "KEYWARD_DATABASE_URL",
    "KEYWARD_REDIS_URL",
}


def fail(message):
    print(f"helm chart: {message}", file=sys.stderr)
    sys.exit(1)


def render(values):
    chart = helm.Chart.load(CHART)
    try:
        return {
            path: [d for d in yaml.safe_load_all(text) if d]
            for path, text in chart.render(values, name="rel", namespace="ns").items()
        }
    finally:
        chart.close()


def keyward_containers(doc):
    spec = doc["spec"]["template"]["spec"]
    found = [(c, "init") for c in spec.get("initContainers", []) if c["name"] == "keyward"]
    found += [(c, "main") for c in spec.get("containers", []) if c["name"] == "keyward"]
    return spec, found


def check_container(c, where, sidecar):
    sc = c["securityContext"]
    if not (sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]):
        fail(f"{where}: container security context is too loose: {sc}")
    if sc["capabilities"]["drop"] != ["ALL"]:
        fail(f"{where}: capabilities are not all dropped")
    probes = (c["livenessProbe"], c["readinessProbe"], c["startupProbe"])
    if sidecar:
        # The kubelet cannot reach the pod's loopback: the probes run inside the container.
        paths = [p.get("exec", {}).get("command", [None, None, None])[1:] for p in probes]
        if paths != [["probe", "/healthz"], ["probe", "/readyz"], ["probe", "/healthz"]]:
            fail(f"{where}: sidecar probes are not `keyward probe /healthz|/readyz`: {probes}")
    elif [p["httpGet"]["path"] for p in probes] != ["/healthz", "/readyz", "/healthz"]:
        fail(f"{where}: probes are not on /healthz and /readyz")
    secret_env = [e for e in c["env"] if "valueFrom" in e]
    if not secret_env or any(e["valueFrom"]["secretKeyRef"]["name"] != BASE["existingSecret"] for e in secret_env):
        fail(f"{where}: secrets are not read from existingSecret")
    if {e["name"] for e in secret_env} != SECRETS:
        fail(f"{where}: the secrets read from the Secret are {sorted(e['name'] for e in secret_env)}")
    if any("value" in e for e in c["env"] if e["name"] in SECRETS):
        fail(f"{where}: a secret is a plain value")
    if c.get("args") != ["serve"] or "command" in c:
        fail(f"{where}: arguments other than `serve`: {c.get('command')} {c.get('args')}")
    env = {e["name"]: e.get("value") for e in c["env"]}
    if sidecar and (env["KEYWARD_LISTEN"] != "127.0.0.1:8080" or env["KEYWARD_ADMIN_LISTEN"] != "127.0.0.1:8081"):
        fail(f"{where}: the sidecar does not listen on the pod's loopback: {env}")
    if not any(m["mountPath"] == "/data" for m in c["volumeMounts"]) or c["workingDir"] != "/data":
        fail(f"{where}: no writable /data working directory")
    return env


def refuses(values, message, name):
    try:
        render({**BASE, **values})
    except helm.HelmRenderError as e:
        if message not in str(e):
            fail(f"{name}: refused, but without saying `{message}`: {e}")
        return
    fail(f"{name}: rendered where it must refuse")


def main():
    report = helm.lint(CHART, BASE, strict=True)
    if report["errors"] or any(m["severity"] >= 2 for m in report["messages"]):
        fail(f"lint: {report}")

    try:
        render({})
        fail("rendered without existingSecret")
    except helm.HelmRenderError as e:
        if "existingSecret is required" not in str(e):
            fail(f"the missing-secret error does not say so: {e}")

    refuses({"standalone": {"enabled": True, "replicas": 2}}, "needs the distributed shape", "two embedded replicas")
    refuses({"serviceMonitor": {"enabled": True}}, "dataTokenInSecret", "service monitor without the data Service")

    cases = {
        "defaults": {},
        "data token": {"dataTokenInSecret": True},
        "admin service": {"adminService": {"enabled": True}},
        "service monitor": {"serviceMonitor": {"enabled": True}, "dataTokenInSecret": True},
        "distributed": {"distributed": True, "standalone": {"enabled": True, "replicas": 3}},
        "native sidecar": {"sidecarExample": {"enabled": True}},
        "legacy sidecar": {"sidecarExample": {"enabled": True}, "sidecar": {"native": False}},
        "sidecar only": {
            "standalone": {"enabled": False},
            "sidecarExample": {"enabled": True},
            "dataTokenInSecret": True,
            "adminService": {"enabled": True},
        },
    }
    checked = 0
    for name, extra in cases.items():
        values = {**BASE, **extra}
        docs = render(values)
        kinds = [d["kind"] for ds in docs.values() for d in ds]
        standalone = values.get("standalone", {}).get("enabled", True)
        services = {
            tuple(p["name"] for p in d["spec"]["ports"])
            for ds in docs.values()
            for d in ds
            if d["kind"] == "Service"
        }
        expected = set()
        if standalone and values.get("dataTokenInSecret"):
            expected.add(("data",))
        if standalone and values.get("adminService", {}).get("enabled"):
            expected.add(("admin",))
        if services != expected:
            fail(f"{name}: Services with ports {services}, expected {expected}")
        for path, ds in docs.items():
            for doc in ds:
                if doc["kind"] == "ServiceMonitor":
                    if doc["spec"]["endpoints"][0]["path"] != "/metrics":
                        fail(f"{name}: ServiceMonitor does not scrape /metrics")
                    continue
                try:
                    kubernetes_validate.validate(doc, KUBE, strict=True)
                except kubernetes_validate.ValidationError as e:
                    fail(f"{name}: {path} is not a valid {doc['kind']}: {e.message}")
                checked += 1
                if doc["kind"] != "Deployment":
                    continue
                spec, found = keyward_containers(doc)
                if len(found) != 1:
                    fail(f"{name}: {path} has {len(found)} keyward containers")
                container, place = found[0]
                sidecar = "sidecar-example" in path
                env = check_container(container, f"{name}: {path}", sidecar)
                if not sidecar:
                    admin_open = values.get("adminService", {}).get("enabled", False)
                    if env["KEYWARD_ADMIN_LISTEN"].startswith("0.0.0.0") != admin_open:
                        fail(f"{name}: the admin API listens on {env['KEYWARD_ADMIN_LISTEN']}")
                    if doc["spec"]["replicas"] > 1 and not values.get("distributed"):
                        fail(f"{name}: several embedded replicas")
                if not spec["securityContext"]["runAsNonRoot"]:
                    fail(f"{name}: pod may run as root")
                if "sidecar-example" in path:
                    native = extra.get("sidecar", {}).get("native", True)
                    if native and (place != "init" or container.get("restartPolicy") != "Always"):
                        fail(f"{name}: native sidecar is not an init container with restartPolicy Always")
                    if not native and (place != "main" or "restartPolicy" in container):
                        fail(f"{name}: legacy sidecar is not a plain container")
        expected = "ServiceMonitor" in kinds
        if expected != bool(extra.get("serviceMonitor", {}).get("enabled")):
            fail(f"{name}: ServiceMonitor rendered = {expected}")
    print(f"helm chart: lint clean, {len(cases)} value sets rendered, {checked} manifests valid for Kubernetes {KUBE}")


if __name__ == "__main__":
    main()
