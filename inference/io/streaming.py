"""One-file payloads (NIfTI, RAW) decoded slab by slab while they arrive (issue #15, docs/decisions.md).

A :class:`PlaneStream` takes the payload's bytes in the order they arrive (:meth:`PlaneStream.feed`) and converts each
plane of the volume as soon as its bytes are in, into the float32 array the whole-payload reader would return, with
the same conversion (:func:`inference.io.nifti.scaled_float32`, the raw reader's cast) and the same value checks:

* **NIfTI** (``.nii`` and ``.nii.gz``): voxels are stored x fastest, so whole z-slices arrive one after the other.
  The header is checked as :func:`~inference.io.nifti.read_nifti` checks it (:func:`~inference.io.nifti.nifti_header`)
  as soon as its bytes are in; a gzip stream is inflated as it arrives (``zlib``, the gzip container, its CRC-32
  and length checked at its end), never more than the header implies plus what ``read_nifti`` would accept after the
  voxels, within the read's inflate budget, and at most ``_INFLATE_STEP`` bytes per call (memory follows the data).
* **RAW**: the (X, Y, Z) array in C order, so whole x-planes arrive one after the other; the description in the
  request is checked as :func:`~inference.io.raw.read_raw` checks it (:func:`~inference.io.raw.raw_layout`).

:attr:`PlaneStream.grid` is the grid a slab read fills (:class:`~inference.io.assembly.ExpectedGrid`): its slices
(axis 2) are the planes in arrival order, so a RAW grid is the array's axes reversed, with the affine's columns to
match (the same voxels in the same places; MONAI's Orientation gives the same preprocessed grid).
:meth:`PlaneStream.plane` is a slice once it has arrived.

Nothing here raises on bad input. The stream decodes only what it can prove is what the whole-payload reader
would return; anything else (a header the reader refuses, a truncated or damaged stream, bytes beyond what the
header implies, NaN voxels, more than one file, the memory budget refusing the volume) stops it, ``failed`` says why
(for the log), and :meth:`PlaneStream.volume` returns None: the whole-payload reader then reads the upload, in its
decode worker, for its own answer or its own error and message.
"""

from __future__ import annotations

import logging
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from inference.errors import RadserveError
from inference.io.assembly import ExpectedGrid
from inference.io.base import check_modality
from inference.io.limits import InflateBudget, InputLimits, check_voxel_values
from inference.io.nifti import (
    HEADER_READ_BYTES,
    MAX_EXTENSION_BYTES,
    NiftiLayout,
    nifti_header,
    nifti_scaling,
    scaled_float32,
)
from inference.io.raw import raw_layout
from inference.io.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["NiftiPlaneStream", "PlaneStream", "RawPlaneStream"]

_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_STEP = 1024**2  # the most one zlib call may inflate


class PlaneStream(ABC):
    """A one-file payload in, as it arrives; its planes out (see the module docstring). ``reserve(n)`` is called
    before ``n`` more bytes of float32 planes are kept (the server's memory budget; it raises to refuse them)."""

    def __init__(self, limits: InputLimits, reserve: Callable[[int], None] | None = None) -> None:
        self.limits = limits
        self._reserve = reserve
        self.failed: str | None = None
        self.grid: ExpectedGrid | None = None
        self.voxels: np.ndarray | None = None  # the volume's float32 array, filled plane by plane
        self.planes_done = 0
        self._pending = bytearray()  # stored bytes short of a whole plane

    def feed(self, data: bytes) -> list[int]:
        """The payload's next bytes: the grid slices they complete (indices into ``grid``)."""
        if self.failed is not None:
            return []
        try:
            return self._feed(data)
        except (RadserveError, zlib.error) as exc:  # OverloadedError from reserve included
            self.fail(type(exc).__name__)
        except MemoryError:
            self.fail("no memory for the volume")
        except Exception as exc:  # a defect here: the whole-payload reader still answers (the fuzzer flags it)
            logger.warning("streamed decode failed unexpectedly (%s); the payload is read whole", type(exc).__name__)
            self.fail(f"unexpected {type(exc).__name__}")
        return []

    def fail(self, why: str) -> None:
        """Stop decoding (the whole-payload reader reads the upload instead). The planes converted stay readable
        (a slab read may be filling from them in another thread) until the stream is dropped with its read."""
        if self.failed is None:
            self.failed = why
            logger.debug("streamed decode stopped: %s", why)
        self._pending = bytearray()

    def plane(self, k: int) -> np.ndarray:
        """Grid slice ``k`` (columns, rows), once it has arrived."""
        return self._plane(self.voxels, k)

    @abstractmethod
    def _feed(self, data: bytes) -> list[int]: ...

    @abstractmethod
    def _plane(self, voxels: np.ndarray, k: int) -> np.ndarray: ...

    @abstractmethod
    def volume(self) -> Volume | None:
        """After the last byte: the Volume the whole-payload reader would return, or None (it must read it)."""

    def _allocate(self, shape: tuple[int, int, int], order: str, axis: int) -> None:
        """The volume's array; its pages are taken (and reserved in the budget) as planes are converted."""
        self.voxels = np.empty(shape, dtype=np.float32, order=order)
        self._plane_voxels = math.prod(shape) // shape[axis]

    def _planes(
        self,
        data: bytes | bytearray,
        n_planes: int,
        plane_bytes: int,
        convert: Callable[[bytes | bytearray, int, int], None],
    ) -> tuple[list[int], int]:
        """Append ``data`` to the pending bytes and convert every plane now complete (``convert(buffer, first,
        count)``); returns the planes converted and how many of ``data``'s bytes lie beyond the last plane."""
        wanted = (n_planes - self.planes_done) * plane_bytes - len(self._pending)
        beyond = max(len(data) - wanted, 0)
        self._pending += data[: len(data) - beyond] if beyond else data
        count = len(self._pending) // plane_bytes
        if not count:
            return [], beyond
        if self._reserve is not None:  # as they arrive, as a DICOM read's slices are: a header alone holds nothing
            self._reserve(4 * count * self._plane_voxels)
        first = self.planes_done
        convert(self._pending, first, count)
        del self._pending[: count * plane_bytes]
        self.planes_done += count
        return list(range(first, first + count)), beyond


class NiftiPlaneStream(PlaneStream):
    """A ``.nii`` or ``.nii.gz`` payload, z-slice by z-slice."""

    def __init__(self, modality: str, limits: InputLimits, reserve: Callable[[int], None] | None = None) -> None:
        super().__init__(limits, reserve)
        self.modality = modality
        self._gzip: bool | None = None  # known from the first two bytes
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the gzip container: header, CRC-32, length
        self._budget = InflateBudget(limits)
        self._decoded = 0  # bytes of the (inflated) file seen
        self._head = bytearray()
        self._layout: NiftiLayout | None = None
        self._affine: np.ndarray | None = None
        self._warning: str | None = None
        self._scaling: tuple[float | None, float | None] = (None, None)
        self._checks_values = False
        self._after_voxels = 0  # bytes after the voxels (read_nifti: ignored in a .nii, at most MAX_EXTENSION in gzip)

    def _feed(self, data: bytes) -> list[int]:
        if self._gzip is None:
            self._head += data
            if len(self._head) < 2:
                return []
            data, self._head = bytes(self._head), bytearray()
            self._gzip = data[:2] == _GZIP_MAGIC
        if not self._gzip:
            return self._file_bytes(data)
        placed: list[int] = []
        inflater = self._inflater
        while data and self.failed is None:
            if inflater.eof:  # a second gzip member, or bytes after the stream: read_nifti decides
                self.fail("bytes after the end of the gzip stream")
                break
            piece = inflater.decompress(data, _INFLATE_STEP)
            data = inflater.unconsumed_tail
            if piece:
                self._budget.spend(len(piece), "the NIfTI gzip stream")
                placed += self._file_bytes(piece)
        if inflater.eof and inflater.unused_data:
            self.fail("bytes after the end of the gzip stream")
        return placed if self.failed is None else []

    def _file_bytes(self, data: bytes) -> list[int]:
        """The (inflated) file's next bytes: the header, the extensions up to vox_offset, the voxels, the rest."""
        start, self._decoded = self._decoded, self._decoded + len(data)
        if self._layout is None:
            self._head += data
            if len(self._head) < HEADER_READ_BYTES:
                return []
            self._start(bytes(self._head[:HEADER_READ_BYTES]))
            data, start, self._head = bytes(self._head), 0, bytearray()
        layout = self._layout
        skip = max(layout.offset - start, 0)  # header and extensions
        if skip >= len(data):
            return []
        placed, beyond = self._planes(data[skip:], layout.shape[2], self._plane_bytes, self._convert)
        self._after_voxels += beyond
        if self._gzip and self._after_voxels > MAX_EXTENSION_BYTES:
            self.fail("the gzip stream continues after the voxels")
        return placed

    def _start(self, head: bytes) -> None:
        header, layout, affine, warning = nifti_header(head, self.limits)
        self._scaling = nifti_scaling(header)
        check_modality(self.modality)
        self._layout, self._affine, self._warning = layout, affine, warning
        self._checks_values = layout.dtype.kind == "f" or self._scaling[0] is not None
        self._plane_bytes = layout.shape[0] * layout.shape[1] * layout.dtype.itemsize
        self._allocate(layout.shape, "F", 2)  # as read_nifti returns it
        self.grid = ExpectedGrid(layout.shape, affine)

    def _convert(self, buffer: bytes | bytearray, first: int, count: int) -> None:
        layout = self._layout
        x, y, _ = layout.shape
        stored = np.frombuffer(buffer, dtype=layout.dtype, count=x * y * count).reshape((x, y, count), order="F")
        planes = scaled_float32(stored, *self._scaling)
        if self._checks_values:
            check_voxel_values(planes, "NIfTI image")
        self.voxels[:, :, first : first + count] = planes

    def _plane(self, voxels: np.ndarray, k: int) -> np.ndarray:
        return voxels[:, :, k]

    def volume(self) -> Volume | None:
        layout = self._layout
        if self.failed is not None or layout is None or self.planes_done < layout.shape[2]:
            return None
        if self._gzip and not (self._inflater.eof and not self._inflater.unused_data):
            return None  # truncated, or not one gzip member: read_nifti says which
        warnings = (self._warning,) if self._warning else ()
        return Volume(voxels=self.voxels, affine=self._affine, modality=self.modality, warnings=warnings)


class RawPlaneStream(PlaneStream):
    """A raw (X, Y, Z) C-order array, x-plane by x-plane; its grid is the array's axes reversed."""

    def __init__(
        self,
        *,
        dtype: str,
        shape: tuple[int, ...],
        affine: tuple[float, ...] | None,
        spacing_mm: tuple[float, ...] | None,
        modality: str,
        limits: InputLimits,
        reserve: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(limits, reserve)
        self.modality = modality
        self._description = (dtype, shape, affine, spacing_mm)
        self._started = False

    def _feed(self, data: bytes) -> list[int]:
        if not self._started:
            self._started = True
            self._start()
        placed, beyond = self._planes(data, self._shape[0], self._plane_bytes, self._convert)
        if beyond:
            self.fail("more bytes than the raw shape holds")
            return []
        return placed

    def _start(self) -> None:
        check_modality(self.modality)
        self._dtype, self._shape, self._affine = raw_layout(*self._description, self.limits)
        x, y, z = self._shape
        self._plane_bytes = y * z * self._dtype.itemsize
        self._allocate(self._shape, "C", 0)  # as read_raw returns it
        self.grid = ExpectedGrid((z, y, x), self._affine[:, [2, 1, 0, 3]])

    def _convert(self, buffer: bytes | bytearray, first: int, count: int) -> None:
        _, y, z = self._shape
        stored = np.frombuffer(buffer, dtype=self._dtype, count=count * y * z).reshape((count, y, z))
        planes = stored.astype(np.float32)
        if self._dtype.kind == "f":
            check_voxel_values(planes, "raw volume")
        self.voxels[first : first + count] = planes

    def _plane(self, voxels: np.ndarray, k: int) -> np.ndarray:
        return voxels[k].T  # grid slice k: (z, y), the reversed axes' columns and rows

    def volume(self) -> Volume | None:
        if self.failed is not None or not self._started or self.planes_done < self._shape[0]:
            return None
        return Volume(voxels=self.voxels, affine=self._affine, modality=self.modality)
