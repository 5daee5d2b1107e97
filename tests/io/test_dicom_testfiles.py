"""read_dicom_series on real files no one here wrote: the test data shipped inside pydicom.

Only files already on disk are used. pydicom downloads some test files on demand; there is no network here, so
those tests skip (``get_testdata_file(..., download=False)`` returns None) and say why.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGLSNearLossless

from inference.errors import InvalidInputError, UnsupportedError
from inference.io import hash_uid, read_dicom_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about oddities in its test data


def data_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not on disk (pydicom downloads it on demand and there is no network here)")
    return Path(path)


def dicomdir_series(relative: str) -> list[Path]:
    folder = data_file("CT_small.dcm").parent / "dicomdirtests" / relative
    if not folder.is_dir():
        pytest.skip(f"pydicom test folder dicomdirtests/{relative} is not on disk")
    return sorted(p for p in folder.iterdir() if p.is_file())


def reference_voxels(path: Path) -> np.ndarray:
    """pydicom's own decode, rescaled and transposed to [column, row]: what the Volume must hold."""
    ds = pydicom.dcmread(path)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (ds.pixel_array.astype(np.float64) * slope + intercept).T.astype(np.float32)


def test_ct_small_is_a_one_slice_volume_with_hand_computed_geometry():
    path = data_file("CT_small.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    volume = read_dicom_series([path])

    assert volume.modality == "CT"
    assert volume.shape == (ds.Columns, ds.Rows, 1)
    row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    r, c = 17, 101
    truth = ipp + c * float(ds.PixelSpacing[1]) * row_dir + r * float(ds.PixelSpacing[0]) * col_dir
    np.testing.assert_allclose(volume.voxel_to_lps([c, r, 0])[0], truth, atol=1e-6)
    np.testing.assert_allclose(volume.affine[:3, 2], np.cross(row_dir, col_dir) * float(ds.SliceThickness))
    np.testing.assert_array_equal(volume.voxels[:, :, 0], reference_voxels(path))
    assert volume.source.study_instance_uid == ds.StudyInstanceUID
    assert volume.source.series_instance_uid == ds.SeriesInstanceUID
    assert volume.source.images[0].sop_instance_uid == ds.SOPInstanceUID
    assert "PixelData" not in volume.source.header


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_lossless_variants_decode_to_the_uncompressed_original(variant):
    original = read_dicom_series([data_file("MR_small.dcm")])
    volume = read_dicom_series([data_file(variant)])
    np.testing.assert_array_equal(volume.voxels, original.voxels)
    np.testing.assert_array_equal(volume.affine, original.affine)


@pytest.mark.parametrize(
    ("compressed", "original"),
    [
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("CT1_J2KR.dcm", "CT1_UNCR.dcm"),
    ],
)
def test_downloadable_lossless_pairs(compressed, original):
    a = read_dicom_series([data_file(compressed)])
    b = read_dicom_series([data_file(original)])
    np.testing.assert_array_equal(a.voxels, b.voxels)


@pytest.mark.parametrize(
    ("compressed", "original", "max_rms_fraction"),
    [
        ("693_J2KI.dcm", "693_UNCI.dcm", 0.05),
        ("MR2_J2KI.dcm", "MR2_UNCI.dcm", 0.05),
        ("RG1_J2KI.dcm", "RG1_UNCI.dcm", 0.05),
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm", 0.05),
    ],
)
def test_downloadable_lossy_pairs(compressed, original, max_rms_fraction):
    a = read_dicom_series([data_file(compressed)]).voxels
    b = read_dicom_series([data_file(original)]).voxels
    rms = float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))
    assert rms <= max_rms_fraction * float(np.ptp(b))


def _recompressed(name: str, syntax: str, **options: object) -> bytes:
    ds = pydicom.dcmread(data_file(name))
    ds.compress(syntax, generate_instance_uid=False, **options)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_jpeg_ls_near_lossless_stays_within_its_error_bound():
    """JPEG-LS near-lossless guarantees |error| <= NEAR per pixel; encoded here from a real original."""
    original = read_dicom_series([data_file("MR_small.dcm")])
    volume = read_dicom_series([_recompressed("MR_small.dcm", JPEGLSNearLossless, jls_error=3)])
    error = np.abs(volume.voxels - original.voxels)
    assert 0 < error.max() <= 3
    assert any("lossy" in w for w in volume.warnings)


def test_jpeg2000_lossy_is_close_to_the_original():
    original = read_dicom_series([data_file("MR_small.dcm")]).voxels.astype(np.float64)
    volume = read_dicom_series([_recompressed("MR_small.dcm", JPEG2000, j2k_cr=[20])])
    rms = float(np.sqrt(np.mean((volume.voxels - original) ** 2)))
    assert 0 < rms < 0.05 * np.ptp(original)


def test_two_independent_lossy_encodings_of_one_nm_image_agree():
    """JPGExtended.dcm (JPEG 12-bit, 76:1) and JPEG2000.dcm (J2K irreversible) hold the same NM acquisition."""
    jpeg = read_dicom_series([data_file("JPGExtended.dcm")])
    j2k = read_dicom_series([data_file("JPEG2000.dcm")])
    assert jpeg.shape == j2k.shape == (256, 1024, 1)
    np.testing.assert_allclose(jpeg.affine, j2k.affine)
    a, b = jpeg.voxels.ravel().astype(np.float64), j2k.voxels.ravel().astype(np.float64)
    assert np.corrcoef(a, b)[0, 1] > 0.9
    assert abs(a.mean() - b.mean()) < 2.0


@pytest.mark.parametrize("name", ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "examples_overlay.dcm"])
def test_real_images_match_pydicoms_own_decode(name):
    path = data_file(name)
    volume = read_dicom_series([path])
    np.testing.assert_array_equal(volume.voxels[:, :, 0], reference_voxels(path))


def test_real_ct_series_is_sorted_along_the_normal():
    files = dicomdir_series("98892001/CT5N")  # five 16x16 slices, written in descending z
    volume = read_dicom_series(files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    by_z = sorted(zip(headers, files, strict=True), key=lambda hf: float(hf[0].ImagePositionPatient[2]))
    assert volume.shape == (16, 16, 5)
    for k, (ds, path) in enumerate(by_z):
        np.testing.assert_allclose(volume.voxel_to_lps([0, 0, k])[0], [float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_array_equal(volume.voxels[:, :, k], reference_voxels(path))
        assert volume.source.images[k].sop_instance_uid == ds.SOPInstanceUID
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 2.5], atol=1e-6)


def test_real_series_with_a_far_slice_reports_missing_slices():
    with pytest.raises(InvalidInputError, match=r"161 slices missing in series 2"):
        read_dicom_series(dicomdir_series("77654033/CT2"))


def test_real_radial_mr_stack_is_not_one_orientation():
    with pytest.raises(InvalidInputError, match=r"ImageOrientationPatient differs .* in series 700"):
        read_dicom_series(dicomdir_series("98892003/MR700"))


def test_real_cr_uses_imager_pixel_spacing_and_inverts_monochrome1():
    path = dicomdir_series("77654033/CR1")[0]
    ds = pydicom.dcmread(path)
    volume = read_dicom_series([path])
    assert volume.modality == "CR"
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    top = (1 << ds.BitsStored) - 1  # unsigned: stored values 0..top, inverted so that larger means brighter
    inverted = (top - ds.pixel_array.astype(np.float64)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(volume.voxels[:, :, 0], inverted.T, rtol=1e-6)
    np.testing.assert_allclose(np.diag(volume.affine)[:2], [float(v) for v in ds.ImagerPixelSpacing][::-1])
    assert any("ImagerPixelSpacing" in w for w in volume.warnings)


def test_real_mixed_upload_lists_series_without_uids():
    ct, mr = data_file("CT_small.dcm"), data_file("MR_small.dcm")
    with pytest.raises(InvalidInputError) as err:
        read_dicom_series([ct, mr])
    for path in (ct, mr):
        uid = pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID
        assert hash_uid(uid) in err.value.message
        assert uid not in err.value.message
    mr_uid = pydicom.dcmread(mr, stop_before_pixels=True).SeriesInstanceUID
    assert read_dicom_series([ct, mr], series_instance_uid=mr_uid).modality == "MR"


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("MR_truncated.dcm", InvalidInputError, r"file 0 is truncated: PixelData declares 8192 bytes but 8130"),
        ("no_meta.dcm", InvalidInputError, r"file 0 is not a DICOM file"),
        ("rtstruct.dcm", InvalidInputError, r"file 0 is not a DICOM file"),  # no Part 10 preamble
        ("image_dfl.dcm", InvalidInputError, r"file 0: PixelSpacing \(and ImagerPixelSpacing\) missing"),
        ("SC_rgb_jpeg.dcm", UnsupportedError, r"PhotometricInterpretation 'RGB'"),
        ("examples_palette.dcm", UnsupportedError, r"PhotometricInterpretation 'PALETTE COLOR'"),
        # libjpeg rejects this file's scan header; python-gdcm would decode it.
        ("JPEG-lossy.dcm", InvalidInputError, r"file 0: pixel data could not be decoded \(.*libjpeg"),
    ],
)
def test_real_problem_files(name, error, message):
    with pytest.raises(error, match=message):
        read_dicom_series([data_file(name)])


def test_pixel_data_padded_beyond_its_length_is_read_as_pydicom_reads_it():
    """MR_small_padded.dcm: 8320 bytes of PixelData for 64 x 64 16-bit pixels (8192); pydicom drops the excess."""
    padded = read_dicom_series([data_file("MR_small_padded.dcm")])
    plain = pydicom.dcmread(data_file("MR_small_padded.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the excess padding it removes
        expected = plain.pixel_array.T.astype(np.float32) * float(plain.get("RescaleSlope", 1)) + float(
            plain.get("RescaleIntercept", 0)
        )
    assert padded.shape == (64, 64, 1)
    np.testing.assert_array_equal(padded.voxels[:, :, 0], expected)


def test_real_non_image_objects_only():
    names = ["reportsi.dcm", "test-SR.dcm", "rtplan.dcm", "rtdose.dcm", "liver_1frame.dcm"]
    with pytest.raises(InvalidInputError, match=r"no images, only 5 non-image objects"):
        read_dicom_series([data_file(n) for n in names])


def test_non_image_objects_next_to_a_real_image_are_skipped():
    volume = read_dicom_series([data_file("rtdose.dcm"), data_file("CT_small.dcm"), data_file("test-SR.dcm")])
    assert volume.shape == (128, 128, 1)


def test_missing_codec_is_unsupported_and_names_the_syntax(monkeypatch):
    """Simulate an install without JPEG 2000 plugins (no pylibjpeg-openjpeg, Pillow or GDCM)."""
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(
        UnsupportedError, match=r"file 0: transfer syntax JPEG 2000 Image Compression \(Lossless Only\)"
    ):
        read_dicom_series([data_file("MR_small_jp2klossless.dcm")])
