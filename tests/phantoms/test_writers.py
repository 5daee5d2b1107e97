"""Files written from a phantom read back with pydicom / nibabel to the same geometry and values."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import uid

from inference.io.volume import Volume
from inference.phantoms import Phantom, make_chest_ct, write_dicom_multiframe, write_dicom_series, write_nifti

SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEG2000Lossless,
    uid.JPEGLSLossless,
]


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """Non-square matrix and pixels, flipped rows and slices: swaps of any two conventions show up."""
    return make_chest_ct(
        11,
        shape=(48, 40, 12),
        pixel_spacing_mm=(0.7, 0.9),  # row spacing, column spacing
        slice_spacing_mm=2.5,
        row_direction=(-1, 0, 0),
        column_direction=(0, 1, 0),
        slice_direction_sign=-1,
        origin_mm=(30.0, -12.0, 75.0),
        n_nodules=0,
    )


def affine_from_headers(datasets: list[pydicom.Dataset]) -> np.ndarray:
    """The voxel -> LPS affine rebuilt from IOP, PixelSpacing and the IPPs of slices 0 and 1."""
    first, second = datasets[0], datasets[1]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * column_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 2] = np.subtract(second.ImagePositionPatient, first.ImagePositionPatient, dtype=float)
    affine[:3, 3] = np.asarray(first.ImagePositionPatient, dtype=float)
    return affine


def sort_along(datasets: list[pydicom.Dataset], step_mm: np.ndarray) -> list[pydicom.Dataset]:
    """Order by ImagePositionPatient along ``step_mm``, ignoring file names and InstanceNumber."""
    return sorted(datasets, key=lambda ds: float(np.dot(step_mm, np.asarray(ds.ImagePositionPatient, dtype=float))))


def hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=lambda s: s.name)
def test_series_round_trips_geometry_and_hu(phantom, tmp_path, syntax):
    volume = phantom.volume
    paths = write_dicom_series(phantom, tmp_path, transfer_syntax=syntax, shuffle=np.random.default_rng(0))
    assert len(paths) == volume.shape[2] == len(list(tmp_path.glob("*.dcm")))
    datasets = [pydicom.dcmread(p) for p in sorted(tmp_path.glob("*.dcm"))]

    ordered = sort_along(datasets, volume.affine[:3, 2])
    assert np.allclose(affine_from_headers(ordered), volume.affine, atol=1e-6)
    for k, ds in enumerate(ordered):
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.SOPClassUID == uid.CTImageStorage and ds.Modality == "CT"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Rows, ds.Columns) == (volume.shape[1], volume.shape[0])
        assert float(ds.SliceThickness) == pytest.approx(2.5)
        expected_ipp = volume.affine @ np.array([0.0, 0.0, k, 1.0])
        assert np.allclose(np.asarray(ds.ImagePositionPatient, dtype=float), expected_ipp[:3], atol=1e-6)
        assert np.abs(hu(ds) - volume.voxels[:, :, k].T).max() <= 0.5 + 1e-3
        assert pydicom.dcmread(paths[k]).SOPInstanceUID == ds.SOPInstanceUID  # paths come back in slice order
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert len({ds.data_element(keyword).value for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert float(datasets[0].RescaleIntercept) == -1024 and datasets[0].PixelRepresentation == 1


def test_planted_nodule_is_at_its_center_in_the_written_files(tmp_path):
    phantom = make_chest_ct(
        4, shape=(96, 96, 30), slice_spacing_mm=2.0, nodule_diameters_mm=[10.0], row_direction=(-1, 0, 0)
    )
    write_dicom_series(phantom, tmp_path, shuffle=True)
    datasets = [pydicom.dcmread(p) for p in tmp_path.glob("*.dcm")]
    center = np.asarray(phantom.lesions[0].center_mm)
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, dtype=float), (2, 3)))
    # The slice nearest the nodule, found from the headers alone, then the pixel nearest it in that slice.
    ds = min(datasets, key=lambda d: abs(np.dot(normal, center - np.asarray(d.ImagePositionPatient, dtype=float))))
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    offset = center - np.asarray(ds.ImagePositionPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    column = round(float(np.dot(offset, iop[:3])) / column_spacing)
    row = round(float(np.dot(offset, iop[3:])) / row_spacing)
    assert hu(ds)[row, column] > -200


def test_shuffle_scrambles_names_and_instance_numbers(phantom, tmp_path):
    plain = write_dicom_series(phantom, tmp_path / "plain")
    assert [p.name for p in plain] == sorted(p.name for p in plain)
    assert [pydicom.dcmread(p).InstanceNumber for p in plain] == list(range(1, len(plain) + 1))

    shuffled = write_dicom_series(phantom, tmp_path / "shuffled", shuffle=np.random.default_rng(3))
    assert [p.name for p in shuffled] != sorted(p.name for p in shuffled)
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in shuffled]
    assert numbers != list(range(1, len(shuffled) + 1)) and sorted(numbers) == list(range(1, len(shuffled) + 1))


def test_given_uids_and_patient_are_used(phantom, tmp_path):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = write_dicom_series(
        phantom,
        tmp_path,
        series_number=7,
        study_instance_uid=study,
        series_instance_uid=series,
        patient_name="DOE^JANE",
        patient_id="P-42",
        file_prefix="ct",
    )
    ds = pydicom.dcmread(paths[0])
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber) == (study, series, 7)
    assert (str(ds.PatientName), ds.PatientID) == ("DOE^JANE", "P-42")
    assert paths[0].name.startswith("ct_")


def test_mr_volume_is_written_as_mr(tmp_path):
    voxels = np.arange(16 * 12 * 3, dtype=np.float32).reshape(16, 12, 3)
    volume = Volume(voxels=voxels, affine=np.diag([1.2, 1.1, 4.0, 1.0]), modality="MR")
    paths = write_dicom_series(volume, tmp_path)
    ds = pydicom.dcmread(paths[2])
    assert ds.SOPClassUID == uid.MRImageStorage and ds.Modality == "MR"
    assert np.array_equal(hu(ds), voxels[:, :, 2].T)


def test_unsupported_transfer_syntax_is_refused(phantom, tmp_path):
    with pytest.raises(ValueError, match="cannot write transfer syntax"):
        write_dicom_series(phantom, tmp_path, transfer_syntax=uid.JPEGBaseline8Bit)


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless], ids=lambda s: s.name)
def test_enhanced_multiframe_round_trips(phantom, tmp_path, syntax):
    volume = phantom.volume
    path = write_dicom_multiframe(phantom, tmp_path / "enhanced.dcm", transfer_syntax=syntax)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == uid.EnhancedCTImageStorage and int(ds.NumberOfFrames) == volume.shape[2]
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    assert np.allclose(iop[:3] * column_spacing, volume.affine[:3, 0])
    assert np.allclose(iop[3:] * row_spacing, volume.affine[:3, 1])
    transform = shared.PixelValueTransformationSequence[0]
    frames = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ipp = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        assert np.allclose(ipp, (volume.affine @ [0.0, 0.0, k, 1.0])[:3], atol=1e-6)
        assert np.abs(frames[k] - volume.voxels[:, :, k].T).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("name", ["phantom.nii", "phantom.nii.gz"])
def test_nifti_round_trips(phantom, tmp_path, name):
    path = write_nifti(phantom.volume, tmp_path / name)
    image = nib.load(path)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    assert np.allclose(lps, phantom.volume.affine, atol=1e-5)
    assert np.array_equal(np.asanyarray(image.dataobj), phantom.volume.voxels)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    assert np.allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.get_qform(), phantom.volume.affine, atol=1e-5)


def test_nifti_needs_a_nifti_suffix(phantom, tmp_path: Path):
    with pytest.raises(ValueError, match=r"\.nii"):
        write_nifti(phantom, tmp_path / "phantom.img")
