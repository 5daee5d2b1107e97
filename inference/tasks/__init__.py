"""Model tasks: the preprocessing and postprocessing around a network's batched forward pass."""

from inference.tasks.detection import DetectionTask

__all__ = ["DetectionTask"]
