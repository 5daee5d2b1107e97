"""The outputs radserve returned for a study (DICOM SR, SEG) as the bridge keeps them: written to its state directory
and fsynced before the study is ``storing``, and the UIDs that tell whether the archive holds them already."""

from __future__ import annotations

import os
from pathlib import Path

OUTPUT_KINDS = {"dicom_sr": "SR", "dicom_seg": "SEG"}


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``path`` so that after a crash it is either absent or whole: temporary file, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_uids(data: bytes) -> tuple[str, str, str]:
    """(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of a DICOM Part 10 object."""
    import io

    from pydicom import dcmread

    ds = dcmread(
        io.BytesIO(data),
        stop_before_pixels=True,
        specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
    )
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
