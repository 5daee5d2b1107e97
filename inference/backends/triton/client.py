"""tritonclient's gRPC client with the channel settings radserve needs (imported only where Triton is used)."""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_MESSAGE_BYTES", "connect"]

MAX_MESSAGE_BYTES = 2**31 - 1


def connect(url: str) -> Any:
    """A ``tritonclient.grpc.InferenceServerClient`` for ``url`` (HOST:PORT) that reconnects soon after Triton
    comes back: gRPC's default reconnect back-off grows to two minutes while a server is down or starting."""
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(
        url,
        channel_args=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 1000),
            # With a dns:/// URL naming several Triton pods (a headless service), spread requests over them.
            ("grpc.lb_policy_name", "round_robin"),
        ],
    )
