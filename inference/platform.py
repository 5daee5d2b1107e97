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


def pairs_lone_item(device: torch.device, item: torch.Tensor) -> bool:
    """Whether a batch of one ``item`` (C, D, H, W) runs faster forwarded as a pair of copies on ``device``.

    On the CPU, PyTorch picks its native ``slow_conv3d`` kernel for most 3-D convolutions of a batch of one (the
    ``use_mkldnn`` heuristic declines oneDNN for N=1 with small kernels and feature maps) and oneDNN from N=2 on:
    on the 2-core CPU, one 96^3 patch of lung_nodule_ct takes 0.45-0.55 s alone and 0.13-0.17 s as a pair
    (docs/decisions.md, "A lone 3-D item is forwarded as a pair on the CPU"). CUDA and 2-D items are unaffected."""
    return device.type == "cpu" and item.dim() == 4
