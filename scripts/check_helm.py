#!/usr/bin/env python3
"""Checks helm/keyward: lints it, renders it with several value sets, validates every
manifest against the Kubernetes schemas, and checks what the chart promises (required
existingSecret, probes and resources on every keyward container, non-root, read-only
root filesystem, no capabilities, native and legacy sidecars, secrets only as
environment from the Secret, the sidecar on the pod's loopback, the data Service only
with the data token, the admin Service off by default, no second embedded replica, a
termination grace longer than keyward's shutdown, the PodDisruptionBudget, the
NetworkPolicy, /data on an emptyDir or a PersistentVolumeClaim, and the sidecar example:
its files/ copies byte-identical to examples/, its ConfigMap equal to them but for the
documented replacements, and the rendered configuration accepted by `nginx -t` and
`envoy --mode validate`). With KEYWARD_BIN (a keyward binary; tests/helm.rs passes its
own), the sidecar example also runs end to end for each proxy: keyward as the rendered
container runs it, the proxy on the rendered ConfigMap, an LLM API stub as its upstream.
Exits non-zero on the first problem.

Needs the PyPI packages helm-python-sdk (Helm's SDK, no helm binary) and
kubernetes-validate, and nginx with its Lua module and envoy; scripts/test.sh installs
them.
"""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import helm_python as helm
import kubernetes_validate
import yaml

CHART = "helm/keyward"
KUBE = "1.30.0"
BASE = {"existingSecret": "keyward-secrets"}
IMAGE = "ghcr.io/keyward-dev/keyward"
# The chart's copies of the shipped proxy files (Helm reads only files inside the chart).
COPIES = {
    "helm/keyward/files/nginx/keyward.conf": "examples/nginx/keyward.conf",
    "helm/keyward/files/nginx/keyward.lua": "examples/nginx/keyward.lua",
    "helm/keyward/files/envoy/envoy.yaml": "examples/envoy/envoy.yaml",
}
# Debian's Lua module for the local `nginx -t` (the example's OpenResty has it built in).
NGINX_MODULES = [
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
]
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


def check_container(c, where, sidecar, data_port, admin_port, ready="/readyz"):
    sc = c["securityContext"]
    if not (sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]):
        fail(f"{where}: container security context is too loose: {sc}")
    if sc["capabilities"]["drop"] != ["ALL"]:
        fail(f"{where}: capabilities are not all dropped")
    probes = (c["livenessProbe"], c["readinessProbe"], c["startupProbe"])
    # In both shapes the probes run inside the container, over loopback: the kubelet
    # cannot reach a sidecar's loopback, and peers on the network cannot take a
    # standalone replica's loopback connections.
    paths = [p.get("exec", {}).get("command", [None, None, None])[1:] for p in probes]
    if paths != [["probe", "/healthz"], ["probe", ready], ["probe", "/healthz"]]:
        fail(f"{where}: probes are not `keyward probe /healthz|{ready}`: {probes}")
    secret_env = [e for e in c["env"] if "valueFrom" in e]
    if not secret_env or any(e["valueFrom"]["secretKeyRef"]["name"] != BASE["existingSecret"] for e in secret_env):
        fail(f"{where}: secrets are not read from existingSecret")
    if {e["name"] for e in secret_env} != SECRETS:
        fail(f"{where}: the secrets read from the Secret are {sorted(e['name'] for e in secret_env)}")
    if any("value" in e for e in c["env"] if e["name"] in SECRETS):
        fail(f"{where}: a secret is a plain value")
    res = c.get("resources", {})
    if not (res.get("requests", {}).keys() >= {"cpu", "memory"} and "memory" in res.get("limits", {})):
        fail(f"{where}: resources lack cpu/memory requests or a memory limit: {res}")
    chart = yaml.safe_load(open(f"{CHART}/Chart.yaml"))
    if c["image"] != f"{IMAGE}:{chart['appVersion']}":
        fail(f"{where}: image {c['image']}, expected {IMAGE}:{chart['appVersion']}")
    if c.get("args") != ["serve"] or "command" in c:
        fail(f"{where}: arguments other than `serve`: {c.get('command')} {c.get('args')}")
    env = {e["name"]: e.get("value") for e in c["env"]}
    if sidecar and (
        env["KEYWARD_LISTEN"] != f"127.0.0.1:{data_port}" or env["KEYWARD_ADMIN_LISTEN"] != f"127.0.0.1:{admin_port}"
    ):
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


def docs_of(docs, kind):
    return [d for ds in docs.values() for d in ds if d["kind"] == kind]


def shipped_with(proxy, port, upstream):
    """The ConfigMap data the sidecar example must hold: the shipped files, with only
    the documented addresses replaced (keyward's port when not 8080, the upstream when
    given), computed here independently of the chart's template."""
    def sub(text, old, new):
        if old not in text:
            fail(f"sidecar example: `{old}` is not in the shipped file")
        return text.replace(old, new)

    if proxy == "nginx":
        conf = open("examples/nginx/keyward.conf").read()
        if port != 8080:
            conf = sub(conf, "set $keyward_address 127.0.0.1:8080;", f"set $keyward_address 127.0.0.1:{port};")
        if upstream:
            conf = sub(conf, "server 127.0.0.1:9000;", f"server {upstream};")
        return {"keyward.conf": conf, "keyward.lua": open("examples/nginx/keyward.lua").read()}
    conf = open("examples/envoy/envoy.yaml").read()
    if port != 8080:
        conf = sub(conf, "uri: http://127.0.0.1:8080", f"uri: http://127.0.0.1:{port}")
        conf = sub(conf, "address: 127.0.0.1, port_value: 8080", f"address: 127.0.0.1, port_value: {port}")
    if upstream:
        host, up_port = upstream.split(":")
        conf = sub(conf, "address: 127.0.0.1, port_value: 9000", f"address: {host}, port_value: {up_port}")
        if not re.fullmatch(r"[0-9.]+", host):
            conf = sub(conf, "- name: llm_api\n    type: STATIC", "- name: llm_api\n    type: STRICT_DNS")
    return {"envoy.yaml": conf}


def proxy_accepts(name, proxy, data):
    """The rendered configuration as the proxy reads it: `nginx -t` (Debian's nginx with
    its Lua module loaded, the ConfigMap's paths pointed at a temporary directory) or
    `envoy --mode validate`."""
    with tempfile.TemporaryDirectory() as d:
        if proxy == "nginx":
            for key, text in data.items():
                text = text.replace("/tmp/", f"{d}/").replace("/etc/nginx/keyward/", f"{d}/")
                if key == "nginx.conf":
                    text = "".join(f"load_module {m};\n" for m in NGINX_MODULES) + text
                open(os.path.join(d, key), "w").write(text)
            cmd = ["nginx", "-t", "-q", "-e", "stderr", "-p", f"{d}/", "-c", f"{d}/nginx.conf"]
        else:
            open(os.path.join(d, "envoy.yaml"), "w").write(data["envoy.yaml"])
            cmd = ["envoy", "--mode", "validate", "-c", f"{d}/envoy.yaml", "--disable-hot-restart", "--log-level", "warn"]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            fail(f"{name}: {cmd[0]} is not installed (scripts/test.sh installs it)")
        if run.returncode != 0:
            fail(f"{name}: {' '.join(cmd[:3])} refuses the rendered configuration: {run.stdout}{run.stderr}")


def check_sidecar_example(name, values, docs):
    example = values.get("sidecarExample", {})
    proxy = example.get("proxy", "nginx")
    port = values.get("ports", {}).get("data", 8080)
    (cm,) = docs_of(docs, "ConfigMap")
    expected = shipped_with(proxy, port, example.get("upstream", ""))
    data = dict(cm["data"])
    if proxy == "nginx":
        main = data.pop("nginx.conf", "")
        if "include /etc/nginx/keyward/keyward.conf;" not in main:
            fail(f"{name}: the example's nginx.conf does not include the shipped site: {main}")
    if data != expected:
        diff = [k for k in expected if data.get(k) != expected[k]] or sorted(data)
        fail(f"{name}: the ConfigMap's {diff} differ from the shipped files (with the documented replacements)")
    proxy_accepts(name, proxy, cm["data"])
    (deploy,) = [d for d in docs_of(docs, "Deployment") if "sidecar-example" in d["metadata"]["name"]]
    spec = deploy["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "proxy"]
    wanted = {"nginx": "openresty/openresty:", "envoy": "envoyproxy/envoy:"}[proxy]
    if not container["image"].startswith(wanted):
        fail(f"{name}: the {proxy} example runs {container['image']}")
    mount = {"nginx": "/etc/nginx/keyward", "envoy": "/etc/envoy"}[proxy]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if volumes.get(mounts.get(mount), {}).get("configMap", {}).get("name") != cm["metadata"]["name"]:
        fail(f"{name}: the ConfigMap is not mounted at {mount}")
    if "/tmp" not in mounts or "resources" not in container or "readinessProbe" not in container:
        fail(f"{name}: the proxy container lacks /tmp, resources or a readiness probe")
    if not container["securityContext"]["readOnlyRootFilesystem"]:
        fail(f"{name}: the proxy's root filesystem is writable")
    (service,) = [s for s in docs_of(docs, "Service") if "sidecar-example" in s["metadata"]["name"]]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    if not service["spec"]["selector"].items() <= pod_labels.items() or service["spec"]["ports"] != [
        {"name": "http", "port": 8000, "targetPort": "http"}
    ]:
        fail(f"{name}: the example's Service does not reach the proxy's port 8000: {service['spec']}")
    if {"name": "http", "containerPort": 8000} not in container["ports"]:
        fail(f"{name}: the proxy does not expose its port 8000 as http: {container['ports']}")
    if proxy == "nginx" and container["command"][-1] != f"{mount}/nginx.conf":
        fail(f"{name}: nginx does not run the ConfigMap's nginx.conf: {container['command']}")
    if proxy == "envoy" and "/etc/envoy/envoy.yaml" not in container["command"]:
        fail(f"{name}: envoy does not run the ConfigMap's envoy.yaml: {container['command']}")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(what, ready, logs, seconds=15):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.1)
    said = "".join(f"\n{path}:\n{open(path).read()}" for path in logs if os.path.exists(path))
    fail(f"sidecar example, end to end: {what} did not come up{said}")


def http_call(method, url, headers=None, body=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Upstream(http.server.BaseHTTPRequestHandler):
    """An LLM API stub: a chat completion with its usage, and the headers it got."""

    seen = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Upstream.seen.append({k.lower(): v for k, v in self.headers.items()})
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        body = json.dumps({"object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": usage})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def run_example(proxy, keyward_bin):
    """The sidecar example as rendered, on this machine: keyward with the rendered
    container's environment and its /data as working directory, the proxy (Debian's
    nginx with its Lua module for OpenResty, or envoy) with the rendered command on the
    rendered ConfigMap. Ports are free ones: keyward's and the upstream's through the
    chart's own values, the proxy's listener replaced here (the file's port 8000)."""
    name = f"sidecar example with {proxy}, end to end"
    data_port, admin_port, up_port, port = free_port(), free_port(), free_port(), free_port()
    values = {
        **BASE,
        "standalone": {"enabled": False},
        "ports": {"data": data_port, "admin": admin_port},
        "sidecarExample": {"enabled": True, "proxy": proxy, "upstream": f"127.0.0.1:{up_port}"},
    }
    docs = render(values)
    (cm,) = docs_of(docs, "ConfigMap")
    (deploy,) = docs_of(docs, "Deployment")
    spec, ((container, _),) = keyward_containers(deploy)
    (proxy_container,) = [c for c in spec["containers"] if c["name"] == "proxy"]
    admin_token = "chart-check-admin-token-0123456789"
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", up_port), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    Upstream.seen = []
    children = []
    with tempfile.TemporaryDirectory() as d:
        try:
            # The workers of an nginx started as root run as nobody: they read the files.
            os.chmod(d, 0o755)
            workdir = d + container["workingDir"]  # the pod's /data
            os.mkdir(workdir)
            env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            env.update(PATH=os.environ["PATH"], KEYWARD_ADMIN_TOKEN=admin_token)
            children.append(
                subprocess.Popen(
                    [keyward_bin, *container["args"]],
                    cwd=workdir,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=open(f"{d}/keyward.log", "w"),
                )
            )
            mount = next(m["mountPath"] for m in proxy_container["volumeMounts"] if m["name"] == "proxy-config")
            listen = {"nginx": "listen 8000;", "envoy": "address: 0.0.0.0, port_value: 8000"}[proxy]
            local = {"nginx": f"listen 127.0.0.1:{port};", "envoy": f"address: 127.0.0.1, port_value: {port}"}[proxy]
            for key, text in cm["data"].items():
                if listen in text:
                    text = text.replace(listen, local)
                text = text.replace("/tmp/", f"{d}/").replace(f"{mount}/", f"{d}/")
                if key == "nginx.conf":
                    text = "".join(f"load_module {m};\n" for m in NGINX_MODULES) + text
                open(f"{d}/{key}", "w").write(text)
            command = [a.replace(f"{mount}/", f"{d}/") for a in proxy_container["command"]]
            if proxy == "nginx":
                command = ["nginx", "-p", f"{d}/"] + command[1:]
            logs = [f"{d}/keyward.log", f"{d}/proxy.log"]
            wait_until("keyward", lambda: http_call("GET", f"http://127.0.0.1:{data_port}/readyz")[0] == 200, logs)
            children.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(f"{d}/proxy.log", "w"))
            )
            wait_until(proxy, lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, logs)

            admin = {"authorization": f"Bearer {admin_token}"}
            status, body = http_call(
                "POST",
                f"http://127.0.0.1:{admin_port}/admin/keys",
                admin,
                json.dumps({"user_id": "chart", "allowed_models": ["gpt-4o"]}).encode(),
            )
            secret = json.loads(body)["secret"]
            status, body = http_call(
                "POST",
                f"http://127.0.0.1:{admin_port}/admin/providers/openai/keys",
                admin,
                json.dumps({"label": "chart", "value": "sk-upstream-chart"}).encode(),
            )
            if status >= 300:
                fail(f"{name}: the provider key was refused: {status} {body}")
            request = json.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": []}).encode()
            client = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
            status, body = http_call("POST", f"http://127.0.0.1:{port}/v1/chat/completions", client, request)
            if status != 200 or [s.get("authorization") for s in Upstream.seen] != ["Bearer sk-upstream-chart"]:
                fail(f"{name}: admitted {status} {body}, the upstream saw {Upstream.seen}: {open(f'{d}/proxy.log').read()}")
            wrong = {"authorization": "Bearer sk-kw-not-a-key", "content-type": "application/json"}
            status, body = http_call("POST", f"http://127.0.0.1:{port}/v1/chat/completions", wrong, request)
            if status != 401 or json.loads(body)["error"]["code"] != "INVALID_KEY" or len(Upstream.seen) != 1:
                fail(f"{name}: a wrong key got {status} {body}")

            # The tap's report reaches keyward, which reads the upstream's usage from it.
            def parsed():
                metrics = http_call("GET", f"http://127.0.0.1:{data_port}/metrics")[1].decode()
                return 'keyward_upstream_usage_total{outcome="parsed"} 1' in metrics

            wait_until("the report of the upstream's usage", parsed, logs, 10)
            # Without KEYWARD_DATABASE_URL the SQLite file and its key file land in the
            # working directory, the pod's writable /data.
            if not {"keyward.db", "keyward.db.key"} <= set(os.listdir(workdir)):
                fail(f"{name}: keyward's files are not in its working directory: {os.listdir(workdir)}")
        finally:
            for child in children:
                child.terminate()
                child.wait(10)
            upstream.shutdown()
            upstream.server_close()


def check_standalone(name, values, docs, deploy):
    """Replicas, strategy, spread, /data, the PodDisruptionBudget and the NetworkPolicy."""
    replicas = deploy["spec"]["replicas"]
    distributed = values.get("distributed", False)
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    strategy = deploy["spec"].get("strategy", {})
    if not distributed and strategy.get("type") != "Recreate":
        fail(f"{name}: the embedded shape is not replaced with Recreate (two writers of one SQLite file)")
    if not distributed and ("rollingUpdate" not in strategy or strategy["rollingUpdate"] is not None):
        # `helm upgrade` from a rolling release: only an explicit null clears the stored
        # RollingUpdate defaults, which Kubernetes refuses beside Recreate.
        fail(f"{name}: Recreate without `rollingUpdate: null`: {strategy}")
    if (replicas > 1) != bool(spec.get("topologySpreadConstraints")):
        fail(f"{name}: topology spread with {replicas} replicas: {spec.get('topologySpreadConstraints')}")
    (data,) = [v for v in spec["volumes"] if v["name"] == "keyward-data"]
    persistence = values.get("persistence", {})
    pvcs = docs_of(docs, "PersistentVolumeClaim")
    if persistence.get("enabled"):
        claim = persistence.get("existingClaim") or "rel-keyward-data"
        if data.get("persistentVolumeClaim", {}).get("claimName") != claim:
            fail(f"{name}: /data is not the claim {claim}: {data}")
        if bool(pvcs) == bool(persistence.get("existingClaim")):
            fail(f"{name}: PersistentVolumeClaims rendered: {pvcs}")
        for pvc in pvcs:
            if pvc["metadata"]["annotations"].get("helm.sh/resource-policy") != "keep":
                fail(f"{name}: the data claim is deleted on uninstall")
    elif "emptyDir" not in data or pvcs:
        fail(f"{name}: without persistence /data is not an emptyDir: {data} {pvcs}")

    pdbs = docs_of(docs, "PodDisruptionBudget")
    want_pdb = replicas > 1 and values.get("podDisruptionBudget", {}).get("enabled", True)
    if bool(pdbs) != want_pdb:
        fail(f"{name}: {len(pdbs)} PodDisruptionBudgets with {replicas} replicas")
    for pdb in pdbs:
        if pdb["spec"].get("maxUnavailable") != 1 or "minAvailable" in pdb["spec"]:
            fail(f"{name}: the PodDisruptionBudget is not maxUnavailable 1: {pdb['spec']}")
        if not pdb["spec"]["selector"]["matchLabels"].items() <= labels.items():
            fail(f"{name}: the PodDisruptionBudget does not select the pods")

    policies = docs_of(docs, "NetworkPolicy")
    policy_values = values.get("networkPolicy", {})
    if bool(policies) != bool(policy_values.get("enabled")):
        fail(f"{name}: {len(policies)} NetworkPolicies")
    for np in policies:
        spec = np["spec"]
        if not spec["podSelector"]["matchLabels"].items() <= labels.items() or spec["policyTypes"] != ["Ingress"]:
            fail(f"{name}: the NetworkPolicy does not govern the pods' ingress: {spec}")
        rules = {tuple(p["port"] for p in r["ports"]): r["from"] for r in spec["ingress"]}
        client = policy_values.get("clientLabels") or {"keyward-client": "true"}
        expected = {("data",): [{"podSelector": {"matchLabels": client}}] + policy_values.get("metricsFrom", [])}
        admin = policy_values.get("adminLabels")
        if admin and values.get("adminService", {}).get("enabled"):
            expected[("admin",)] = [{"podSelector": {"matchLabels": admin}}]
        if rules != expected:
            fail(f"{name}: the NetworkPolicy admits {rules}, expected {expected}")


def main():
    for copy, shipped in COPIES.items():
        if open(copy, "rb").read() != open(shipped, "rb").read():
            fail(f"{copy} differs from {shipped}: copy it again (cp {shipped} {copy})")

    report = helm.lint(CHART, BASE, strict=True)
    if report["errors"] or any(m["severity"] >= 2 for m in report["messages"]):
        fail(f"lint: {report}")

    try:
        render({})
        fail("rendered without existingSecret")
    except helm.HelmRenderError as e:
        if "existingSecret is required" not in str(e):
            fail(f"the missing-secret error does not say so: {e}")

    refuses({"standalone": {"enabled": True, "replicas": 2}}, "set distributed=true", "two embedded replicas")
    refuses({"serviceMonitor": {"enabled": True}}, "dataTokenInSecret", "service monitor without the data Service")
    refuses(
        {"distributed": True, "persistence": {"enabled": True}},
        "set persistence.enabled=false",
        "a volume for the distributed shape",
    )
    refuses({"terminationGracePeriodSeconds": 14}, "set it to at least 15", "a grace shorter than keyward's shutdown")
    refuses(
        {"config": {"KEYWARD_SHUTDOWN_GRACE_S": "40"}},
        "set it to at least 45",
        "a grace shorter than a longer shutdown",
    )
    refuses(
        {"sidecarExample": {"enabled": True}, "terminationGracePeriodSeconds": 5},
        "set it to at least 15",
        "the sidecar example's grace",
    )
    refuses({"sidecarExample": {"enabled": True, "proxy": "haproxy"}}, "nginx or envoy", "an unknown proxy")
    refuses(
        {"caCertificates": {"configMap": "a", "secret": "b"}},
        "set configMap or secret, not both",
        "CA certificates from two places",
    )
    # config cannot override what the chart sets itself, nor hold a secret in plain text.
    for name in ("KEYWARD_LISTEN", "KEYWARD_ADMIN_LISTEN"):
        for where, values in (
            ("standalone", {}),
            ("sidecar example", {"standalone": {"enabled": False}, "sidecarExample": {"enabled": True}}),
        ):
            refuses(
                {**values, "config": {name: "0.0.0.0:9999"}},
                f"config.{name}: the chart sets the listen addresses itself",
                f"{name} in config ({where})",
            )
    for name in sorted(SECRETS):
        refuses({"config": {name: "not-in-values-please"}}, f"config.{name} is a secret", f"{name} in config")
    refuses(
        {"sidecarExample": {"enabled": True, "upstream": "http://api:80"}},
        "it is host:port",
        "an upstream with a scheme",
    )

    cases = {
        "defaults": {},
        "data token": {"dataTokenInSecret": True},
        "admin service": {"adminService": {"enabled": True}},
        "service monitor": {"serviceMonitor": {"enabled": True}, "dataTokenInSecret": True},
        "distributed": {"distributed": True, "standalone": {"enabled": True, "replicas": 3}},
        "distributed without budget": {
            "distributed": True,
            "standalone": {"enabled": True, "replicas": 2},
            "podDisruptionBudget": {"enabled": False},
        },
        "distributed, one replica": {"distributed": True},
        "distributed, allow while Redis fails, sidecar": {
            "distributed": True,
            "config": {"KEYWARD_ON_BACKEND_ERROR": "allow"},
            "sidecarExample": {"enabled": True},
        },
        "local while Redis fails": {"distributed": True, "config": {"KEYWARD_ON_BACKEND_ERROR": "local"}},
        "persistence": {"persistence": {"enabled": True, "storageClass": "fast"}},
        "own claim": {"persistence": {"enabled": True, "existingClaim": "keyward-data"}},
        "network policy": {"networkPolicy": {"enabled": True}},
        "network policy, admin and metrics": {
            "adminService": {"enabled": True},
            "networkPolicy": {
                "enabled": True,
                "clientLabels": {"team": "gateway"},
                "adminLabels": {"keyward-admin": "true"},
                "metricsFrom": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                    }
                ],
            },
        },
        "CA certificates from a ConfigMap": {"caCertificates": {"configMap": "keyward-ca"}},
        "CA certificates from a Secret, persistence, sidecar": {
            "caCertificates": {"secret": "keyward-ca"},
            "persistence": {"enabled": True},
            "sidecarExample": {"enabled": True},
        },
        "native sidecar": {"sidecarExample": {"enabled": True}},
        "legacy sidecar": {"sidecarExample": {"enabled": True}, "sidecar": {"native": False}},
        "envoy sidecar": {"sidecarExample": {"enabled": True, "proxy": "envoy"}},
        "nginx sidecar, upstream": {"sidecarExample": {"enabled": True, "upstream": "localhost:9001"}},
        "envoy sidecar, upstream by name": {
            "sidecarExample": {"enabled": True, "proxy": "envoy", "upstream": "vllm.llm.svc.cluster.local:8000"},
        },
        "envoy sidecar, upstream by address, another port": {
            "sidecarExample": {"enabled": True, "proxy": "envoy", "upstream": "10.0.0.7:8000"},
            "ports": {"data": 18080, "admin": 18081},
        },
        "nginx sidecar, another port": {
            "sidecarExample": {"enabled": True},
            "ports": {"data": 18080, "admin": 18081},
        },
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
        if values.get("sidecarExample", {}).get("enabled"):
            # The example's proxy, never keyward's loopback ports.
            expected.add(("http",))
        if services != expected:
            fail(f"{name}: Services with ports {services}, expected {expected}")
        example = values.get("sidecarExample", {}).get("enabled", False)
        if example != ("ConfigMap" in kinds):
            fail(f"{name}: the sidecar example's ConfigMap rendered = {not example}")
        if example:
            check_sidecar_example(name, values, docs)
        data_port = values.get("ports", {}).get("data", 8080)
        admin_port = values.get("ports", {}).get("admin", 8081)
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
                # Readiness follows the failure policy: only `deny` leaves the Service.
                policy = values.get("config", {}).get("KEYWARD_ON_BACKEND_ERROR", "deny")
                ready = "/readyz" if policy == "deny" else "/healthz"
                env = check_container(container, f"{name}: {path}", sidecar, data_port, admin_port, ready)
                # caCertificates: its ConfigMap or Secret read-only at /etc/keyward/ca.
                ca = values.get("caCertificates", {})
                mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
                volumes = {v["name"]: v for v in spec["volumes"]}
                if bool(ca.get("configMap") or ca.get("secret")) != ("keyward-ca" in mounts):
                    fail(f"{name}: {path}: the CA volume is mounted = {'keyward-ca' in mounts}")
                if "keyward-ca" in mounts:
                    mount, volume = mounts["keyward-ca"], volumes.get("keyward-ca", {})
                    if mount["mountPath"] != "/etc/keyward/ca" or not mount.get("readOnly"):
                        fail(f"{name}: {path}: the CA volume is mounted as {mount}")
                    source = volume.get("configMap", {}).get("name") or volume.get("secret", {}).get("secretName")
                    if source != (ca.get("configMap") or ca.get("secret")):
                        fail(f"{name}: {path}: the CA volume is {volume}")
                grace = int(values.get("config", {}).get("KEYWARD_SHUTDOWN_GRACE_S", 10))
                if spec["terminationGracePeriodSeconds"] < grace + 5:
                    fail(f"{name}: terminationGracePeriodSeconds is shorter than keyward's shutdown")
                if not sidecar:
                    admin_open = values.get("adminService", {}).get("enabled", False)
                    if env["KEYWARD_ADMIN_LISTEN"].startswith("0.0.0.0") != admin_open:
                        fail(f"{name}: the admin API listens on {env['KEYWARD_ADMIN_LISTEN']}")
                    if doc["spec"]["replicas"] > 1 and not values.get("distributed"):
                        fail(f"{name}: several embedded replicas")
                    check_standalone(name, values, docs, doc)
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
    keyward_bin = os.environ.get("KEYWARD_BIN")
    if keyward_bin:
        for proxy in ("nginx", "envoy"):
            run_example(proxy, keyward_bin)
        print("helm chart: the sidecar example ran end to end with nginx and with envoy")


if __name__ == "__main__":
    main()
