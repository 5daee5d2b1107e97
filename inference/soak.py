"""`radserve soak`: a bounded load test of a loopback server that must lose no read and leak no memory.

N client threads send reads until ``duration_s`` or ``max_reads`` (:data:`MIX` gives the shares): valid studies
of every modality the server reads (small chest CT phantoms with planted nodules as raw arrays and as a DICOM
series, the same series shuffled and declaring ``expected_instances`` (a progressive read), brain MR and chest X-ray
phantoms as DICOM), malformed ones each with its expected status (not DICOM and a
raw array of the wrong size -> INVALID_ARGUMENT, an unknown model -> NOT_FOUND), the hostile classes of issue #12
(a deflated file padded after its stream, an upload that sends its header and nothing else, implausible spacing and
rescale values, an unknown payload kind, a TransferSyntaxUID forging a log line, a tiny upload that would resample
into gigabytes, a one-slice MR), and reads with a 50 ms deadline (DEADLINE_EXCEEDED, or OK when they finished in
time). Kinds for a modality no loaded model reads are left out. The first reads go through every kind once.
Violations:

* a read that ended with neither its findings nor its expected status (a lost read); a valid CT read must
  find each planted nodule (MR and X-ray reads must answer OK: the soak checks the service, the model cards
  the models);
* the server restarted (its pid's start time changed, or it is gone) or stopped answering health;
* the resident memory (VmRSS) of the server and its child processes (decode workers) together grew by more
  than ``max_rss_growth_mb`` between the end of the warm-up (``warmup_s``, default the first fifth) and the end.

Targets are loopback only: a soak is a load test, not something to point at a production server.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import statistics
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.security import is_loopback
from inference.client import ReadingClient, channel_credentials
from inference.errors import escape_text
from inference.serverproc import RssMonitor, process_start_ticks, rss_mb

logger = logging.getLogger(__name__)

MATCH_MM = 10.0  # a planted nodule counts as found when a finding's center is this close (or within its radius)
SHORT_DEADLINE_S = 0.05
READ_TIMEOUT_S = 300.0
# kind -> share of the reads; the expected status of each kind is in Case.expected.
MIX = {
    "valid_raw": 0.25,
    "valid_dicom": 0.14,
    "progressive_dicom": 0.07,  # the DICOM CT shuffled, declaring expected_instances: read by slab as it arrives
    "valid_mr": 0.07,
    "valid_dx": 0.07,
    "not_dicom": 0.03,
    "bad_raw_shape": 0.03,
    "unknown_model": 0.03,
    "short_deadline": 0.05,
    # the hostile classes of issue #12
    "deflate_padded": 0.03,
    "idle_stream": 0.03,
    "implausible_spacing": 0.03,
    "implausible_rescale": 0.03,
    "unknown_payload_kind": 0.03,
    "forged_syntax": 0.03,
    "huge_grid": 0.03,
    "one_slice_mr": 0.03,
}
# Which model a kind needs (left out when the server has none of that name).
NEEDS = {"valid_mr": "brain_lesion_mr", "valid_dx": "chest_xray", "one_slice_mr": "brain_lesion_mr"}
IDLE_STREAM_GUARD_S = 300.0  # the client's own deadline on an idle stream; the server's receive deadline is sooner


@dataclass(frozen=True)
class SoakConfig:
    target: str
    clients: int = 4
    duration_s: float = 60.0
    max_reads: int = 1000
    server_pid: int | None = None
    max_rss_growth_mb: float = 100.0
    warmup_s: float | None = None  # the RSS baseline is taken after this long (None: a fifth of duration_s)
    seed: int = 0
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        host, sep, port = self.target.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target must be HOST:PORT, got {self.target!r}")
        if not is_loopback(host):
            raise ValueError(f"soak targets a loopback server only (127.0.0.1, ::1, localhost), got {host!r}")
        if not 1 <= self.clients <= 64:
            raise ValueError(f"clients must be in [1, 64], got {self.clients!r}")
        if not 0 < self.duration_s <= 24 * 3600:
            raise ValueError(f"duration_s must be in (0, 86400], got {self.duration_s!r}")
        if self.warmup_s is not None and not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(f"warmup_s must be in [0, duration_s), got {self.warmup_s!r}")
        if self.max_reads < 1:
            raise ValueError(f"max_reads must be >= 1, got {self.max_reads!r}")
        if self.max_rss_growth_mb <= 0:
            raise ValueError(f"max_rss_growth_mb must be > 0, got {self.max_rss_growth_mb!r}")


@dataclass(frozen=True)
class Case:
    """One kind of read: its payload, header fields and the outcomes that count as correct."""

    kind: str
    payloads: tuple[bytes, ...]
    payload_kind: int
    header: dict[str, object]
    expected: frozenset[str]  # gRPC status names; "OK" means findings that match the planted truth
    truth_mm: tuple[tuple[float, float, float, float], ...] = ()  # (x, y, z, diameter) of planted nodules
    timeout_s: float = READ_TIMEOUT_S
    detail: str = ""  # a failure's status message must hold this (tells the server's deadline from the client's)
    idle: bool = False  # send the header, then nothing: the server must end the stream


@dataclass
class Outcome:
    kind: str
    code: str
    latency_s: float
    problem: str = ""  # empty when the outcome was expected


@dataclass
class SoakReport:
    outcomes: list[Outcome]
    violations: list[str]
    elapsed_s: float
    rss_mb: dict[str, float]  # baseline (after warm-up), peak, final

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        by_kind: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            by_kind.setdefault(o.kind, Counter())[o.code] += 1
        lines = [f"soak: {len(self.outcomes)} reads in {self.elapsed_s:.1f} s"]
        for kind in MIX:
            if kind in by_kind:
                codes = ", ".join(f"{code} {n}" for code, n in sorted(by_kind[kind].items()))
                lines.append(f"  {kind:<20} {sum(by_kind[kind].values()):>5}  {codes}")
        valid = sorted(o.latency_s for o in self.outcomes if o.kind.startswith("valid") and o.code == "OK")
        if valid:
            p95 = valid[min(len(valid) - 1, int(0.95 * len(valid)))]
            lines.append(f"  valid read latency: median {statistics.median(valid):.2f} s, p95 {p95:.2f} s")
        if self.rss_mb:
            lines.append("  server RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in self.rss_mb.items()))
        repeated = Counter(self.violations)
        lines += [f"VIOLATION: {v}" + (f" (x{n})" if n > 1 else "") for v, n in repeated.items()] or ["no violations"]
        return "\n".join(lines)


# -- the studies ------------------------------------------------------------------------------------------


def _raw_header(volume: object) -> pb.RawArray:
    return pb.RawArray(dtype="float32", shape=volume.shape, affine=np.asarray(volume.affine).ravel().tolist())


def build_cases(seed: int = 0, models: set[str] | None = None) -> dict[str, list[Case]]:
    """Small chest CTs (one 96^3 patch each after resampling) with one 16 mm nodule, brain MR and chest X-ray
    phantoms, the malformed and the hostile reads. ``models``: the loaded model names (kinds needing another are
    left out; None: all)."""
    from inference.phantoms import make_chest_ct, write_dicom_series

    cases: dict[str, list[Case]] = {kind: [] for kind in MIX}
    for i in range(2):
        phantom = make_chest_ct(
            seed * 100 + i, shape=(128, 128, 48), pixel_spacing_mm=1.0, slice_spacing_mm=2.5, n_nodules=1,
            nodule_diameters_mm=(16.0,), noise_sigma_hu=10.0,
        )  # fmt: skip
        truth = tuple((*lesion.center_mm, lesion.diameter_mm) for lesion in phantom.lesions)
        data = phantom.volume.voxels.astype(np.float32).tobytes()
        raw = _raw_header(phantom.volume)
        header = {"raw": raw, "modality": "CT", "model": "lung_nodule_ct"}
        cases["valid_raw"].append(Case("valid_raw", (data,), pb.RAW, header, frozenset({"OK"}), truth))
        deadline_ok = frozenset({"DEADLINE_EXCEEDED", "OK"})
        cases["short_deadline"].append(
            Case("short_deadline", (data,), pb.RAW, header, deadline_ok, truth, timeout_s=SHORT_DEADLINE_S)
        )
        if i == 0:
            bad = pb.RawArray(dtype="float32", shape=[129, 128, 48], affine=raw.affine)
            cases["bad_raw_shape"].append(
                Case("bad_raw_shape", (data,), pb.RAW, {"raw": bad, "modality": "CT"}, frozenset({"INVALID_ARGUMENT"}))
            )
            unknown = {**header, "model": "no_such_model"}
            cases["unknown_model"].append(Case("unknown_model", (data,), pb.RAW, unknown, frozenset({"NOT_FOUND"})))
            with tempfile.TemporaryDirectory() as tmp:
                files = write_dicom_series(phantom, Path(tmp))
                series = tuple(Path(f).read_bytes() for f in files)
            cases["valid_dicom"].append(
                Case("valid_dicom", series, pb.DICOM_FILES, {"model": "lung_nodule_ct"}, frozenset({"OK"}), truth)
            )
            shuffled = tuple(series[j] for j in np.random.default_rng(seed * 100 + i).permutation(len(series)))
            progressive = {"model": "lung_nodule_ct", "expected_instances": len(series)}
            cases["progressive_dicom"].append(
                Case("progressive_dicom", shuffled, pb.DICOM_FILES, progressive, frozenset({"OK"}), truth)
            )
    junk = b"this is not a DICOM file\n" * 400
    cases["not_dicom"].append(Case("not_dicom", (junk,), pb.DICOM_FILES, {}, frozenset({"INVALID_ARGUMENT"})))
    _add_other_modalities(cases, seed)
    _add_hostile(cases, series)
    for kind, model in NEEDS.items():
        if models is not None and model not in models:
            cases[kind] = []
    return cases


def _dicom_bytes(paths: list[Path]) -> tuple[bytes, ...]:
    return tuple(Path(p).read_bytes() for p in paths)


def _add_other_modalities(cases: dict[str, list[Case]], seed: int) -> None:
    from inference.phantoms import make_brain_mr, make_chest_xray, write_dicom_series, write_xray_dicom

    mr = make_brain_mr(seed + 7, shape=(64, 80, 12), pixel_spacing_mm=1.2, slice_spacing_mm=4.0, n_lesions=1)
    xray = make_chest_xray(seed + 3, size_px=(1024, 1152), n_opacities=1)
    with tempfile.TemporaryDirectory() as tmp:
        mr_files = _dicom_bytes(write_dicom_series(mr, Path(tmp) / "mr"))
        xray_file = Path(write_xray_dicom(xray, Path(tmp) / "dx.dcm")).read_bytes()
    ok = frozenset({"OK"})
    cases["valid_mr"].append(Case("valid_mr", mr_files, pb.DICOM_FILES, {"model": "brain_lesion_mr"}, ok))
    cases["valid_dx"].append(Case("valid_dx", (xray_file,), pb.DICOM_FILES, {"model": "chest_xray"}, ok))


def _with_element(data: bytes, **attrs: object) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in attrs.items():
        setattr(ds, key, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def padded_deflated_slice() -> bytes:
    """A one-slice deflated CT whose odd-length deflate stream is padded with a byte and which inflates past one
    4 MiB step: what wedged a decode thread for good before the reader stopped at the end of the stream."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from inference.io.volume import Volume
    from inference.phantoms import write_dicom_series

    for rows in range(1500, 1600):
        volume = Volume(np.zeros((1536, rows, 1), dtype=np.float32), np.eye(4), "CT")
        with tempfile.TemporaryDirectory() as tmp:
            ds = pydicom.dcmread(write_dicom_series(volume, Path(tmp))[0])
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        deflated = out.getvalue()
        group_length = int.from_bytes(deflated[140:144], "little")
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflater.decompress(deflated[144 + group_length :])
        if len(inflater.unused_data) == 1:
            return deflated
    raise RuntimeError("no odd-length deflate stream found")


FORGED_SYNTAX = "1.2.3\n2024-01-01 00:00:00,000 INFO radserve.audit [-]: read forged status=OK\x00"


def forged_syntax(data: bytes) -> bytes:
    """``data`` (explicit VR little endian) with a TransferSyntaxUID that holds a newline and a forged log line."""
    old = b"1.2.840.10008.1.2.1\0"
    new = FORGED_SYNTAX.encode()
    new += b"\0" * (len(new) % 2)
    patched = data.replace(len(old).to_bytes(2, "little") + old, len(new).to_bytes(2, "little") + new, 1)
    group_length = int.from_bytes(patched[140:144], "little") + len(new) - len(old)
    return patched[:140] + group_length.to_bytes(4, "little") + patched[144:]


def _add_hostile(cases: dict[str, list[Case]], series: tuple[bytes, ...]) -> None:
    from pydicom.data import get_testdata_file

    invalid, ct = frozenset({"INVALID_ARGUMENT"}), {"modality": "CT"}

    def add(kind: str, payloads: tuple[bytes, ...], payload_kind: int, header: dict, expected: str, **kw) -> None:
        cases[kind].append(Case(kind, payloads, payload_kind, header, frozenset({expected}), **kw))

    add("deflate_padded", (padded_deflated_slice(),), pb.DICOM_FILES, {}, "FAILED_PRECONDITION")
    add("idle_stream", (), pb.RAW, ct, "DEADLINE_EXCEEDED", detail="no payload arrived", idle=True,
        timeout_s=IDLE_STREAM_GUARD_S)  # fmt: skip
    spacing = {**ct, "raw": pb.RawArray(dtype="int16", shape=[8, 8, 8], spacing_mm=[1e300, 1.0, 1.0])}
    cases["implausible_spacing"].append(
        Case("implausible_spacing", (bytes(1024),), pb.RAW, spacing, invalid, detail="plausible range")
    )
    rescaled = tuple(_with_element(f, RescaleSlope=1e308) for f in series[:2])
    cases["implausible_rescale"].append(
        Case("implausible_rescale", rescaled, pb.DICOM_FILES, {}, invalid, detail="plausible range")
    )
    cases["unknown_payload_kind"].append(
        Case("unknown_payload_kind", (b"a", b"b"), 99, {}, invalid, detail="not a known PayloadKind")
    )
    forged = (forged_syntax(series[0]),)
    cases["forged_syntax"].append(  # native pixel data under an unknown syntax: INVALID_ARGUMENT, escaped
        Case("forged_syntax", forged, pb.DICOM_FILES, {}, invalid | {"UNIMPLEMENTED"}, detail="1.2.3\\n2024")
    )
    grid = {**ct, "raw": pb.RawArray(dtype="int16", shape=[64, 64, 16], spacing_mm=[15.0, 15.0, 15.0])}
    add("huge_grid", (bytes(64 * 64 * 16 * 2),), pb.RAW, grid, "RESOURCE_EXHAUSTED", detail="max_upsampling")
    one_slice = (Path(get_testdata_file("MR_small.dcm")).read_bytes(),)
    add("one_slice_mr", one_slice, pb.DICOM_FILES, {}, "FAILED_PRECONDITION", detail="input.min_shape")


def check_findings(response: pb.ReadResponse, truth_mm: tuple[tuple[float, float, float, float], ...]) -> str:
    """Empty when every planted nodule has a finding near it, else what is missing."""
    centers = np.array([list(f.center_mm) for f in response.findings], dtype=np.float64).reshape(-1, 3)
    for x, y, z, diameter in truth_mm:
        distance = np.linalg.norm(centers - np.array([x, y, z]), axis=1).min() if len(centers) else np.inf
        if distance > max(MATCH_MM, diameter / 2):
            return f"planted {diameter:.0f} mm nodule not found ({len(centers)} findings, nearest {distance:.1f} mm)"
    return ""


def _idle_requests(case: Case, stop: threading.Event):
    yield pb.ReadRequest(header=pb.ReadHeader(payload=case.payload_kind, **case.header))
    stop.wait(case.timeout_s)


def run_case(client: ReadingClient, case: Case) -> Outcome:
    start = time.perf_counter()
    stop = threading.Event()
    try:
        if case.idle:
            response = client.stub.Read(_idle_requests(case, stop), timeout=case.timeout_s, metadata=client.metadata)
        else:
            response = client.read(
                list(case.payloads), payload_kind=case.payload_kind, timeout_s=case.timeout_s, **case.header
            )
        code, problem = "OK", ""
        if case.truth_mm:
            problem = check_findings(response, case.truth_mm)
    except grpc.RpcError as exc:
        code, problem = exc.code().name, ""
        details = exc.details() or ""
        if code not in case.expected or (case.detail and case.detail not in details):
            problem = f"{code}: {escape_text(details, 300)}"
    finally:
        stop.set()
    latency = time.perf_counter() - start
    if code not in case.expected:
        problem = problem or f"got {code}, expected {' or '.join(sorted(case.expected))}"
    return Outcome(case.kind, code, latency, problem)


# -- the run ----------------------------------------------------------------------------------------------


def run_soak(config: SoakConfig, *, health: Callable[[], bool] | None = None) -> SoakReport:
    """Run the soak against ``config.target``; ``health`` says whether the server still answers SERVING."""
    probe = ReadingClient(config.target, ca=config.ca, cert=config.cert, key=config.key, token=config.token)
    try:
        models = {m.name for m in probe.list_models(timeout_s=30).models}
    finally:
        probe.close()
    cases = build_cases(config.seed, models)
    kinds = [k for k in MIX if cases[k]]
    rng = random.Random(config.seed)
    plan_lock = threading.Lock()
    outcomes: list[Outcome] = []
    issued = 0
    start = time.monotonic()
    end = start + config.duration_s
    warmup_end = start + (config.warmup_s if config.warmup_s is not None else config.duration_s / 5)

    pid = config.server_pid
    start_ticks = process_start_ticks(pid) if pid is not None else None
    violations: list[str] = []
    if pid is not None and start_ticks is None:
        violations.append(f"no process with pid {pid}")
        pid = None
    monitor = RssMonitor(pid) if pid is not None else None
    if monitor is not None:
        monitor.start()
    baseline: list[float] = []

    def next_case() -> Case | None:
        nonlocal issued
        with plan_lock:
            if issued >= config.max_reads or time.monotonic() >= end:
                return None
            kind = kinds[issued] if issued < len(kinds) else rng.choices(kinds, [MIX[k] for k in kinds])[0]
            case = rng.choice(cases[kind])
            issued += 1
            return case

    def worker() -> None:
        client = ReadingClient(config.target, ca=config.ca, cert=config.cert, key=config.key, token=config.token)
        try:
            while (case := next_case()) is not None:
                outcome = run_case(client, case)
                with plan_lock:
                    outcomes.append(outcome)
                    if pid is not None and not baseline and time.monotonic() >= warmup_end:
                        value = rss_mb(pid)
                        if value is not None:
                            baseline.append(value)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, name=f"soak-client-{i}") for i in range(config.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start

    for o in outcomes:
        if o.problem:
            violations.append(f"{o.kind} read: {o.problem}")
    rss: dict[str, float] = {}
    if pid is not None:
        monitor.stop()
        final = rss_mb(pid)
        if process_start_ticks(pid) != start_ticks:
            violations.append(f"the server (pid {pid}) exited or restarted during the soak")
        elif final is not None:
            rss = {"baseline": baseline[0] if baseline else final, "peak": max(monitor.peak, final), "final": final}
            growth = rss["final"] - rss["baseline"]
            if growth > config.max_rss_growth_mb:
                violations.append(
                    f"server RSS grew by {growth:.0f} MB after warm-up (limit {config.max_rss_growth_mb:.0f} MB)"
                )
    if health is not None and not health():
        violations.append("the server does not answer health SERVING after the soak")
    return SoakReport(outcomes, violations, elapsed, rss)


def run_from_args(args: argparse.Namespace) -> SoakReport:
    """`radserve soak`: with ``--spawn`` start a loopback server first (and stop it after)."""
    from grpc_health.v1 import health_pb2

    from inference.serverproc import ServerProcess, health_status

    credentials = channel_credentials(args.ca, args.tls_cert, args.tls_key)
    proc = None
    target, pid = args.server, args.server_pid
    if args.spawn:
        log_dir = Path(tempfile.mkdtemp(prefix="radserve-soak-"))
        # A receive deadline of 3 s, so that the idle streams end soon (the default is 30 s).
        proc = ServerProcess(
            models=args.models,
            device="auto",
            log_path=log_dir / "server.log",
            extra_args=["--upload-first-chunk-timeout-s", "3"],
        )
        logger.info("starting a server for the soak (log: %s)", proc.log_path)
        proc.start()
        target, pid = proc.target, proc.process.pid
    elif pid is None:
        raise ValueError("soak needs the server's pid to check restarts and memory: pass --server-pid PID or --spawn")
    config = SoakConfig(
        target=target,
        clients=args.clients,
        duration_s=args.duration_s,
        max_reads=args.max_reads,
        server_pid=pid,
        max_rss_growth_mb=args.max_rss_growth_mb,
        warmup_s=args.warmup_s,
        seed=args.seed,
        ca=args.ca,
        cert=args.tls_cert,
        key=args.tls_key,
        token=args.token if args.token is not None else os.environ.get("RADSERVE_TOKEN") or None,
    )

    def healthy() -> bool:
        return health_status(target, credentials=credentials) == health_pb2.HealthCheckResponse.SERVING

    try:
        report = run_soak(config, health=healthy)
    finally:
        if proc is not None:
            code = proc.stop()
    if proc is not None and code != 0:
        report.violations.append(f"the spawned server exited with code {code} on SIGTERM")
    return report


__all__ = ["MIX", "SoakConfig", "SoakReport", "build_cases", "run_from_args", "run_soak"]
