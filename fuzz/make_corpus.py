"""Write the fuzzer's seed corpus (fuzz/corpus/): one small valid input per target and a few near misses.

python -m fuzz.make_corpus    # rewrites fuzz/corpus/ (deterministic: the same bytes every time)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from fuzz.targets import FILE_SEPARATOR, encode_stream
from inference.api.gen.radserve.v1 import reading_pb2 as pb

CORPUS = Path(__file__).resolve().parent / "corpus"
UID = "1.2.826.0.1.3680043.10.996"


def dicom(k: int, *, syntax: str = ExplicitVRLittleEndian, size: int = 8, xray: bool = False) -> bytes:
    stored = (np.arange(size * size, dtype=np.uint16).reshape(size, size) * 7 + 1000 * k) % 4096
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation if xray else CTImageStorage
    meta.MediaStorageSOPInstanceUID = f"{UID}.1.{k}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax in (JPEG2000Lossless, RLELossless) else syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = f"{UID}.2", f"{UID}.3", 1
    ds.Modality = "DX" if xray else "CT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if xray:
        ds.ImagerPixelSpacing = [0.2, 0.2]
    else:
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.SliceThickness = 2.5
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.tobytes()
    if syntax in (JPEG2000Lossless, RLELossless):
        ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return out.getvalue()


def nifti(compressed: bool) -> bytes:
    image = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.diag([1.0, 1.2, 2.5, 1.0]))
    data = image.to_bytes()
    return gzip.compress(data, mtime=0) if compressed else data


def raw(dtype_index: int, shape: tuple[int, int, int], dtype: str) -> bytes:
    head = bytes([dtype_index, *(s - 1 for s in shape)]) + struct.pack("<3f", 1.0, 1.0, 2.5) + bytes([0])
    return head + np.arange(np.prod(shape), dtype=dtype).tobytes()


def seeds() -> dict[str, bytes]:
    series = FILE_SEPARATOR.join(dicom(k) for k in range(3))
    out = {
        "dicom-series": b"\x00" + series,
        "dicom-implicit": b"\x00" + dicom(0, syntax=ImplicitVRLittleEndian),
        "dicom-deflated": b"\x00" + dicom(0, syntax=DeflatedExplicitVRLittleEndian, size=64),
        "dicom-rle": b"\x00" + dicom(0, syntax=RLELossless),
        "dicom-xray": b"\x00" + dicom(0, xray=True, size=16),
        "dicom-truncated": b"\x00" + dicom(1)[:-40],
        "nifti": b"\x01" + nifti(False),
        "nifti-gz": b"\x01" + nifti(True),
        "raw-int16": b"\x02" + raw(1, (4, 3, 2), "<i2"),
        "raw-float32": b"\x02" + raw(4, (2, 2, 2), "<f4"),
    }
    with contextlib.suppress(Exception):  # no JPEG 2000 encoder installed: the other seeds still cover the reader
        out["dicom-j2k"] = b"\x00" + dicom(0, syntax=JPEG2000Lossless)
    header = pb.ReadHeader(payload=pb.DICOM_FILES, request_id="fuzz-1")
    chunks = [pb.ReadRequest(chunk=pb.Chunk(file_index=k, data=dicom(k))) for k in range(2)]
    out["stream-dicom"] = b"\x03" + encode_stream(pb.ReadRequest(header=header), *chunks)
    raw_header = pb.ReadHeader(
        payload=pb.RAW, modality="CT", raw=pb.RawArray(dtype="int16", shape=[4, 3, 2], spacing_mm=[1, 1, 2.5])
    )
    data = np.arange(24, dtype="<i2").tobytes()
    out["stream-raw"] = b"\x03" + encode_stream(
        pb.ReadRequest(header=raw_header), pb.ReadRequest(chunk=pb.Chunk(file_index=0, data=data))
    )
    nifti_header = pb.ReadHeader(payload=pb.NIFTI, modality="MR")
    out["stream-nifti"] = b"\x03" + encode_stream(
        pb.ReadRequest(header=nifti_header), pb.ReadRequest(chunk=pb.Chunk(file_index=0, data=nifti(True)))
    )
    return out


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.iterdir():
        old.unlink()
    for name, data in seeds().items():
        (CORPUS / f"{name}-{hashlib.sha1(data).hexdigest()[:8]}").write_bytes(data)
    print(f"{len(list(CORPUS.iterdir()))} seeds in {CORPUS}")


if __name__ == "__main__":
    main()
