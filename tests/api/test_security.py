"""TLS, mutual TLS and per-tenant bearer tokens, against one real server (mTLS + tokens) and unit checks.

Certificates are made with the ``openssl`` command in a temporary folder: a test CA, a server certificate
for localhost/127.0.0.1 and a client certificate, plus a second CA that signed nothing the server trusts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.security import TokenTable, bearer_token, is_loopback, load_security
from inference.client import ReadingClient, channel_credentials
from inference.config import ServerConfig
from inference.phantoms import make_chest_ct, write_nifti
from inference.serverproc import ServerProcess, health_status

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING


def lung_model_repo(tmp: Path) -> Path:
    """A repository with only the bundled lung nodule model: less warm-up than every bundled model."""
    repo = tmp / "models"
    repo.mkdir()
    (repo / "lung_nodule_ct").symlink_to(ROOT / "models" / "lung_nodule_ct")
    return repo


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd: Path, ca: str, name: str, cn: str, extensions: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue_ca"):
        key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{ca}.key"]
        _openssl("req", "-x509", *key_args, "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=test {ca}", cwd=d)
    _issue(d, "ca", "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(d, "ca", "client", "archive", "extendedKeyUsage=clientAuth\n")
    _issue(d, "rogue_ca", "rogue_client", "intruder", "extendedKeyUsage=clientAuth\n")
    return d


TOKENS = {"archive": secrets.token_hex(16), "research": secrets.token_hex(16), "ops": secrets.token_hex(16)}


@pytest.fixture(scope="module")
def secure_server(pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("secure")
    tokens = d / "tokens.yaml"
    tokens.write_text(
        f"archive: {TOKENS['archive']}\nresearch:\n  token: {TOKENS['research']}\n  models: [chest_xray]\n"
        f"ops:\n  token: {TOKENS['ops']}\n  role: operator\n"
    )
    proc = ServerProcess(
        models=lung_model_repo(d),
        log_path=d / "server.log",
        extra_args=[
            "--tls-cert",
            str(pki / "server.pem"),
            "--tls-key",
            str(pki / "server.key"),
            "--tls-client-ca",
            str(pki / "ca.pem"),
            "--log-level",
            "DEBUG",
        ],
        env={"RADSERVE_AUTH_TOKENS": str(tokens)},  # the environment route for the tokens file
        channel_credentials=channel_credentials(pki / "ca.pem", pki / "client.pem", pki / "client.key"),
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def study():
    phantom = make_chest_ct(11, shape=(128, 128, 48), pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=1)
    volume = phantom.volume
    raw = pb.RawArray(dtype="float32", shape=volume.shape, affine=volume.affine.ravel().tolist())
    return phantom, volume.voxels.astype(np.float32).tobytes(), raw


def mtls_client(pki: Path, target: str, token: str | None) -> ReadingClient:
    return ReadingClient(target, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key", token=token)


def read_code(client: ReadingClient, study, **header) -> grpc.StatusCode:
    _, data, raw = study
    try:
        client.read([data], payload_kind=pb.RAW, raw=raw, timeout_s=120, **header)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        client.close()
    return grpc.StatusCode.OK


# -- transport -------------------------------------------------------------------------------------------


def test_mtls_with_the_ca_a_client_cert_and_a_token_reads(pki, secure_server, study):
    client = mtls_client(pki, secure_server.target, TOKENS["archive"])
    try:
        response = client.read([study[1]], payload_kind=pb.RAW, raw=study[2], timeout_s=120)
    finally:
        client.close()
    assert response.model == "lung_nodule_ct"


def test_tls_without_the_ca_fails(pki, secure_server):
    # The system's trusted roots do not know the test CA: the handshake fails.
    client = ReadingClient(secure_server.target, cert=pki / "client.pem", key=pki / "client.key", token="x")
    with pytest.raises(grpc.RpcError) as failed:
        client.list_models(timeout_s=10)
    client.close()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health_status(secure_server.target) is None  # plaintext does not get through either


@pytest.mark.parametrize("client_cert", [None, "rogue_client"])
def test_mtls_without_a_trusted_client_cert_fails(pki, secure_server, client_cert):
    cert = key = None
    if client_cert:
        cert, key = pki / f"{client_cert}.pem", pki / f"{client_cert}.key"
    credentials = channel_credentials(pki / "ca.pem", cert, key)
    assert health_status(secure_server.target, credentials=credentials) is None
    client = ReadingClient(secure_server.target, ca=pki / "ca.pem", cert=cert, key=key, token=TOKENS["archive"])
    with pytest.raises(grpc.RpcError) as failed:
        client.list_models(timeout_s=10)
    client.close()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_auth_needs_only_the_ca(pki):
    """Plain TLS (no --tls-client-ca), on an in-process server with the same credentials and only health."""
    security = load_security(ServerConfig(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")))
    assert security.credentials is not None and not security.mutual_tls
    server = grpc.server(ThreadPoolExecutor(2))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port("127.0.0.1:0", security.credentials)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        assert health_status(target, credentials=channel_credentials(pki / "ca.pem")) == SERVING
        assert health_status(target, credentials=grpc.ssl_channel_credentials()) is None  # no CA: fails
        assert health_status(target) is None  # plaintext: fails
    finally:
        server.stop(None)


# -- tokens ----------------------------------------------------------------------------------------------


def test_a_missing_token_is_unauthenticated(pki, secure_server, study):
    assert read_code(mtls_client(pki, secure_server.target, None), study) == grpc.StatusCode.UNAUTHENTICATED
    client = mtls_client(pki, secure_server.target, None)
    with pytest.raises(grpc.RpcError) as failed:
        client.list_models()
    client.close()
    assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in failed.value.details()


def test_a_wrong_token_is_unauthenticated(pki, secure_server, study):
    wrong = TOKENS["archive"][:-1] + ("0" if TOKENS["archive"][-1] != "0" else "1")
    client = mtls_client(pki, secure_server.target, wrong)
    assert read_code(client, study) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("model", ["lung_nodule_ct", ""])  # named, or chosen by the study's modality
def test_a_model_the_tenant_may_not_use_is_permission_denied(pki, secure_server, study, model):
    client = mtls_client(pki, secure_server.target, TOKENS["research"])
    assert read_code(client, study, model=model) == grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_need_no_token(pki, secure_server):
    credentials = channel_credentials(pki / "ca.pem", pki / "client.pem", pki / "client.key")
    assert health_status(secure_server.target, credentials=credentials) == SERVING
    with grpc.secure_channel(secure_server.target, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "radserve.v1.ReadingService" in names


def test_cli_read_and_models_with_ca_client_cert_and_token(pki, secure_server, study, tmp_path):
    phantom = study[0]
    nifti = write_nifti(phantom, tmp_path / "study.nii.gz")
    security = [
        "--server",
        secure_server.target,
        "--ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / "client.pem"),
        "--tls-key",
        str(pki / "client.key"),
    ]
    cli = [sys.executable, "-m", "inference.cli"]
    read = subprocess.run(
        [*cli, "read", str(nifti), *security, "--token", TOKENS["archive"], "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert read.returncode == 0, read.stderr
    assert '"model": "lung_nodule_ct"' in read.stdout
    denied = subprocess.run(
        [*cli, "models", "list", *security],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RADSERVE_TOKEN": "not-a-token"},
    )
    assert denied.returncode == 1 and "error: UNAUTHENTICATED: invalid token" in denied.stderr


# -- model management: an operator's act, confined to the model roots ---------------------------------------


def management_code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_only_an_operator_manages_models_and_only_under_the_model_roots(pki, secure_server, tmp_path):
    repo = Path(secure_server.args[secure_server.args.index("--models") + 1]).resolve()
    version = repo / "lung_nodule_ct" / "1"
    reader = mtls_client(pki, secure_server.target, TOKENS["archive"])
    operator = mtls_client(pki, secure_server.target, TOKENS["ops"])
    try:
        code, details = management_code(lambda: reader.load_model(version))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details == "tenant 'archive' is not an operator and may not manage models"
        code, _ = management_code(lambda: reader.unload_model("lung_nodule_ct"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        (tmp_path / "real").mkdir()
        outside = (tmp_path / "real", tmp_path / "missing", "/etc", "../../..", f"{repo}/../..", "/nonexistent/x")
        refusals = [management_code(lambda p=p: operator.load_model(p)) for p in outside]
        assert {code for code, _ in refusals} == {grpc.StatusCode.PERMISSION_DENIED}
        assert len({details for _, details in refusals}) == 1, "a refusal told what exists outside the roots"
        assert str(tmp_path) not in refusals[0][1] and "etc" not in refusals[0][1]
        loaded = operator.load_model(version)  # under the root: loads (here: the version already serving)
        assert [v.state for m in loaded.models for v in m.versions] == ["READY"]

        def sources(client):
            return {v.source for m in client.list_models().models for v in m.versions}

        assert sources(reader) == {""}, "ListModels showed a server path to a tenant"
        assert sources(operator) == {os.path.realpath(version)}
    finally:
        reader.close()
        operator.close()
    research = mtls_client(pki, secure_server.target, TOKENS["research"])
    try:  # a tenant with an allow-list sees its models only
        assert [m.name for m in research.list_models().models] == []
    finally:
        research.close()


def test_tokens_never_reach_the_log(secure_server):
    log = secure_server.log_path.read_text()
    assert "radserve.audit" in log
    for token in TOKENS.values():
        assert token not in log


# -- unit checks -----------------------------------------------------------------------------------------


@pytest.mark.server
def test_plaintext_on_a_non_loopback_host_needs_insecure(tmp_path):
    with pytest.raises(ValueError, match="--insecure"):
        load_security(ServerConfig(host="0.0.0.0"))
    assert load_security(ServerConfig(host="0.0.0.0", insecure=True)).credentials is None
    assert load_security(ServerConfig(host="127.0.0.1")).credentials is None
    result = subprocess.run(
        [sys.executable, "-m", "inference.cli", "serve", "--host", "0.0.0.0", "--port", "0", "--models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "refusing to serve plaintext" in result.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.1.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("radserve.example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_tokens_file_formats_and_errors(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text("archive: s3cret-a\nresearch:\n  token: s3cret-r\n  models: [chest_xray]\n")
    table = TokenTable.from_file(path)
    assert table.authenticate("s3cret-a").name == "archive"
    research = table.authenticate("s3cret-r")
    assert research.may_use("chest_xray") and not research.may_use("lung_nodule_ct")
    assert table.authenticate("s3cret") is None and table.authenticate("") is None
    assert "s3cret" not in repr(table.tenants)
    for text, message in [
        ("a: same-token\nb: same-token\n", "share a token"),
        ("a: {token: t1, models: lung}\n", "models must be a list"),
        ("a: {tokn: t1}\n", "tenant 'a' must map to a token"),
        ("a: ''\n", "non-empty"),
        ("a: [unclosed\n", "not valid YAML"),
        ("", "names no tenant"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as failed:
            TokenTable.from_file(path)
        assert "same-token" not in str(failed.value) and "t1" not in str(failed.value)


def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"tls_cert": "server.pem"}, "'server.pem'"),
        ({"tls_key": "server.key"}, "'server.key'"),
        ({"tls_client_ca": "ca.pem"}, "'ca.pem'"),
    ],
)
def test_tls_settings_go_together(kwargs, quoted):
    with pytest.raises(ValueError, match=quoted):
        ServerConfig(**kwargs)


def test_a_missing_certificate_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read the TLS key file .*nope\.key"):
        load_security(ServerConfig(tls_cert=str(tmp_path / "nope.pem"), tls_key=str(tmp_path / "nope.key")))
