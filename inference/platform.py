"""Where models run: the one place (besides backends/) that asks torch about CUDA."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# Out of GPU memory: torch.cuda.OutOfMemoryError is an alias of torch.OutOfMemoryError in recent torch; both named
# for older ones. The engine catches these (inference.engine.runner), without asking torch about CUDA itself.
OOM_ERRORS: tuple[type[BaseException], ...] = tuple({torch.OutOfMemoryError, torch.cuda.OutOfMemoryError})


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if requested not in DEVICES and not requested.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} or 'cuda:N', got {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda" if requested == "auto" else requested)
        logger.info("using %s (%s)", device, torch.cuda.get_device_name(device))
        return device
    if requested != "auto":
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    logger.info("CUDA not available; using the CPU with %d threads", torch.get_num_threads())
    return torch.device("cpu")


def autocast_dtype(device: torch.device, setting: str) -> torch.dtype | None:
    """The autocast dtype for a model's ``autocast`` setting; None (fp32) on the CPU or when 'none'."""
    if device.type != "cuda" or setting == "none":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]
