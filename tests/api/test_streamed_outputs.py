"""ReadStreamed's answer without a model: chunking and reassembly (OutputAssembler), and the API layer in process.

The API tests run a real gRPC server in this process with the server's interceptors (errors, audit, tokens) and
a ReadingServicer whose read path is replaced by a canned outcome, so that DICOM outputs of any size cost
nothing to make. The real read path through the real server: tests/api/test_read_streamed.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from inference.api.gen.radserve.v1 import reading_pb2 as pb
from inference.api.gen.radserve.v1 import reading_pb2_grpc as pb_grpc
from inference.api.interceptors import CallRecord, ErrorInterceptor
from inference.api.security import AuthInterceptor, TokenTable
from inference.api.servicer import ReadingServicer, ReadOutcome, output_parts, sha256_hex
from inference.client import OutputAssembler, OutputIntegrityError, assemble
from inference.errors import InvalidInputError
from inference.io.limits import InputLimits
from inference.outputs.derived import DerivedObjects

MiB = 1024 * 1024
TOKEN = "s3cret-token-for-tests"


def blob(n_bytes: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n_bytes)


def answer(sr: bytes, seg: bytes, chunk_bytes: int = 4 * MiB) -> list[pb.ReadResponsePart]:
    parts = [pb.ReadResponsePart(summary=pb.ReadResponse(request_id="r1", model="m", model_version="1"))]
    for kind, data in ((pb.DICOM_SR, sr), (pb.DICOM_SEG, seg)):
        parts += output_parts(kind, data, chunk_bytes, sha256_hex(data))
    return parts


# -- chunking and reassembly ------------------------------------------------------------------------------


def test_a_9_mib_seg_goes_in_4_mib_chunks_and_reassembles():
    sr, seg = blob(5000, 1), blob(9 * MiB + 7, 2)
    parts = answer(sr, seg)
    kinds = [p.WhichOneof("kind") for p in parts]
    assert kinds == ["summary", "chunk", "output_end", "chunk", "chunk", "chunk", "output_end"]
    seg_chunks = [p.chunk for p in parts if p.HasField("chunk") and p.chunk.output == pb.DICOM_SEG]
    assert [c.offset for c in seg_chunks] == [0, 4 * MiB, 8 * MiB]
    assert all(len(c.data) <= 4 * MiB and c.total_bytes == len(seg) for c in seg_chunks)
    end = parts[-1].output_end
    assert (end.output, end.total_bytes, end.chunks, end.sha256) == (pb.DICOM_SEG, len(seg), 3, sha256_hex(seg))
    response = assemble(parts)
    assert response.dicom_sr == sr and response.dicom_seg == seg and response.request_id == "r1"


def test_an_output_not_produced_sends_nothing():
    parts = answer(blob(100), b"")
    assert [p.WhichOneof("kind") for p in parts] == ["summary", "chunk", "output_end"]
    assert assemble(parts).dicom_seg == b""


def test_a_checksum_mismatch_is_detected():
    parts = answer(b"", blob(3 * MiB), chunk_bytes=MiB)
    parts[2].chunk.data = b"\x00" + parts[2].chunk.data[1:]  # one byte flipped in the second chunk, same size
    with pytest.raises(OutputIntegrityError, match=r"DICOM SEG is corrupt: the SHA-256 of the 3145728 bytes"):
        assemble(parts)
    assert OutputIntegrityError.code == "DATA_LOSS"


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda parts: parts.pop(2), r"chunk at offset 2097152, expected offset 1048576"),
        (lambda parts: parts.pop(), r"ended before the end of DICOM SEG \(3145728 of 3145728 bytes\)"),
        (lambda parts: parts.pop(0), r"began with chunk, not with its summary"),
        (lambda parts: parts.insert(1, parts[0]), r"second summary"),
        (lambda parts: parts.append(parts[1]), r"chunk of DICOM SEG after its end"),
        (lambda parts: setattr(parts[-1].output_end, "total_bytes", 3 * MiB + 1), r"incomplete: 3145728 bytes in 3"),
        (lambda parts: setattr(parts[2].chunk, "total_bytes", 7), r"states 7 bytes in all, an earlier 3145728"),
    ],
)
def test_a_truncated_or_disordered_answer_is_detected(tamper, message):
    parts = answer(b"", blob(3 * MiB), chunk_bytes=MiB)
    tamper(parts)
    with pytest.raises(OutputIntegrityError, match=message):
        assemble(parts)


def test_the_assembler_hands_out_nothing_before_the_summary():
    assembler = OutputAssembler()
    with pytest.raises(OutputIntegrityError, match="without its summary"):
        assembler.result()


# -- the API layer in process -----------------------------------------------------------------------------


class CannedServicer(ReadingServicer):
    """The real Read and ReadStreamed around a canned read path: ``outcome`` or the error ``fail``."""

    outcome: ReadOutcome
    fail: Exception | None = None

    async def _run(self, request_iterator, context) -> ReadOutcome:
        async for _ in request_iterator:
            pass
        if self.fail is not None:
            raise self.fail
        return self.outcome


def run_against_servicer(servicer: ReadingServicer, scenario, *, tokens: TokenTable | None = None):
    """Serve ``servicer`` on a loopback port with the server's interceptors; ``scenario(stub)`` runs as a client.
    Returns the scenario's result and the CallRecords of the calls made."""
    records: list[CallRecord] = []

    async def main():
        interceptors = [ErrorInterceptor(on_done=records.append)]
        if tokens is not None:
            interceptors.append(AuthInterceptor(tokens))
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.max_send_message_length", 64 * MiB)])
        pb_grpc.add_ReadingServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            options = [("grpc.max_receive_message_length", 64 * MiB)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = pb_grpc.ReadingServiceStub(channel)
                stub.target = f"127.0.0.1:{port}"  # for a scenario that also calls with another client
                return await scenario(stub)
        finally:
            await server.stop(None)

    return asyncio.run(main()), records


def requests():
    yield pb.ReadRequest(header=pb.ReadHeader(outputs=[pb.DICOM_SR, pb.DICOM_SEG]))
    yield pb.ReadRequest(chunk=pb.Chunk(file_index=0, data=b"study"))


KiB = 1024
CHUNK_BYTES = 64 * KiB  # small objects in several chunks: large gRPC messages are slow in Python


def canned(sr: bytes, seg: bytes, max_message_bytes: int = 64 * MiB) -> CannedServicer:
    servicer = CannedServicer(
        None, InputLimits(), ThreadPoolExecutor(1), max_message_bytes=max_message_bytes, output_chunk_bytes=CHUNK_BYTES
    )
    finding = pb.Finding(label="lesion", score=0.9, center_mm=[1.0, 2.0, 3.0])
    summary = pb.ReadResponse(
        request_id="req-1", model="m", model_version="1", findings=[finding], warnings=["w"], timing_ms={"total": 1.0}
    )
    servicer.outcome = ReadOutcome(summary, DerivedObjects(sr=sr, seg=seg))
    return servicer


def test_read_too_large_for_one_message_is_resource_exhausted_naming_read_streamed():
    servicer = canned(blob(2000), blob(300 * KiB), max_message_bytes=256 * KiB)

    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Read(requests())
        streamed = [part async for part in stub.ReadStreamed(requests())]
        return failed.value, streamed

    (error, streamed), records = run_against_servicer(servicer, scenario)
    whole = assemble(streamed)
    assert whole.dicom_seg == servicer.outcome.derived.seg
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        f"the Read response would be {whole.ByteSize()} bytes (DICOM SR 2000 bytes, DICOM SEG {300 * KiB} bytes), "
        f"over this server's maximum message size of {256 * KiB} bytes; use ReadStreamed, which returns the DICOM "
        f"outputs in chunks of at most {CHUNK_BYTES} bytes"
    )
    assert [(r.method.rsplit("/", 1)[1], r.code) for r in records] == [
        ("Read", "RESOURCE_EXHAUSTED"),
        ("ReadStreamed", "OK"),
    ]
    assert servicer.in_flight == 0


def test_read_and_read_streamed_give_the_same_bytes_when_read_fits():
    servicer = canned(blob(3000, 3), blob(200 * KiB, 4))

    async def scenario(stub):
        return await stub.Read(requests()), [part async for part in stub.ReadStreamed(requests())]

    (single, streamed), _ = run_against_servicer(servicer, scenario)
    assert [p.WhichOneof("kind") for p in streamed].count("chunk") == 1 + 4
    assert assemble(streamed).SerializeToString(deterministic=True) == single.SerializeToString(deterministic=True)


def test_errors_of_the_streamed_read_become_its_status_and_are_recorded():
    servicer = canned(b"", b"")
    servicer.fail = InvalidInputError("file 3 is not a DICOM file")

    async def scenario(stub):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            [part async for part in stub.ReadStreamed(requests())]
        return failed.value

    error, records = run_against_servicer(servicer, scenario)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "file 3 is not a DICOM file")
    assert [r.code for r in records] == ["INVALID_ARGUMENT"]


def test_the_streamed_read_needs_a_token_like_read():
    servicer = canned(blob(10), b"")
    tokens = TokenTable.from_mapping({"archive": TOKEN})

    def refused_without_token(target: str) -> grpc.StatusCode:
        # The synchronous client, as the CLI uses: the server refuses the call before reading its requests, and
        # grpc.aio's client reports a request write racing that refusal as its own INTERNAL error instead.
        with grpc.insecure_channel(target) as channel:
            try:
                list(pb_grpc.ReadingServiceStub(channel).ReadStreamed(requests()))
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    async def scenario(stub):
        code = await asyncio.to_thread(refused_without_token, stub.target)
        parts = [part async for part in stub.ReadStreamed(requests(), metadata=(("authorization", f"Bearer {TOKEN}"),))]
        return code, parts

    (code, parts), records = run_against_servicer(servicer, scenario, tokens=tokens)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert assemble(parts).dicom_sr == servicer.outcome.derived.sr
    assert [(r.code, r.tenant) for r in records] == [("UNAUTHENTICATED", "-"), ("OK", "archive")]


def test_health_watch_and_reflection_still_stream_through_the_error_interceptor():
    async def main():
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((reflection.SERVICE_NAME,), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                first = await watch.read()
                watch.cancel()
                ask = reflection_pb2.ServerReflectionRequest(list_services="")
                replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([ask]))
                services = [s.name async for reply in replies for s in reply.list_services_response.service]
                return first.status, services
        finally:
            await server.stop(None)

    status, services = asyncio.run(main())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert services == [reflection.SERVICE_NAME]


def test_a_client_that_leaves_mid_stream_is_recorded_cancelled_and_its_read_leaves_the_in_flight_count():
    servicer = canned(blob(10), blob(2 * MiB))  # 32 chunks of 64 KiB

    async def scenario(stub):
        call = stub.ReadStreamed(requests())
        first = await call.read()
        call.cancel()
        for _ in range(100):  # the server learns of the cancellation asynchronously
            if servicer.in_flight == 0:
                break
            await asyncio.sleep(0.05)
        return first, servicer.in_flight

    (first, in_flight), records = run_against_servicer(servicer, scenario)
    assert first.HasField("summary") and in_flight == 0
    assert [r.code for r in records] == ["CANCELLED"]
