"""The chest radiograph phantom against its planted truth, and its DX / CR DICOM files read back with pydicom."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from inference.phantoms import (
    ChestXrayPhantom,
    make_chest_xray,
    render_chest_xray,
    sample_chest_xray_params,
    write_xray_dicom,
)
from inference.phantoms.chest_xray import (
    FOV_RANGE_MM,
    OPACITY_DIAMETER_RANGE_MM,
    PIXEL_SPACING_RANGE_MM,
    SIZE_RANGE_PX,
    PixelGrid,
)

SMALL = (1024, 1152)  # (rows, columns): the smallest drawn size, fast to render


def image(phantom: ChestXrayPhantom) -> np.ndarray:
    """(rows, columns), as displayed."""
    return phantom.volume.voxels[:, :, 0].T


@pytest.mark.parametrize("seed", range(4))
def test_opacities_are_where_the_truth_says(seed):
    """The noise-free difference the opacities make is centered on each planted center, as wide as its diameter."""
    params = replace(
        sample_chest_xray_params(seed, size_px=SMALL, opacity_diameters_mm=[9.0, 16.0, 30.0]), noise_sigma=0.0
    )
    with_opacities = image(render_chest_xray(params)).astype(np.float64)
    without = image(render_chest_xray(replace(params, opacities=()))).astype(np.float64)
    difference = with_opacities - without
    spacing_row, spacing_col = params.pixel_spacing_mm
    rows, cols = np.indices(difference.shape)
    x_mm, y_mm = cols * spacing_col, rows * spacing_row  # pixel centers, from the center of the top-left pixel
    phantom = render_chest_xray(params)
    assert [lesion.label for lesion in phantom.lesions] == ["opacity"] * 3
    for lesion in phantom.lesions:
        cx, cy = lesion.center_mm
        radius = lesion.diameter_mm / 2
        distance = np.hypot(x_mm - cx, y_mm - cy)
        mine = distance < radius + 1.0
        weights = np.clip(difference, 0, None) * mine
        assert weights.sum() > 0
        centroid = np.array([(weights * x_mm).sum(), (weights * y_mm).sum()]) / weights.sum()
        assert np.hypot(*(centroid - (cx, cy))) < max(spacing_row, spacing_col), lesion
        covered = distance[(difference > 0) & mine]
        assert abs(covered.max() - radius) < 2 * max(spacing_row, spacing_col), lesion  # the disc reaches the rim
        # Brighter than its surroundings in the MONOCHROME2-sense voxels, and darker lung around it.
        ring = (distance > radius + 2.0) & (distance < radius + 4.0)
        assert with_opacities[distance < 0.3 * radius].mean() > without[ring].mean() + 0.05 * without.std()
    # Nothing changes away from the opacities.
    far = np.ones_like(difference, dtype=bool)
    for lesion in phantom.lesions:
        far &= np.hypot(x_mm - lesion.center_mm[0], y_mm - lesion.center_mm[1]) > lesion.diameter_mm / 2 + 1.0
    assert np.all(difference[far] == 0)


@pytest.mark.parametrize("seed", range(6))
def test_opacities_lie_in_the_lung_fields_apart(seed):
    params = sample_chest_xray_params(seed, size_px=SMALL, n_opacities=3)
    for n, opacity in enumerate(params.opacities):
        center, radius = np.asarray(opacity.center_mm), opacity.diameter_mm / 2
        assert OPACITY_DIAMETER_RANGE_MM[0] <= opacity.diameter_mm <= OPACITY_DIAMETER_RANGE_MM[1]
        assert min(float(lung.normalized_radius(*center)) for lung in params.lungs) < 1.0
        assert float(params.heart.normalized_radius(*center)) > 1.0
        assert abs(center[0] - params.midline_mm) > params.mediastinum_half_width_mm + radius
        for other in params.opacities[n + 1 :]:
            assert np.hypot(*(center - other.center_mm)) > radius + other.diameter_mm / 2


def test_lungs_are_darker_than_soft_tissue_and_mediastinum_brighter():
    params = sample_chest_xray_params(5, size_px=SMALL, n_opacities=0, photometric="MONOCHROME1")
    pixels = image(render_chest_xray(params))
    spacing_row, spacing_col = params.pixel_spacing_mm

    def at(x_mm: float, y_mm: float) -> float:
        r, c = round(y_mm / spacing_row), round(x_mm / spacing_col)
        return float(np.median(pixels[r - 3 : r + 4, c - 3 : c + 4]))

    lung = params.lungs[0]  # image left: patient right, away from the heart
    (lung_x, lung_y), (_, lung_semi_y) = lung.center_mm, lung.semi_axes_mm
    lung_value = at(lung_x, lung_y)
    tissue_value = at(lung_x, lung_y + lung_semi_y + 0.08 * params.field_of_view_mm[1])  # abdomen, below the lung
    mediastinum_value = at(params.midline_mm, lung_y - 0.5 * lung_semi_y)
    assert lung_value < tissue_value < mediastinum_value  # MONOCHROME2 sense, whatever the stored photometric


@pytest.mark.parametrize("seed", range(25))
def test_drawn_parameters_respect_the_ranges(seed):
    params = sample_chest_xray_params(seed)
    rows, cols = params.size_px
    assert SIZE_RANGE_PX[0] <= rows <= SIZE_RANGE_PX[1] and SIZE_RANGE_PX[0] <= cols <= SIZE_RANGE_PX[1]
    assert params.pixel_spacing_mm[0] == params.pixel_spacing_mm[1]
    assert PIXEL_SPACING_RANGE_MM[0] <= params.pixel_spacing_mm[0] <= PIXEL_SPACING_RANGE_MM[1]
    assert all(FOV_RANGE_MM[0] - 1e-6 <= f <= FOV_RANGE_MM[1] + 1e-6 for f in params.field_of_view_mm)
    assert 0 <= len(params.opacities) <= 3
    assert params.modality in ("DX", "CR") and params.photometric in ("MONOCHROME1", "MONOCHROME2")
    assert params.bits_stored in (12, 16)
    assert 0 <= params.value_low < params.value_high <= params.max_value


@pytest.mark.parametrize("bits", [12, 16])
def test_values_are_unsigned_integers_of_the_stored_bits(bits):
    phantom = make_chest_xray(3, size_px=SMALL, bits_stored=bits)
    pixels = image(phantom)
    assert pixels.dtype == np.float32
    assert pixels.min() >= 0 and pixels.max() <= 2**bits - 1
    assert np.all(pixels == np.rint(pixels))
    assert pixels.max() > 0.4 * (2**bits - 1)  # the range is used, not a sliver of it


def test_volume_geometry_follows_the_projection_contract():
    phantom = make_chest_xray(1, size_px=(1100, 1300), pixel_spacing_mm=(0.15, 0.125), modality="CR")
    volume = phantom.volume
    assert volume.shape == (1300, 1100, 1)  # (X = columns, Y = rows, 1)
    assert volume.modality == "CR"
    assert volume.spacing_mm[:2] == pytest.approx((0.125, 0.15))  # column spacing on axis 0, row spacing on axis 1
    # The affine maps pixel (column, row) to image-plane mm from the center of the top-left pixel.
    assert volume.voxel_to_lps([[10, 20, 0]])[0, :2] == pytest.approx((10 * 0.125, 20 * 0.15))


def test_same_seed_same_phantom_and_the_grid_only_resamples():
    a, b = make_chest_xray(7, size_px=SMALL), make_chest_xray(7, size_px=SMALL)
    assert np.array_equal(a.volume.voxels, b.volume.voxels) and a.lesions == b.lesions
    params = replace(sample_chest_xray_params(7, size_px=SMALL, n_opacities=2), noise_sigma=0.0)
    full = image(render_chest_xray(params))
    coarse_grid = PixelGrid(
        shape=(SMALL[0] // 8, SMALL[1] // 8), spacing_mm=tuple(8 * s for s in params.pixel_spacing_mm)
    )
    coarse = image(render_chest_xray(params, coarse_grid))
    assert np.array_equal(coarse, full[::8, ::8])  # the same anatomy, sampled at the coarse grid's pixel centers


def test_typical_phantom_is_fast():
    make_chest_xray(0, size_px=(256, 256))  # warm-up
    start = time.process_time()  # CPU time: robust to other jobs on the machine
    make_chest_xray(2, size_px=(2048, 2048), n_opacities=3)
    assert time.process_time() - start < 1.5  # ~0.5 s on one core


def test_impossible_requests_raise():
    with pytest.raises(ValueError, match="could not place"):
        make_chest_xray(0, size_px=SMALL, pixel_spacing_mm=0.15, opacity_diameters_mm=[120.0])
    with pytest.raises(ValueError, match="photometric"):
        make_chest_xray(0, size_px=SMALL, photometric="RGB")
    with pytest.raises(ValueError, match="size_px"):
        make_chest_xray(0, size_px=(10, 10))


@pytest.mark.parametrize(
    ("modality", "photometric", "bits", "spacing_tag"),
    [
        ("DX", "MONOCHROME2", 12, "ImagerPixelSpacing"),
        ("DX", "MONOCHROME1", 16, "both"),
        ("CR", "MONOCHROME1", 12, "PixelSpacing"),
        ("CR", "MONOCHROME2", 16, "ImagerPixelSpacing"),
    ],
)
def test_dicom_reads_back_with_spacing_and_photometric(tmp_path, modality, photometric, bits, spacing_tag):
    phantom = make_chest_xray(
        11, size_px=SMALL, pixel_spacing_mm=(0.14, 0.13), modality=modality, photometric=photometric, bits_stored=bits
    )
    path = write_xray_dicom(phantom, tmp_path / "image.dcm", spacing_tag=spacing_tag, patient_id="XR-1")
    ds = pydicom.dcmread(path)
    expected_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    assert ds.SOPClassUID == expected_class and ds.file_meta.MediaStorageSOPClassUID == expected_class
    assert ds.Modality == modality and ds.PatientID == "XR-1"
    assert ds.PhotometricInterpretation == photometric
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, bits, bits - 1, 0)
    assert (ds.Rows, ds.Columns) == SMALL
    assert list(ds.PatientOrientation) == ["L", "F"] and ds.ViewPosition == "PA"
    assert ("ImagerPixelSpacing" in ds) == (spacing_tag in ("ImagerPixelSpacing", "both"))
    assert ("PixelSpacing" in ds) == (spacing_tag in ("PixelSpacing", "both"))
    for tag in ("ImagerPixelSpacing", "PixelSpacing"):
        if tag in ds:
            assert [float(v) for v in ds[tag].value] == pytest.approx([0.14, 0.13])  # row spacing, column spacing
    if modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PresentationLUTShape == ("IDENTITY" if photometric == "MONOCHROME2" else "INVERSE")
    stored = ds.pixel_array.astype(np.int64)
    expected = image(phantom).astype(np.int64)
    if photometric == "MONOCHROME1":
        expected = (2**bits - 1) - expected  # high = dark
    assert np.array_equal(stored, expected)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_dicom_passes_the_iod_validator(tmp_path, modality):
    phantom = make_chest_xray(4, size_px=SMALL, modality=modality, photometric="MONOCHROME1", bits_stored=12)
    path = write_xray_dicom(phantom, tmp_path / "image.dcm", spacing_tag="both")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
