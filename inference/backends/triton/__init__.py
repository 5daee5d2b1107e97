"""The Triton Inference Server backend: the network runs in a Triton server, reached over gRPC.

* backend.py: :class:`TritonBackend` (the :class:`~inference.backends.base.Backend` the engine calls).
* client.py: tritonclient's gRPC client with radserve's channel settings (tritonclient imported on first use).
* layout.py: how a network's nested outputs travel as Triton's flat tensors, shared with the exporter
  (:mod:`inference.triton.export`).
"""

from inference.backends.triton.backend import TritonBackend, is_loopback_url, use_shared_memory

__all__ = ["TritonBackend", "is_loopback_url", "use_shared_memory"]
