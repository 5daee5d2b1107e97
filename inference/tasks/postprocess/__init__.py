"""Postprocessing per kind of task: network outputs (boxes, masks) -> Findings in patient coordinates."""
