"""config.pbtxt of one exported model, built as Triton's own ModelConfig protobuf message.

Building the message (``tritonclient.grpc.model_config_pb2``) instead of formatting text means a misspelt
field fails at export, and tests can parse the file back. Two runtimes share every tensor name, shape and
batching setting and differ only in the backend line:

* ``pytorch``: ``platform: "pytorch_libtorch"``, Triton's C++ PyTorch backend running ``model.pt``
  (TorchScript). What production runs, in NVIDIA's Triton container, usually with ``KIND_GPU``.
* ``python``: ``backend: "python"``, Triton's Python backend running ``model.py``
  (:mod:`inference.triton.python_model`), which loads the same ``model.pt`` with torch. The only backend in
  the nvidia-pytriton wheel, so what ``radserve triton serve`` runs locally.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inference.backends.triton.layout import INPUT_NAME, LAYOUT_PARAMETER

__all__ = ["INSTANCE_KINDS", "RUNTIMES", "TensorSpec", "TritonModelSpec", "parse_config", "render_config"]

RUNTIMES = ("pytorch", "python")
INSTANCE_KINDS = ("gpu", "cpu")

# torch dtype name -> Triton data type name (what radserve networks output).
DATA_TYPES = {
    "torch.float32": "TYPE_FP32",
    "torch.float16": "TYPE_FP16",
    "torch.bfloat16": "TYPE_BF16",
    "torch.int64": "TYPE_INT64",
    "torch.int32": "TYPE_INT32",
    "torch.uint8": "TYPE_UINT8",
    "torch.bool": "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension
    data_type: str = "TYPE_FP32"


@dataclass(frozen=True)
class TritonModelSpec:
    """Everything config.pbtxt says about one model (all exported versions share it)."""

    name: str
    max_batch_size: int
    max_queue_delay_ms: float
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    layout: Any  # inference.backends.triton.layout structure
    runtime: str = "pytorch"
    instance_kind: str = "gpu"
    instance_count: int = 1

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {self.instance_kind!r}")
        if self.instance_count < 1:
            raise ValueError(f"instance_count must be >= 1, got {self.instance_count!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size!r}")


def render_config(spec: TritonModelSpec, *, extra_parameters: dict[str, str] | None = None) -> str:
    """The text of config.pbtxt for ``spec``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    if spec.runtime == "pytorch":
        config.platform = "pytorch_libtorch"
        # No autograd bookkeeping in Triton's PyTorch backend (torch.inference_mode).
        config.parameters["INFERENCE_MODE"].string_value = "true"
    else:
        config.backend = "python"
    config.input.add(name=spec.input.name, data_type=mc.DataType.Value(spec.input.data_type), dims=spec.input.dims)
    for out in spec.outputs:
        config.output.add(name=out.name, data_type=mc.DataType.Value(out.data_type), dims=out.dims)
    # Triton's dynamic batcher forms the batches on the server, from every radserve replica's requests.
    config.dynamic_batching.max_queue_delay_microseconds = round(spec.max_queue_delay_ms * 1000)
    kind = mc.ModelInstanceGroup.KIND_GPU if spec.instance_kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=spec.instance_count, kind=kind)
    config.version_policy.all.SetInParent()  # every exported version is served
    config.parameters[LAYOUT_PARAMETER].string_value = json.dumps(spec.layout, separators=(",", ":"))
    for key, value in (extra_parameters or {}).items():
        config.parameters[key].string_value = value
    return text_format.MessageToString(config)


def parse_config(text: str) -> Any:
    """Parse config.pbtxt text into a ``model_config_pb2.ModelConfig`` (tests, checks)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse(text, mc.ModelConfig())


def input_spec(item_shape: Sequence[int]) -> TensorSpec:
    return TensorSpec(INPUT_NAME, tuple(int(s) for s in item_shape))
