"""Triton Python-backend model: runs the exported TorchScript ``model.pt`` with torch.

``radserve triton export --runtime python`` copies this file as ``<model>/<version>/model.py``. It runs inside
Triton's Python backend stub (``triton_python_backend_utils`` exists only there), in the Triton environment
(torch + numpy < 2), not in radserve's. Triton's dynamic batcher hands ``execute`` several requests at once:
they are concatenated into one forward pass and the outputs split back per request. Output names and their
order come from config.pbtxt, which the export wrote from the same TorchScript module.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self.module = torch.jit.load(path, map_location=self.device).eval()
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        self.logger = pb_utils.Logger
        self.logger.log_info(f"{config['name']}: loaded {path} on {self.device} (torch {torch.__version__})")

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [int(a.shape[0]) for a in arrays]
        batch = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays))).to(self.device)
        try:
            with torch.inference_mode():
                outputs = self.module(batch)
        except Exception as exc:  # every request of the batch gets the error, Triton stays up
            error = pb_utils.TritonError(f"forward failed: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        outputs = [o.detach().to("cpu").contiguous().numpy() for o in outputs]
        responses, start = [], 0
        for n in sizes:
            tensors = [
                pb_utils.Tensor(name, out[start : start + n])
                for name, out in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def finalize(self) -> None:
        self.module = None
