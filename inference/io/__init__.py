"""Input readers: DICOM series, NIfTI files and raw arrays become one :class:`Volume` type."""

from inference.io.volume import SourceImage, SourceRefs, Volume

__all__ = ["SourceImage", "SourceRefs", "Volume"]
