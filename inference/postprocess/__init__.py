"""Postprocessing: network outputs (boxes, masks) -> Findings in patient coordinates."""

from inference.postprocess.finding import Finding

__all__ = ["Finding"]
