"""Input limits: how much a single read may upload and decode.

Every check runs before the work it guards: the file count and byte total before parsing, the voxel count
before decoding or allocating anything. Each raises :class:`LimitExceededError` (RESOURCE_EXHAUSTED) whose
message quotes both the offending value and the configured limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields

from inference.errors import LimitExceededError

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class InputLimits:
    """Per-request limits on uploads, checked by every reader before it decodes anything."""

    max_voxels: int = 512 * 512 * 1200  # voxels in the decoded volume (about 1.2 GB as float32)
    max_request_bytes: int = 2 * GIB  # all uploaded bytes of one request, compressed as sent
    max_files: int = 4000  # files (DICOM instances) in one request
    max_chunk_bytes: int = 4 * MIB  # one streamed chunk
    max_dimension: int = 8192  # voxels along any one axis

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"InputLimits.{f.name} must be a positive integer, got {value!r}")
        if self.max_chunk_bytes > self.max_request_bytes:
            raise ValueError(
                f"InputLimits.max_chunk_bytes ({self.max_chunk_bytes}) must not exceed "
                f"max_request_bytes ({self.max_request_bytes})"
            )
        if self.max_dimension > self.max_voxels:
            raise ValueError(
                f"InputLimits.max_dimension ({self.max_dimension}) must not exceed max_voxels ({self.max_voxels})"
            )

    def check_files(self, n_files: int) -> None:
        if n_files > self.max_files:
            raise LimitExceededError(f"request has {n_files} files; the limit is {self.max_files}")

    def check_request_bytes(self, n_bytes: int) -> None:
        if n_bytes > self.max_request_bytes:
            raise LimitExceededError(f"request has {n_bytes} bytes; the limit is {self.max_request_bytes} bytes")

    def check_chunk_bytes(self, n_bytes: int) -> None:
        if n_bytes > self.max_chunk_bytes:
            raise LimitExceededError(f"chunk has {n_bytes} bytes; the limit is {self.max_chunk_bytes} bytes")

    def check_shape(self, shape: Iterable[int], what: str = "volume") -> None:
        """Check each axis against ``max_dimension`` and the product against ``max_voxels``.

        Uses Python integers, so a header claiming 2**31 or more voxels cannot overflow the check.
        ``what`` names the thing being checked in the message, e.g. ``"NIfTI image"``.
        """
        dims = tuple(int(s) for s in shape)
        for axis, size in enumerate(dims):
            if size > self.max_dimension:
                raise LimitExceededError(
                    f"{what} has {size} voxels along axis {axis} (shape {dims}); "
                    f"the limit is {self.max_dimension} per axis"
                )
        n_voxels = math.prod(dims)
        if n_voxels > self.max_voxels:
            raise LimitExceededError(
                f"{what} has {n_voxels} voxels (shape {dims}); the limit is {self.max_voxels} voxels"
            )


DEFAULT_LIMITS = InputLimits()
