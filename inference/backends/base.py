"""The Backend interface: runs a model's network on one batch, and says what else it can do.

The engine (:class:`~inference.engine.runner.ModelRunner`), the registry and the metrics call only what is
declared here. Besides :attr:`device` and :meth:`forward`, every capability has a default that suits a backend
without it, so a backend overrides only what it has:

* out of GPU memory: :meth:`release_cached_memory` (no-op), :attr:`can_fall_back_to_cpu` (False) and
  :meth:`forward_on_cpu` (called only when it is True);
* ``torch.compile``: :meth:`enable_compile`, :meth:`disable_compile` (no-ops) and :attr:`compiled` (False);
* a network in another process (Triton): :attr:`remote` (False) and :meth:`is_ready` (True);
* memory figures for the metrics: :meth:`memory_allocated_bytes` (None: nothing to report);
* a batch of one that runs faster doubled: :meth:`pairs_lone_item` (False);
* :meth:`close` (no-op).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class Backend(ABC):
    """Executes the forward pass of one model version. Called from one worker thread at a time."""

    name = "abstract"
    # The network runs in another process that may come and go (Triton): a load whose warm-up finds it down still
    # serves once it is back, and health asks :meth:`is_ready`. A local backend that cannot run is a failed load.
    remote = False

    @property
    @abstractmethod
    def device(self) -> torch.device:
        raise NotImplementedError(f"{type(self).__name__} must define device")

    @abstractmethod
    def forward(self, batch: torch.Tensor) -> Any:
        """Run the network on ``batch`` (B, C, *spatial) and return its raw outputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def pairs_lone_item(self, item: torch.Tensor) -> bool:
        """Whether a batch of ``item`` alone should be forwarded as a pair of copies (its first result kept):
        :func:`inference.platform.pairs_lone_item` for a network that runs here."""
        return False

    # -- out of GPU memory (the policy is in ModelRunner._forward) ------------------------------------------------

    def release_cached_memory(self) -> None:  # noqa: B027 - optional capability, nothing to release by default
        """Return cached, unused accelerator memory (after an out-of-memory error)."""

    @property
    def can_fall_back_to_cpu(self) -> bool:
        """Whether :meth:`forward_on_cpu` runs somewhere else than :meth:`forward` (the network is on a GPU)."""
        return False

    def forward_on_cpu(self, batch: torch.Tensor) -> Any:
        """Run the network on the CPU (fp32); called only when :attr:`can_fall_back_to_cpu`."""
        raise NotImplementedError(f"{type(self).__name__} has no CPU fall-back (can_fall_back_to_cpu is False)")

    # -- torch.compile ---------------------------------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        """Whether forward passes go through ``torch.compile`` (warm up with several batch sizes)."""
        return False

    def enable_compile(self) -> None:  # noqa: B027 - optional capability
        """Compile the network from the next forward pass on, where the backend can (model.yaml ``compile``)."""

    def disable_compile(self) -> None:  # noqa: B027 - optional capability
        """Back to eager execution (compilation failed)."""

    # -- readiness and figures -------------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Whether the network can run now (a remote backend asks its server; may block: call it in a thread)."""
        return True

    def memory_allocated_bytes(self) -> int | None:
        """Accelerator memory held by this backend's tensors; None when there is none to report."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (GPU memory, connections)."""
