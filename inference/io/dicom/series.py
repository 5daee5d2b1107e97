"""One DICOM series -> :class:`Volume`: the two passes (headers, then pixels) and the reader interface.

Part of :mod:`inference.io.dicom`, whose docstring states the reading policy.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless

from inference.errors import InvalidInputError
from inference.io.base import VolumeReader, payload_size
from inference.io.dicom.decode import _decode_into
from inference.io.dicom.elements import _plain_header, _required_str, _syntax_name, hash_uid
from inference.io.dicom.geometry import _frames_of, _stack_geometry
from inference.io.dicom.headers import _read_header, _select_series, _skip_reason
from inference.io.dicom.pixel_format import _check_pixel_data, _check_rescaled_range, _check_same_size, _pixel_format
from inference.io.limits import DEFAULT_LIMITS, InflateBudget, InputLimits, check_geometry
from inference.io.volume import SourceImage, SourceRefs, Volume

if TYPE_CHECKING:
    from inference.io.dicom.geometry import _Frame
    from inference.io.dicom.headers import _Header


_log = logging.getLogger(__name__)
_LOSSY_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless)


def read_dicom_series(
    files: Sequence[bytes | Path],
    *,
    series_instance_uid: str | None = None,
    limits: InputLimits = DEFAULT_LIMITS,
    decoded: Mapping[int, np.ndarray] | None = None,
    headers: Mapping[int, object] | None = None,
    pixels: bool = True,
) -> Volume:
    """Read one image series from uploaded DICOM files (bytes or paths) into a :class:`Volume`.

    ``series_instance_uid`` chooses the series when the upload holds several. Raises InvalidInputError,
    UnsupportedError or LimitExceededError as the module docstring describes. ``decoded``: the voxels of
    single-frame files already decoded by :func:`read_dicom_file` (by file index, shape (columns, rows, 1)); every
    header and check still runs, only those files' pixels are not decoded again (progressive reads). ``headers``:
    files' headers already parsed by :func:`read_dicom_header` (with their own inflate budget: never for deflated
    files), by file index. ``pixels=False``: every check, no pixels: the Volume's voxels are a zero-stride stand-in
    of the series' shape (a progressive read that has its slices already).
    """
    files = list(files)
    if not files:
        raise InvalidInputError("the upload holds no files")
    limits.check_files(len(files))
    limits.check_request_bytes(sum(payload_size(f) for f in files))

    budget = InflateBudget(limits)
    parsed = headers or {}
    headers = [
        parsed[index] if index in parsed else _read_header(index, src, limits, budget)
        for index, src in enumerate(files)
    ]
    images: list[_Header] = []
    skipped: Counter[str] = Counter()
    for header in headers:
        reason = _skip_reason(header)
        if reason is None:
            images.append(header)
        else:
            skipped[reason] += 1
            _log.debug("file %d skipped: %s", header.index, reason)
    if not images:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        n_skipped = sum(skipped.values())
        raise InvalidInputError(
            f"the upload holds no images, only {n_skipped} non-image object{'s' if n_skipped != 1 else ''} ({kinds})"
        )

    series, label = _select_series(images, series_instance_uid)
    formats = [_pixel_format(h) for h in series]
    for h, fmt in zip(series, formats, strict=True):
        limits.check_shape((fmt.columns, fmt.rows, fmt.frames), what=h.where)
    _check_same_size(series, formats, label)
    frames = [frame for h, fmt in zip(series, formats, strict=True) for frame in _frames_of(h, fmt)]
    limits.check_shape((formats[0].columns, formats[0].rows, len(frames)), what=label)
    affine, order = _stack_geometry(frames, label)
    check_geometry(affine, (formats[0].columns, formats[0].rows, len(frames)), label, limits)
    for h, fmt in zip(series, formats, strict=True):
        _check_pixel_data(h, fmt)
    _check_rescaled_range(series, formats, frames)

    source = _source_refs(series, frames, order)
    first = next(h for h in series if h.index == frames[order[0]].file_index)
    modality = _required_str(first, "Modality")

    shape = (formats[0].columns, formats[0].rows, len(frames))
    if pixels:
        voxels = np.empty(shape, dtype=np.float32)
        _decode_into(voxels, files, series, formats, frames, order, decoded or {})
    else:
        voxels = np.broadcast_to(np.zeros((), dtype=np.float32), shape)
    warnings = _warnings(series, frames)
    _log.debug(
        "DICOM %s: %d slices of %dx%d, spacing %s mm, transfer syntaxes %s; %d non-image objects skipped",
        modality,
        len(frames),
        formats[0].columns,
        formats[0].rows,
        "x".join(f"{s:.4g}" for s in np.linalg.norm(affine[:3, :3], axis=0)),
        sorted({_syntax_name(h.transfer_syntax) for h in series}),
        sum(skipped.values()),
    )
    return Volume(voxels=voxels, affine=affine, modality=modality, source=source, warnings=warnings)


@dataclass(frozen=True)
class DicomSeriesReader(VolumeReader[Sequence[bytes | Path]]):
    """:func:`read_dicom_series` as a :class:`VolumeReader`."""

    single_payload: ClassVar[bool] = False
    series_instance_uid: str | None = None
    limits: InputLimits = DEFAULT_LIMITS

    def read(self, payload: Sequence[bytes | Path]) -> Volume:
        return read_dicom_series(payload, series_instance_uid=self.series_instance_uid, limits=self.limits)


def read_dicom_header(index: int, file: bytes | Path, *, limits: InputLimits = DEFAULT_LIMITS) -> object:
    """The header pass of :func:`read_dicom_series` for file ``index`` alone, for its ``headers`` argument."""
    return _read_header(index, file, limits, InflateBudget(limits))


def read_dicom_file(
    file: bytes | Path, *, limits: InputLimits = DEFAULT_LIMITS, series_instance_uid: str | None = None
) -> Volume:
    """One uploaded file on its own (a progressive read decodes each file as soon as it has arrived).

    An image: :func:`read_dicom_series` of that file alone (one slice: its own position, orientation and
    header). A non-image object (SR, presentation state...), or an image of another series than
    ``series_instance_uid`` asks for: a Volume of shape (0, 0, 0) with an identity affine and no modality. Errors are
    the reader's; the series checks that need every file (gaps, several series, mixed orientation) run when the
    whole series is read.
    """
    header = _read_header(0, file, limits, InflateBudget(limits))
    if _skip_reason(header) is not None or (
        series_instance_uid is not None
        and series_instance_uid.strip() not in (header.series_uid, hash_uid(header.series_uid))
    ):
        return Volume(voxels=np.zeros((0, 0, 0), dtype=np.float32), affine=np.eye(4), modality="")
    return read_dicom_series([file], limits=limits)


def _source_refs(series: list[_Header], frames: list[_Frame], order: list[int]) -> SourceRefs:
    by_index = {h.index: h for h in series}
    first = by_index[frames[order[0]].file_index]
    return SourceRefs(
        study_instance_uid=_required_str(first, "StudyInstanceUID"),
        series_instance_uid=first.series_uid,
        frame_of_reference_uid=str(first.ds.get("FrameOfReferenceUID") or "").strip() or None,
        images=tuple(
            SourceImage(
                sop_instance_uid=by_index[frames[i].file_index].sop_instance_uid,
                sop_class_uid=by_index[frames[i].file_index].sop_class_uid,
                slice_index=k,
                frame_number=frames[i].frame_number,
            )
            for k, i in enumerate(order)
        ),
        header=_plain_header(first.ds),
    )


def _warnings(series: list[_Header], frames: list[_Frame]) -> tuple[str, ...]:
    out = []
    if any(f.spacing_element == "ImagerPixelSpacing" for f in frames):
        out.append("pixel spacing is ImagerPixelSpacing (at the detector, not corrected for magnification)")
    lossy = [
        h
        for h in series
        if str(h.ds.get("LossyImageCompression", "")).strip() == "01" or h.transfer_syntax in _LOSSY_SYNTAXES
    ]
    if lossy:
        out.append(f"{len(lossy)} of {len(series)} source images were lossy compressed")
    return tuple(out)
