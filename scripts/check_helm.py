#!/usr/bin/env python3
"""Checks helm/keyward: lints it, renders it with several value sets, validates every
manifest against the Kubernetes schemas, and checks what the chart promises (required
existingSecret, probes, non-root, read-only root filesystem, no capabilities, native
and legacy sidecars). Exits non-zero on the first problem.

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


def check_container(c, where):
    sc = c["securityContext"]
    if not (sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]):
        fail(f"{where}: container security context is too loose: {sc}")
    if sc["capabilities"]["drop"] != ["ALL"]:
        fail(f"{where}: capabilities are not all dropped")
    if c["livenessProbe"]["httpGet"]["path"] != "/healthz" or c["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail(f"{where}: probes are not on /healthz and /readyz")
    secret_env = [e for e in c["env"] if "valueFrom" in e]
    if not secret_env or any(e["valueFrom"]["secretKeyRef"]["name"] != BASE["existingSecret"] for e in secret_env):
        fail(f"{where}: secrets are not read from existingSecret")
    if not any(m["mountPath"] == "/data" for m in c["volumeMounts"]) or c["workingDir"] != "/data":
        fail(f"{where}: no writable /data working directory")


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

    cases = {
        "defaults": {},
        "service monitor": {"serviceMonitor": {"enabled": True}},
        "native sidecar": {"sidecarExample": {"enabled": True}},
        "legacy sidecar": {"sidecarExample": {"enabled": True}, "sidecar": {"native": False}},
        "sidecar only": {"standalone": {"enabled": False}, "sidecarExample": {"enabled": True}},
    }
    checked = 0
    for name, extra in cases.items():
        values = {**BASE, **extra}
        docs = render(values)
        kinds = [d["kind"] for ds in docs.values() for d in ds]
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
                check_container(container, f"{name}: {path}")
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
        if ("Service" in kinds) != values.get("standalone", {}).get("enabled", True):
            fail(f"{name}: the standalone Service does not follow standalone.enabled")
    print(f"helm chart: lint clean, {len(cases)} value sets rendered, {checked} manifests valid for Kubernetes {KUBE}")


if __name__ == "__main__":
    main()
