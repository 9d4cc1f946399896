"""Properties of the rendered Kubernetes manifests (every overlay in deploy/k8s/overlays), checked offline.

Run by tools/check_deploy.sh (pytest). Renders with tools/deploy/render.py (the real kustomize, via pykustomize).
"""

import asyncio
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "deploy"))
import render  # noqa: E402

STAGES = {  # component -> (gRPC port, health service name)
    "text-encoder": (50051, "qwen_image.v1.TextEncoder"),
    "denoiser": (50052, "qwen_image.v1.Denoiser"),
    "vae": (50053, "qwen_image.v1.Vae"),
    "pose-detector": (50054, "qwen_image.v1.PoseDetector"),
}
CPU_ONLY_STAGES = ["pose-detector"]  # a small network; built without CUDA in the CUDA image
GATEWAY = ("gateway", 50050, "qwen_image.v1.ImageGenerator")
SERVICES = [*STAGES, GATEWAY[0]]
GPU_STAGES = ["text-encoder", "denoiser"]  # the issue: GPU for the denoiser, and the text encoder on GPU
METRICS_PORT = 9100
OTLP_PORT = 4317
COMPONENT = "app.kubernetes.io/component"


def metric_names() -> set[str]:
    src = (ROOT / "crates/common/src/metric_names.rs").read_text()
    return set(re.findall(r'pub const [A-Z_]+: &str = "(qwen_image_[a-z_]+)"', src))


@pytest.fixture(scope="module", params=[p.name for p in render.overlays()])
def overlay(request):
    text = asyncio.run(render.render(render.OVERLAYS / request.param))
    docs = [d for d in yaml.safe_load_all(text) if d]
    return request.param, docs


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind, name):
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def deployment(docs, component):
    return named(docs, "Deployment", f"qwen-image-{component}")


def container(dep):
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def pod_labels(dep):
    return dep["spec"]["template"]["metadata"]["labels"]


def selects(selector, labels) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND matchExpressions)."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def env_of(dep, docs) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps (which must exist in the render), then env."""
    c = container(dep)
    env = {}
    for src in c.get("envFrom", []):
        cm = named(docs, "ConfigMap", src["configMapRef"]["name"])
        env.update(cm["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def container_port(c, port):
    """A probe's port (number or name) as the number the container declares."""
    for p in c.get("ports", []):
        if port in (p["containerPort"], p.get("name")):
            return p["containerPort"]
    pytest.fail(f"container {c['name']} probes port {port}, which it does not declare")


def listen_port(c) -> int:
    args = c["args"]
    return int(args[args.index("--listen") + 1].rsplit(":", 1)[1])


def health_listen_port(c):
    for a in c["args"]:
        if a.startswith("--health-listen="):
            return int(a.rsplit(":", 1)[1])
    return None


def tls_enabled(c) -> bool:
    return any(a.startswith("--tls-cert=") for a in c["args"])


def test_stage_probes_are_native_grpc_health_checks(overlay):
    _, docs = overlay
    for comp, (port, service) in STAGES.items():
        c = container(deployment(docs, comp))
        assert listen_port(c) == port
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in c[kind], f"{comp} {kind} is not a gRPC probe: {c[kind]}"
        probe_port = container_port(c, c["readinessProbe"]["grpc"]["port"])
        # Readiness follows the stage's own service status; startup waits for the model (minutes).
        assert c["readinessProbe"]["grpc"]["service"] == service
        assert c["startupProbe"]["grpc"]["service"] == ""
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, f"{comp}: startup too short"
        for kind in ("startupProbe", "livenessProbe"):
            assert container_port(c, c[kind]["grpc"]["port"]) == probe_port
        if tls_enabled(c):
            # kubelet's gRPC probe speaks no TLS: probes must hit the plaintext health port.
            assert probe_port == health_listen_port(c) != port, f"{comp}: TLS port probed"
        else:
            assert probe_port == port


def test_gateway_readiness_is_grpc_and_liveness_does_not_follow_the_stages(overlay):
    _, docs = overlay
    comp, port, service = GATEWAY
    c = container(deployment(docs, comp))
    assert listen_port(c) == port
    ready = c["readinessProbe"]["grpc"]
    assert ready["service"] == service
    probe_port = container_port(c, ready["port"])
    assert probe_port == (health_listen_port(c) if tls_enabled(c) else port)
    # Its health status follows the stages; a restart would not help, so liveness must not use it.
    live = c["livenessProbe"]
    assert "grpc" not in live and live["tcpSocket"]["port"] == port


def test_containers_run_non_root_read_only_without_privileges(overlay):
    _, docs = overlay
    for dep in of_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", dep["metadata"]["name"]
        assert pod.get("automountServiceAccountToken") is False
        named(docs, "ServiceAccount", pod["serviceAccountName"])
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            where = f"{dep['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser", 0)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where}: requests"
            assert "memory" in res.get("limits", {}), f"{where}: memory limit"


def test_services_have_a_writable_tmp_and_drain_within_the_grace_period(overlay):
    _, docs = overlay
    for comp in SERVICES:
        dep = deployment(docs, comp)
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, f"{comp}: no /tmp mount"
        (vol,) = [v for v in pod["volumes"] if v["name"] == tmp[0]["name"]]
        assert "emptyDir" in vol
        pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 5 <= pause and pod["terminationGracePeriodSeconds"] >= pause + 60, comp
    # The gateway's streams last up to its request timeout: its grace period covers one whole request.
    gw = deployment(docs, "gateway")
    timeout = int(env_of(gw, docs)["QWEN_IMAGE_REQUEST_TIMEOUT_SECS"])
    assert gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= timeout


def test_every_stage_has_a_headless_service_a_pdb_and_an_hpa_on_a_real_metric(overlay):
    _, docs = overlay
    known = metric_names()
    for comp in SERVICES:
        dep = deployment(docs, comp)
        labels = pod_labels(dep)
        assert "replicas" not in dep["spec"], f"{comp}: replicas belong to the HPA"
        svc = named(docs, "Service", f"qwen-image-{comp}")
        assert selects({"matchLabels": svc["spec"]["selector"]}, labels)
        if comp in STAGES:
            assert svc["spec"].get("clusterIP") == "None", f"{comp}: Service is not headless"
        pdbs = [p for p in of_kind(docs, "PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
        assert len(pdbs) == 1, f"{comp}: {len(pdbs)} PodDisruptionBudgets"
        hpas = [h for h in of_kind(docs, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                   "name": dep["metadata"]["name"]}]
        assert len(hpas) == 1, f"{comp}: {len(hpas)} HPAs"
        hpa = hpas[0]["spec"]
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        for m in hpa["metrics"]:
            assert m["type"] == "Pods", f"{comp}: HPA metric {m}"
            assert m["pods"]["metric"]["name"] in known, f"{comp}: no such metric {m['pods']['metric']}"


def test_gpu_overlays_put_the_denoiser_and_text_encoder_on_a_gpu_and_cpu_has_none(overlay):
    name, docs = overlay
    gpu = name.startswith("gpu")
    for comp in STAGES:
        dep = deployment(docs, comp)
        c = container(dep)
        limits = c["resources"]["limits"]
        device = env_of(dep, docs)["QWEN_IMAGE_DEVICE"]
        if gpu and comp in GPU_STAGES:
            assert int(limits.get("nvidia.com/gpu", 0)) == 1, f"{name}: {comp} has no GPU"
        if gpu and "nvidia.com/gpu" in limits:
            assert device == "cuda:0", f"{name}: {comp} runs on {device}"
            assert c["image"].endswith(":cuda"), c["image"]
            pod = dep["spec"]["template"]["spec"]
            assert pod["nodeSelector"], f"{name}: {comp} may land on a node without a GPU"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        if not gpu or comp in CPU_ONLY_STAGES:
            assert "nvidia.com/gpu" not in limits and device == "cpu", f"{name}: {comp}"
    # The gateway loads no model: the CPU image, no GPU, on any node.
    gw = container(deployment(docs, "gateway"))
    assert gw["image"].endswith(":cpu") and "nvidia.com/gpu" not in gw["resources"].get("limits", {})


def allowed_peers(docs, labels, direction):
    """(peer, ports) pairs that NetworkPolicies allow for pods with `labels` in `direction`."""
    key = "ingress" if direction == "Ingress" else "egress"
    side = "from" if direction == "Ingress" else "to"
    out = []
    for np in of_kind(docs, "NetworkPolicy"):
        spec = np["spec"]
        if direction not in spec["policyTypes"] or not selects(spec["podSelector"], labels):
            continue
        for rule in spec.get(key, []):
            for peer in rule.get(side, [None]):
                out.append((peer, rule.get("ports")))
    return out


def port_numbers(c, ports):
    return {container_port(c, p["port"]) for p in ports}


def test_network_policies_deny_by_default_and_allow_only_the_pipeline(overlay):
    _, docs = overlay
    policies = of_kind(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies)
    gw_labels = pod_labels(deployment(docs, "gateway"))
    collector = named(docs, "Deployment", "qwen-image-otel-collector")
    collector_labels = pod_labels(collector)
    for comp, (port, _) in STAGES.items():
        dep = deployment(docs, comp)
        c = container(dep)
        ingress = allowed_peers(docs, pod_labels(dep), "Ingress")
        assert ingress, f"no NetworkPolicy selects the {comp} pods"
        grpc_from = [peer for peer, ports in ingress if ports is None or port in port_numbers(c, ports)]
        assert grpc_from, f"nobody may reach {comp}"
        for peer in grpc_from:
            # Only gateway pods of this namespace (no namespaceSelector, no ipBlock, not "anyone").
            assert peer is not None and set(peer) == {"podSelector"}, f"{comp} gRPC open to {peer}"
            assert selects(peer["podSelector"], gw_labels), f"{comp}: peer {peer} is not the gateway"
        # The gateway may reach this stage's port.
        gw_egress = allowed_peers(docs, gw_labels, "Egress")
        assert any(peer and selects(peer.get("podSelector"), pod_labels(dep))
                   and (ports is None or port in {p["port"] for p in ports}) for peer, ports in gw_egress)
    for comp in SERVICES:
        labels = pod_labels(deployment(docs, comp))
        egress = allowed_peers(docs, labels, "Egress")
        for peer, ports in egress:
            assert peer is not None and "ipBlock" not in peer, f"{comp} may reach anything: {peer}"
            numbers = {p["port"] for p in ports or []}
            if selects(peer.get("podSelector"), collector_labels):
                assert numbers == {OTLP_PORT}
        assert any(selects(peer.get("podSelector"), collector_labels) for peer, _ in egress), comp
    # Nothing but the five services sends OTLP to the collector.
    for peer, ports in allowed_peers(docs, collector_labels, "Ingress"):
        assert peer is not None and "podSelector" in peer and "namespaceSelector" not in peer
        for comp in SERVICES:
            assert selects(peer["podSelector"], pod_labels(deployment(docs, comp)))


def test_gateway_reaches_the_stages_through_their_headless_services(overlay):
    _, docs = overlay
    env = env_of(deployment(docs, "gateway"), docs)
    for comp, (port, _) in STAGES.items():
        var = "QWEN_IMAGE_" + comp.upper().replace("-", "_")
        url = env[var]
        m = re.fullmatch(r"(https?)://([a-z0-9.-]+):(\d+)", url)
        assert m, f"{var}={url}"
        host = m.group(2).split(".")[0]
        assert int(m.group(3)) == port
        assert named(docs, "Service", host)["spec"]["clusterIP"] == "None"


def test_tls_certificates_match_the_names_and_mounts_the_services_use(overlay):
    name, docs = overlay
    certs = of_kind(docs, "Certificate")
    gw = deployment(docs, "gateway")
    gw_env = env_of(gw, docs)
    if not tls_enabled(container(gw)):
        assert not certs
        return
    issuers = {i["metadata"]["name"] for i in of_kind(docs, "Issuer")}
    by_secret = {}
    for cert in certs:
        assert cert["spec"]["issuerRef"]["name"] in issuers
        by_secret[cert["spec"]["secretName"]] = cert["spec"]
    for comp in SERVICES:
        dep = deployment(docs, comp)
        c = container(dep)
        assert tls_enabled(c), f"{name}: {comp} serves plaintext"
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        for arg in c["args"]:
            if arg.startswith("--tls-") or arg.startswith("--stage-"):
                path = Path(arg.split("=", 1)[1])
                vol = mounts[str(path.parent)]
                cert = by_secret[vol["secret"]["secretName"]]
                if arg.startswith("--tls-cert="):
                    host = f"qwen-image-{comp}"
                    assert host in cert["dnsNames"] and "server auth" in cert["usages"]
                if arg.startswith("--stage-client-cert="):
                    assert "client auth" in cert["usages"]
        if comp in STAGES:
            assert any(a.startswith("--tls-client-ca=") for a in c["args"]), f"{comp}: no mutual TLS"
            url = gw_env["QWEN_IMAGE_" + comp.upper().replace("-", "_")]
            assert url.startswith("https://")


def test_api_keys_file_is_a_mounted_secret_where_tls_is_on(overlay):
    """The secured overlay also requires API keys, read from a Secret mounted read-only (not baked in)."""
    name, docs = overlay
    dep = deployment(docs, "gateway")
    c = container(dep)
    keys = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--api-keys-file=")]
    if not tls_enabled(c):
        assert not keys, f"{name}: API keys sent over plaintext"
        return
    assert len(keys) == 1, f"{name}: the TLS overlay's gateway takes no --api-keys-file"
    path = Path(keys[0])
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["secret"]["secretName"] == "qwen-image-api-keys"
    assert not of_kind(docs, "Secret"), f"{name}: a Secret rendered from the repository"


def test_hpa_metrics_are_served_by_the_adapter_and_scraped(overlay):
    """Every HPA metric has a Prometheus Adapter rule; each service's metrics port is the one Prometheus scrapes
    (annotation, containerPort, QWEN_IMAGE_METRICS_LISTEN) and the NetworkPolicies let Prometheus in."""
    _, docs = overlay
    values = yaml.safe_load((ROOT / "deploy/k8s/monitoring/prometheus-adapter-values.yaml").read_text())
    served = {re.match(r"'?([a-z_]+)\{", r["seriesQuery"]).group(1) for r in values["rules"]["custom"]}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        for m in hpa["spec"]["metrics"]:
            assert m["pods"]["metric"]["name"] in served, f"no adapter rule for {m['pods']['metric']['name']}"
    for comp in SERVICES:
        dep = deployment(docs, comp)
        c = container(dep)
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == METRICS_PORT == container_port(c, "metrics")
        assert env_of(dep, docs)["QWEN_IMAGE_METRICS_LISTEN"].endswith(f":{METRICS_PORT}")
        monitoring = {"kubernetes.io/metadata.name": "monitoring"}
        assert any(peer and selects(peer.get("namespaceSelector"), monitoring)
                   and METRICS_PORT in port_numbers(c, ports or [])
                   for peer, ports in allowed_peers(docs, pod_labels(dep), "Ingress")), comp
