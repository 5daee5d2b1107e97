"""read_dicom_series on tiny series built here, with geometry chosen by the test and checked by hand.

Each geometric test plants one bright pixel at a known (row, column) of a known slice and asserts that the
Volume's affine maps the voxel holding it to the LPS position computed directly from that slice's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing (DICOM PS3.3 C.7.6.2.1.1):

    P(r, c) = IPP + c * PixelSpacing[1] * IOP[0:3] + r * PixelSpacing[0] * IOP[3:6]
"""

from __future__ import annotations

import io
import logging
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from inference.errors import InvalidInputError, LimitExceededError, UnsupportedError
from inference.io import InputLimits, hash_uid, read_dicom_series

ROWS, COLS, N_SLICES = 24, 32, 8  # non-square, so a transposed image cannot pass
PIXEL_SPACING = (0.8, 0.6)  # (between rows, between columns) mm
STEP_MM = 2.5
BRIGHT_ROW, BRIGHT_COL, BRIGHT_SLICE = 5, 20, 6  # slice = position in the physical stack, 0 = first file built
BRIGHT_STORED = 3000
INTERCEPT = -1024.0

ROOT = "1.2.826.0.1.3680043.10.999"  # test UIDs; any patient data below is made up
STUDY_UID = f"{ROOT}.1"
SERIES_UID = f"{ROOT}.2"
FRAME_OF_REFERENCE_UID = f"{ROOT}.3"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def dicom_bytes(
    stored: np.ndarray,
    *,
    sop_uid: str,
    ipp: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
    iop: tuple[float, ...] | None = AXIAL,
    series_uid: str = SERIES_UID,
    series_number: int = 3,
    sop_class: str = CTImageStorage,
    syntax: str = ExplicitVRLittleEndian,
    drop: tuple[str, ...] = (),
    **attrs: object,
) -> bytes:
    """One Part 10 file: a 16-bit unsigned monochrome image with the given geometry and extra attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1  # deliberately useless for ordering
    ds.Modality = "CT"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.StudyDate = "20240102"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = list(PIXEL_SPACING)
    ds.SliceThickness = STEP_MM
    ds.RescaleSlope = 1
    ds.RescaleIntercept = INTERCEPT
    if ipp is not None:
        ds.ImagePositionPatient = [float(v) for v in ipp]
    if iop is not None:
        ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    for keyword in drop:
        del ds[keyword]
    if syntax == RLELossless:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, generate_instance_uid=False)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def slice_pixels(slice_number: int, bright: bool) -> np.ndarray:
    pixels = np.full((ROWS, COLS), 100 + slice_number, dtype=np.uint16)  # background tells slices apart
    if bright:
        pixels[BRIGHT_ROW, BRIGHT_COL] = BRIGHT_STORED
    return pixels


def directions(iop: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:])
    return row_dir, col_dir, np.cross(row_dir, col_dir)


def series(
    *,
    iop: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-20.0, 15.0, 40.0),
    step: np.ndarray | None = None,
    positions: list[np.ndarray] | None = None,
    shuffle_seed: int | None = None,
    **attrs: object,
) -> tuple[list[bytes], list[np.ndarray]]:
    """Files of one series, slice s at ``origin + s * step``; returns the files and each slice's IPP (by s)."""
    normal = directions(iop)[2]
    step = normal * STEP_MM if step is None else step
    if positions is None:
        positions = [np.asarray(origin) + s * step for s in range(N_SLICES)]
    files = [
        dicom_bytes(
            slice_pixels(s, s == BRIGHT_SLICE),
            sop_uid=f"{ROOT}.10.{s}",
            ipp=tuple(p),
            iop=iop,
            **attrs,
        )
        for s, p in enumerate(positions)
    ]
    if shuffle_seed is not None:
        order = list(range(len(files)))
        random.Random(shuffle_seed).shuffle(order)
        files = [files[i] for i in order]
    return files, positions


def expected_lps(iop: tuple[float, ...], ipp: np.ndarray, row: int, col: int) -> np.ndarray:
    row_dir, col_dir, _ = directions(iop)
    return ipp + col * PIXEL_SPACING[1] * row_dir + row * PIXEL_SPACING[0] * col_dir


def bright_voxel(volume) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(volume.voxels), volume.shape))


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = tuple(np.round(np.concatenate([rotation(0.3, -0.2, 0.5)[:, 0], rotation(0.3, -0.2, 0.5)[:, 1]]), 6))


# --- geometry -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "iop", "reverse", "shuffle_seed"),
    [
        ("axial", AXIAL, False, None),
        ("flipped row and column directions", (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), False, None),
        ("slices built against the normal", AXIAL, True, None),
        ("shuffled file order", AXIAL, False, 7),
        ("sagittal", (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), False, 3),
        ("coronal", (1.0, 0.0, 0.0, 0.0, 0.0, -1.0), True, 11),
        ("oblique", OBLIQUE, False, 5),
    ],
)
def test_marked_voxel_maps_to_hand_computed_lps(case, iop, reverse, shuffle_seed):
    normal = directions(iop)[2]
    step = -normal * STEP_MM if reverse else normal * STEP_MM
    files, positions = series(iop=iop, step=step, shuffle_seed=shuffle_seed)

    volume = read_dicom_series(files)

    assert volume.shape == (COLS, ROWS, N_SLICES)
    assert volume.modality == "CT"
    i, j, k = bright_voxel(volume)
    assert (i, j) == (BRIGHT_COL, BRIGHT_ROW), "voxels must be indexed [column, row, slice]"
    assert k == (N_SLICES - 1 - BRIGHT_SLICE if reverse else BRIGHT_SLICE)
    truth = expected_lps(iop, positions[BRIGHT_SLICE], BRIGHT_ROW, BRIGHT_COL)
    # DS values hold at most 16 characters, so positions and directions round-trip to about 1e-6.
    np.testing.assert_allclose(volume.voxel_to_lps([i, j, k])[0], truth, atol=1e-4)
    np.testing.assert_allclose(volume.lps_to_voxel(truth)[0], [i, j, k], atol=1e-4)
    # Every slice sits where its own IPP says, and carries that file's pixels.
    for kk in range(N_SLICES):
        s = N_SLICES - 1 - kk if reverse else kk
        np.testing.assert_allclose(volume.voxel_to_lps([0, 0, kk])[0], positions[s], atol=1e-4)
        assert volume.voxels[0, 0, kk] == 100 + s + INTERCEPT
    np.testing.assert_allclose(volume.spacing_mm, (PIXEL_SPACING[1], PIXEL_SPACING[0], STEP_MM), atol=1e-5)
    assert np.linalg.det(volume.affine[:3, :3]) > 0, "slices run along +normal, so the affine is right-handed"


def test_values_are_rescaled_float32():
    files, _ = series()
    volume = read_dicom_series(files)
    assert volume.voxels.dtype == np.float32
    assert volume.voxels.max() == BRIGHT_STORED + INTERCEPT


def test_rescale_slope_and_signed_pixels():
    stored = np.arange(ROWS * COLS, dtype=np.int16).reshape(ROWS, COLS) - 300
    data = dicom_bytes(
        stored.view(np.uint16), sop_uid=f"{ROOT}.20", PixelRepresentation=1, RescaleSlope=0.5, RescaleIntercept=-10
    )
    volume = read_dicom_series([data])
    np.testing.assert_array_equal(volume.voxels[:, :, 0], (stored * 0.5 - 10).T.astype(np.float32))


def test_enhanced_multiframe_sorts_frames_and_records_frame_numbers():
    rng = random.Random(5)
    frame_slices = list(range(N_SLICES))
    rng.shuffle(frame_slices)  # frame n holds physical slice frame_slices[n - 1]
    origin = np.array([10.0, -30.0, 5.0])
    iop = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal
    normal = directions(iop)[2]
    positions = [origin + s * STEP_MM * normal for s in range(N_SLICES)]

    ds_bytes = dicom_bytes(
        np.stack([slice_pixels(s, s == BRIGHT_SLICE) for s in frame_slices]),
        sop_uid=f"{ROOT}.30",
        sop_class=EnhancedCTImageStorage,
        ipp=None,
        iop=None,
        drop=("PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept"),
        NumberOfFrames=N_SLICES,
        SharedFunctionalGroupsSequence=DicomSequence(
            [
                _item(
                    PixelMeasuresSequence=DicomSequence(
                        [_item(PixelSpacing=list(PIXEL_SPACING), SliceThickness=STEP_MM)]
                    ),
                    PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=list(iop))]),
                    PixelValueTransformationSequence=DicomSequence(
                        [_item(RescaleSlope=1, RescaleIntercept=INTERCEPT, RescaleType="HU")]
                    ),
                )
            ]
        ),
        PerFrameFunctionalGroupsSequence=DicomSequence(
            [
                _item(PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=list(positions[s]))]))
                for s in frame_slices
            ]
        ),
    )
    volume = read_dicom_series([ds_bytes])

    i, j, k = bright_voxel(volume)
    assert (i, j, k) == (BRIGHT_COL, BRIGHT_ROW, BRIGHT_SLICE)
    truth = expected_lps(iop, positions[BRIGHT_SLICE], BRIGHT_ROW, BRIGHT_COL)
    np.testing.assert_allclose(volume.voxel_to_lps([i, j, k])[0], truth, atol=1e-6)
    images = volume.source.images
    assert [img.slice_index for img in images] == list(range(N_SLICES))
    assert [img.frame_number for img in images] == [frame_slices.index(s) + 1 for s in range(N_SLICES)]
    assert {img.sop_class_uid for img in images} == {EnhancedCTImageStorage}


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_source_refs_and_header():
    files, positions = series(shuffle_seed=2)
    volume = read_dicom_series(files)
    source = volume.source
    assert source.study_instance_uid == STUDY_UID
    assert source.series_instance_uid == SERIES_UID
    assert source.frame_of_reference_uid == FRAME_OF_REFERENCE_UID
    assert [img.sop_instance_uid for img in source.images] == [f"{ROOT}.10.{s}" for s in range(N_SLICES)]
    assert all(img.frame_number is None for img in source.images)
    assert "PixelData" not in source.header
    assert str(source.header.PatientName) == PATIENT_NAME
    nearest = volume.nearest_source_image(positions[4] + 0.4 * STEP_MM * np.array([0, 0, 1]))
    assert nearest.sop_instance_uid == f"{ROOT}.10.4"


def test_single_slice_steps_by_slice_thickness_or_1_mm():
    one = read_dicom_series([dicom_bytes(slice_pixels(0, True), sop_uid=f"{ROOT}.40", ipp=(1, 2, 3))])
    assert one.shape == (COLS, ROWS, 1)
    np.testing.assert_allclose(one.affine[:3, 2], [0, 0, STEP_MM])
    np.testing.assert_allclose(one.affine[:3, 3], [1, 2, 3])
    bare = read_dicom_series(
        [dicom_bytes(slice_pixels(0, True), sop_uid=f"{ROOT}.41", ipp=(1, 2, 3), drop=("SliceThickness",))]
    )
    np.testing.assert_allclose(bare.affine[:3, 2], [0, 0, 1.0])


def test_projection_xray_monochrome1_with_imager_pixel_spacing():
    stored = np.zeros((ROWS, COLS), dtype=np.uint16)
    stored[BRIGHT_ROW, BRIGHT_COL] = 4000  # bright in MONOCHROME1 means dark
    data = dicom_bytes(
        stored,
        sop_uid=f"{ROOT}.50",
        sop_class=DigitalXRayImageStorageForPresentation,
        ipp=None,
        iop=None,
        drop=("PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept", "FrameOfReferenceUID"),
        Modality="DX",
        PhotometricInterpretation="MONOCHROME1",
        ImagerPixelSpacing=[0.15, 0.2],
    )
    volume = read_dicom_series([data])
    assert volume.modality == "DX"
    assert volume.shape == (COLS, ROWS, 1)
    np.testing.assert_allclose(volume.affine, np.diag([0.2, 0.15, 1.0, 1.0]))
    assert volume.voxels[BRIGHT_COL, BRIGHT_ROW, 0] == 4095 - 4000
    assert volume.voxels[0, 0, 0] == 4095
    assert any("ImagerPixelSpacing" in w for w in volume.warnings)
    assert volume.source.frame_of_reference_uid is None


def test_tiny_shear_within_tolerance_is_kept_exactly():
    normal = np.array([0.0, 0.0, 1.0])
    step = normal * STEP_MM + np.array([0.0, 1.0, 0.0]) * STEP_MM * math.tan(math.radians(0.05))
    files, positions = series(step=step)
    volume = read_dicom_series(files)
    np.testing.assert_allclose(volume.affine[:3, 2], step, atol=1e-5)
    np.testing.assert_allclose(volume.voxel_to_lps([0, 0, N_SLICES - 1])[0], positions[-1], atol=1e-4)


def test_paths_rle_and_deflate_read_like_bytes(tmp_path: Path):
    plain, _ = series()
    reference = read_dicom_series(plain)
    for name, syntax in (("rle", RLELossless), ("deflate", DeflatedExplicitVRLittleEndian), ("implicit", None)):
        files, _ = series(syntax=syntax or ImplicitVRLittleEndian)
        paths = []
        for n, data in enumerate(files):
            path = tmp_path / f"{name}-{n}.dcm"
            path.write_bytes(data)
            paths.append(path)
        volume = read_dicom_series(paths)
        np.testing.assert_array_equal(volume.voxels, reference.voxels)
        np.testing.assert_array_equal(volume.affine, reference.affine)


def test_non_image_objects_are_skipped():
    files, _ = series()
    volume = read_dicom_series([_sr(), *files, _presentation_state()])
    assert volume.shape == (COLS, ROWS, N_SLICES)


def _sr() -> bytes:
    return _non_image(BasicTextSRStorage, "SR", f"{ROOT}.60")


def _presentation_state() -> bytes:
    return _non_image(GrayscaleSoftcopyPresentationStateStorage, "PR", f"{ROOT}.61")


def _non_image(sop_class: str, modality: str, uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, uid, modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, f"{ROOT}.62"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_series_selection_and_listing_without_uids():
    first, _ = series()
    other_uid = f"{ROOT}.70"
    second = [
        dicom_bytes(slice_pixels(0, False), sop_uid=f"{ROOT}.71", series_uid=other_uid, series_number=7),
    ]
    with pytest.raises(InvalidInputError) as err:
        read_dicom_series([*first, *second])
    message = err.value.message
    assert "series 3" in message and "series 7" in message
    assert hash_uid(SERIES_UID) in message and hash_uid(other_uid) in message
    assert SERIES_UID not in message and other_uid not in message

    assert read_dicom_series([*first, *second], series_instance_uid=other_uid).shape == (COLS, ROWS, 1)
    assert read_dicom_series([*first, *second], series_instance_uid=SERIES_UID).shape == (COLS, ROWS, N_SLICES)
    with pytest.raises(InvalidInputError, match=hash_uid(f"{ROOT}.999")):
        read_dicom_series(first, series_instance_uid=f"{ROOT}.999")


def test_hash_uid_is_twelve_hex_digits_and_stable():
    assert hash_uid(SERIES_UID) == hash_uid(SERIES_UID + "\0")
    assert len(hash_uid(SERIES_UID)) == 12
    int(hash_uid(SERIES_UID), 16)


def test_no_patient_data_or_uids_in_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="inference.io")
    files, _ = series()
    read_dicom_series([_sr(), *files])
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert text, "expected DEBUG records"
    for secret in (PATIENT_NAME, PATIENT_ID, "20240102", STUDY_UID, SERIES_UID, ROOT):
        assert secret not in text


# --- malformed input ----------------------------------------------------------------------------------------------


def test_not_dicom_names_the_file_index():
    files, _ = series()
    files[3] = b"this is a text file, not an image " * 8
    with pytest.raises(InvalidInputError, match=r"^file 3 is not a DICOM file"):
        read_dicom_series(files)


def test_empty_upload():
    with pytest.raises(InvalidInputError, match="no files"):
        read_dicom_series([])


def test_truncated_in_pixel_data():
    files, _ = series()
    files[2] = files[2][:-100]
    with pytest.raises(InvalidInputError, match=r"file 2 is truncated: PixelData declares 1536 bytes but 1436 follow"):
        read_dicom_series(files)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the cut values it reads
def test_cut_anywhere_in_the_header_is_invalid_input():
    good = dicom_bytes(slice_pixels(0, True), sop_uid=f"{ROOT}.80")
    header_end = len(good) - ROWS * COLS * 2
    for cut in range(0, header_end + 12):
        with pytest.raises(InvalidInputError, match="file 0"):
            read_dicom_series([good[:cut]])


def test_missing_pixel_data():
    files, _ = series()
    files[4] = dicom_bytes(slice_pixels(4, False), sop_uid=f"{ROOT}.10.4", drop=("PixelData",))
    with pytest.raises(InvalidInputError, match="file 4: PixelData missing"):
        read_dicom_series(files)


def test_pixel_data_length_mismatch():
    files, positions = series()
    files[1] = dicom_bytes(  # one row of pixels short; the header still says ROWS
        slice_pixels(1, False)[:-1], sop_uid=f"{ROOT}.10.1", ipp=tuple(positions[1]), Rows=ROWS
    )
    with pytest.raises(InvalidInputError, match=r"file 1: PixelData length mismatch: 1472 bytes, expected 1536"):
        read_dicom_series(files)


def test_bits_stored_exceeds_bits_allocated():
    files, _ = series()
    files[1] = dicom_bytes(slice_pixels(1, False), sop_uid=f"{ROOT}.10.1", BitsStored=17, HighBit=16)
    with pytest.raises(InvalidInputError, match=r"file 1: BitsStored \(17\) exceeds BitsAllocated \(16\)"):
        read_dicom_series(files)


def test_high_bit_inconsistent():
    data = dicom_bytes(slice_pixels(0, False), sop_uid=f"{ROOT}.83", HighBit=15)
    with pytest.raises(InvalidInputError, match=r"HighBit \(15\) must be BitsStored - 1 \(11\)"):
        read_dicom_series([data])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, r"file 3: PixelSpacing missing"),
        ([0.0, 0.6], r"file 3: PixelSpacing \[0, 0.6\] must be two numbers in the plausible range 0.001-100 mm"),
        ([-0.8, 0.6], r"file 3: PixelSpacing \[-0.8, 0.6\] must be two numbers in the plausible range"),
        (["nan", 0.6], r"file 3: PixelSpacing \[nan, 0.6\] must be two numbers in the plausible"),
        ([0.8], r"file 3: PixelSpacing has 1 values, expected 2"),
    ],
)
def test_bad_pixel_spacing_names_the_element(value, message):
    files, positions = series()
    kwargs = {"drop": ("PixelSpacing",)} if value is None else {"PixelSpacing": value}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about writing and reading 'nan' as DS
        files[3] = dicom_bytes(slice_pixels(3, False), sop_uid=f"{ROOT}.10.3", ipp=tuple(positions[3]), **kwargs)
        with pytest.raises(InvalidInputError, match=message):
            read_dicom_series(files)


def test_duplicate_slice_positions():
    files, positions = series()
    positions[5] = positions[4]
    files, _ = series(positions=positions)
    with pytest.raises(InvalidInputError, match=r"duplicate slice positions in series 3: file 4 and file 5"):
        read_dicom_series(files)


def test_missing_slice():
    files, _ = series()
    del files[4]
    with pytest.raises(
        InvalidInputError, match=r"1 slice missing in series 3: the gap between file 3 and file 4 is 5 mm"
    ):
        read_dicom_series(files)


def test_varying_spacing():
    z = [0.0, 2.5, 5.0, 7.5, 10.0, 13.5, 17.0, 20.5]
    files, _ = series(positions=[np.array([0.0, 0.0, v]) for v in z])
    with pytest.raises(InvalidInputError, match=r"slice spacing varies \(2.5 mm vs 3.5 mm\) in series 3"):
        read_dicom_series(files)


def test_tilted_stack_is_refused():
    normal = np.array([0.0, 0.0, 1.0])
    gantry = math.radians(15.0)
    step = (normal * math.cos(gantry) + np.array([0.0, 1.0, 0.0]) * math.sin(gantry)) * STEP_MM
    files, _ = series(step=step)
    with pytest.raises(UnsupportedError, match=r"series 3 is a tilted or sheared stack: slices advance 15.00 degrees"):
        read_dicom_series(files)


def test_slices_off_one_axis():
    files, positions = series()
    positions[3] = positions[3] + np.array([2.0, 0.0, 0.0])
    files, _ = series(positions=positions)
    with pytest.raises(InvalidInputError, match=r"do not lie on one axis: file 3 is"):
        read_dicom_series(files)


def test_orientation_differs_within_series():
    files, _ = series()
    files[6] = dicom_bytes(
        slice_pixels(6, False),
        sop_uid=f"{ROOT}.10.6",
        ipp=(-20, 15, 55),
        iop=(math.cos(0.05), math.sin(0.05), 0.0, -math.sin(0.05), math.cos(0.05), 0.0),
    )
    with pytest.raises(InvalidInputError, match=r"ImageOrientationPatient differs between file 0 and file 6"):
        read_dicom_series(files)


def test_orientation_not_orthonormal():
    data = dicom_bytes(slice_pixels(0, False), sop_uid=f"{ROOT}.84", iop=(1.0, 0.0, 0.0, 0.5, 1.0, 0.0))
    with pytest.raises(InvalidInputError, match=r"ImageOrientationPatient .* is not two orthogonal unit vectors"):
        read_dicom_series([data])


def test_zero_rescale_slope():
    data = dicom_bytes(slice_pixels(0, False), sop_uid=f"{ROOT}.85", RescaleSlope=0)
    with pytest.raises(InvalidInputError, match="file 0: RescaleSlope/RescaleIntercept: slope 0 is outside the"):
        read_dicom_series([data])


def test_missing_position_in_a_stack():
    files, _ = series()
    files[2] = dicom_bytes(slice_pixels(2, False), sop_uid=f"{ROOT}.10.2", ipp=None)
    with pytest.raises(InvalidInputError, match="file 2: ImagePositionPatient missing"):
        read_dicom_series(files)


def test_only_non_image_objects():
    with pytest.raises(InvalidInputError, match=r"no images, only 2 non-image objects"):
        read_dicom_series([_sr(), _presentation_state()])


def test_same_instance_twice():
    files, _ = series()
    with pytest.raises(InvalidInputError, match=r"file 0 and file 8 are the same instance"):
        read_dicom_series([*files, files[0]])


def test_colour_is_unsupported():
    rgb = dicom_bytes(
        np.zeros((ROWS, COLS * 3), dtype=np.uint16),
        sop_uid=f"{ROOT}.86",
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=0,
        Columns=COLS,
    )
    with pytest.raises(UnsupportedError, match="PhotometricInterpretation 'RGB' with SamplesPerPixel 3"):
        read_dicom_series([rgb])


def test_classic_multiframe_is_unsupported():
    data = dicom_bytes(np.zeros((2, ROWS, COLS), dtype=np.uint16), sop_uid=f"{ROOT}.87", NumberOfFrames=2)
    with pytest.raises(UnsupportedError, match="no per-frame functional groups"):
        read_dicom_series([data])


@pytest.mark.parametrize(
    ("syntax", "name"),
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
        ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
        ("1.2.3.4.5", "unknown syntax '1.2.3.4.5'"),
    ],
)
def test_transfer_syntax_without_decoder_is_unsupported(syntax, name):
    data = _encapsulated(syntax, b"\x00\x00\x01\xb3" + bytes(60))
    with pytest.raises(UnsupportedError, match=f"file 0: transfer syntax {name}"):
        read_dicom_series([data])


def test_undecodable_pixel_data_is_invalid_not_zeros():
    data = _encapsulated(JPEG2000Lossless, b"\xff\x4f\xff\x51" + bytes(60))
    with pytest.raises(InvalidInputError, match=r"file 0: pixel data could not be decoded \("):
        read_dicom_series([data])


def _encapsulated(syntax: str, fragment: bytes) -> bytes:
    """A file whose pixel data is one encapsulated fragment, written under the given transfer syntax."""
    plain = dicom_bytes(slice_pixels(0, False), sop_uid=f"{ROOT}.88")
    ds = dcmread(io.BytesIO(plain))
    # pydicom refuses to write a standard-looking UID it does not know as a transfer syntax (JPEG XL is newer
    # than its dictionary): write under MPEG2, whose UID has the same length, and swap the UID bytes after.
    placeholder = "1.2.840.10008.1.2.4.100"
    known = UID(syntax).is_transfer_syntax or UID(syntax).is_private
    assert known or len(syntax) == len(placeholder)
    ds.file_meta.TransferSyntaxUID = UID(syntax if known else placeholder)
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    data = buf.getvalue()
    return data if known else data.replace(placeholder.encode(), syntax.encode(), 1)


# --- limits -------------------------------------------------------------------------------------------------------


def test_limits_files_bytes_voxels_dimension():
    files, _ = series()
    with pytest.raises(LimitExceededError, match=r"request has 8 files; the limit is 4"):
        read_dicom_series(files, limits=InputLimits(max_files=4))
    with pytest.raises(LimitExceededError, match=r"the limit is 10000 bytes"):
        read_dicom_series(files, limits=InputLimits(max_request_bytes=10_000, max_chunk_bytes=1000))
    with pytest.raises(LimitExceededError, match=r"series 3 has 6144 voxels .* the limit is 5000 voxels"):
        read_dicom_series(files, limits=InputLimits(max_voxels=5000, max_dimension=100))
    with pytest.raises(LimitExceededError, match=r"file 0 has 32 voxels along axis 0 .* the limit is 30 per axis"):
        read_dicom_series(files, limits=InputLimits(max_dimension=30))


def test_voxel_limit_is_checked_before_decoding(monkeypatch):
    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded pixels before checking the voxel limit")

    monkeypatch.setattr("inference.io.dicom.decode._decode", no_decoding)
    files, _ = series()
    with pytest.raises(LimitExceededError):
        read_dicom_series(files, limits=InputLimits(max_voxels=5000, max_dimension=100))


def test_deflate_bomb_is_refused_before_inflating_it_all():
    stored = np.zeros((512, 512), dtype=np.uint16)
    bomb = dicom_bytes(stored, sop_uid=f"{ROOT}.90", syntax=DeflatedExplicitVRLittleEndian)
    assert len(bomb) < 10_000
    limits = InputLimits(max_inflated_bytes=100_000)
    with pytest.raises(
        LimitExceededError,
        match=r"the deflated data sets of the upload \(up to file 0\) inflate to more than 100000 bytes, the "
        r"max_inflated_bytes limit per read",
    ):
        read_dicom_series([bomb], limits=limits)
