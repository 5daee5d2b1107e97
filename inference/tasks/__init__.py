"""Tasks: per kind of model, its preprocessing, its network and its postprocessing, around the engine's batches.

* base.py: the :class:`Task` interface the engine calls (prepare, split_outputs, finalize -> :class:`TaskResult`,
  findings and masks together).
* detection.py (3-D RetinaNet), segmentation.py (3-D sliding-window segmentation), projection.py (2-D X-ray
  detection): the tasks; their postprocessing side by side in postprocess/.
* preprocess.py (MONAI resampling and intensity), patches.py (sliding-window plans), network.py (building a
  network, loading its weights), direct.py (a task run in-process without the server: training, baselines).

:func:`task_class` is the one table of which task reads a model: model.yaml's ``task`` and the number of spatial
dimensions of its ``inferer.roi_size``.
"""

from __future__ import annotations

from inference.modelrepo.schema import ModelConfig
from inference.tasks.base import PreparedStudy, Task, TaskResult
from inference.tasks.detection import DetectionTask
from inference.tasks.projection import ProjectionDetectionTask
from inference.tasks.segmentation import SegmentationTask

__all__ = [
    "TASK_CLASSES",
    "DetectionTask",
    "PreparedStudy",
    "ProjectionDetectionTask",
    "SegmentationTask",
    "Task",
    "TaskResult",
    "task_class",
]

# (task, spatial dims of the network input) -> the Task that reads such a model.
TASK_CLASSES: dict[tuple[str, int], type[Task]] = {
    ("detection", 3): DetectionTask,
    ("segmentation", 3): SegmentationTask,
    ("detection", 2): ProjectionDetectionTask,
}


def task_class(config: ModelConfig) -> type[Task]:
    """The Task class of a model version (ValueError naming the known kinds when there is none)."""
    key = (config.task, len(config.inferer.roi_size))
    if key not in TASK_CLASSES:
        raise ValueError(f"no implementation for a {key[1]}-D {key[0]} model; known: {sorted(TASK_CLASSES)}")
    return TASK_CLASSES[key]
