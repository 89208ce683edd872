import numpy as np
import pytest

from octpipe.preprocess.flatten import (
    FlattenConfig,
    flatten_geometry,
    flatten_image,
    flatten_map,
    flatten_rows,
    unflatten_image,
    unflatten_rows,
)
from tests.conftest import small_phantom


def _smooth_volume(shape):
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    return (np.sin(y / 40.0) * np.cos(x / 13.0) + 0.1 * z).astype(np.float32)


def test_default_geometry_and_config_validation():
    assert flatten_geometry(FlattenConfig(), 0.00387) == (128, 112, 4)
    assert flatten_geometry(FlattenConfig(), 0.00774) == (128, 112, 4)  # resampled to the 3.87 µm grid
    assert flatten_geometry(FlattenConfig(axial_spacing_um=None), 0.00774) == (64, 56, 2)
    with pytest.raises(ValueError, match="must exceed"):
        FlattenConfig(area_height_um=50, below_bm_um=40, top_margin_um=20)
    with pytest.raises(ValueError):
        FlattenConfig(bm_smooth_um=-1)


def test_bm_lands_on_its_row_and_ilm_fits():
    ph = small_phantom(1, "srf,ped")
    height, bm_row, margin = 96, 84, 2
    fm = flatten_map(ph.ilm, ph.bm, height=height, bm_row=bm_row, top_margin=margin)
    flat_bm = flatten_rows(ph.bm, fm, bm_row=bm_row)
    flat_ilm = flatten_rows(ph.ilm, fm, bm_row=bm_row)
    np.testing.assert_allclose(flat_bm, bm_row, atol=1e-4)
    assert flat_ilm.min() >= margin - 1e-4  # flatmap is stored as float32
    # scaling only where the retina is too thick for the area
    thickness = ph.bm - ph.ilm
    scale = fm[1]
    assert np.all(scale[thickness <= bm_row - margin] == 1.0)
    assert np.all(scale[thickness > bm_row - margin] < 1.0)


def test_boundary_round_trip_is_exact():
    ph = small_phantom(2, "ped")
    fm = flatten_map(ph.ilm, ph.bm, height=64, bm_row=56, top_margin=2, sigma_columns=3)
    for rows in (ph.ilm, ph.bm, ph.surfaces[5]):
        back = unflatten_rows(flatten_rows(rows, fm, bm_row=56), fm, bm_row=56)
        np.testing.assert_allclose(back, rows, atol=1e-9, rtol=0)


def test_image_round_trip_on_smooth_images():
    shape = (3, 200, 64)
    vol = _smooth_volume(shape)
    rng = np.random.default_rng(0)
    bm = 150 + 10 * np.sin(np.arange(64) / 10.0)[None, :] + rng.uniform(-0.5, 0.5, (3, 64))
    ilm = bm - 60 - 30 * (np.arange(64) > 32)  # some columns thicker than the room: scaled
    height, bm_row, margin = 96, 84, 2
    fm = flatten_map(ilm, bm, height=height, bm_row=bm_row, top_margin=margin)
    assert (fm[1] < 1).any() and (fm[1] == 1).any()
    flat = flatten_image(vol, fm, height=height, bm_row=bm_row)
    assert flat.shape == (3, height, 64) and flat.dtype == np.float32
    back = unflatten_image(flat, fm, n_axial=200, bm_row=bm_row, fill=np.nan)
    covered = np.isfinite(back)
    # the rows that the area covers come back within 1e-3
    assert covered.sum() > 0.3 * back.size
    assert np.abs(back[covered] - vol[covered]).max() < 1e-3


def test_masks_use_nearest_and_keep_labels():
    ph = small_phantom(3, "srf")
    fm = flatten_map(ph.ilm, ph.bm, height=64, bm_row=56, top_margin=2)
    flat = flatten_image(ph.lesion_mask, fm, height=64, bm_row=56, order=0, fill=0)
    assert flat.dtype == np.uint8 and set(np.unique(flat)) <= {0, 2}
    back = unflatten_image(flat, fm, n_axial=ph.lesion_mask.shape[1], bm_row=56, order=0, fill=0)
    agree = (back == ph.lesion_mask).mean()
    assert agree > 0.995


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="do not match"):
        flatten_image(np.zeros((2, 10, 8)), np.zeros((2, 3, 8)), height=8, bm_row=6)
    with pytest.raises(ValueError, match="no BM"):
        flatten_map(np.zeros((1, 4)), np.full((1, 4), np.nan), height=8, bm_row=6)
