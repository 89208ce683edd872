"""Slab-wise preprocessing: the same result as the whole volume at once, in a fraction of the memory.

The per-B-scan steps (display mapping, normalisation, column downsampling, the segmentation
passes, the map back to the source grid) run on slabs of B-scans. These tests shrink the
slab to one or two B-scans, check the result equals the one-piece computation exactly, and
measure the peak of numpy allocations (tracemalloc counts them, on every machine alike)
against the input's size.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from octpipe.heatmap import source_retina, to_source_geometry
from octpipe.preprocess import blocks, layers
from octpipe.preprocess.intensity import display_to_linear, linear_to_display, normalize_volume
from octpipe.preprocess.layers import segment_ilm_bm
from octpipe.preprocess.prepare import prepare_volume
from octpipe.preprocess.resample import downsample_columns
from octpipe.volume import OctVolume
from tests.conftest import SMALL_SPACING, small_phantom

SHAPE = (12, 248, 256)


@pytest.fixture(scope="module")
def phantom():
    return small_phantom(3, lesions="ped", shape=SHAPE)


def _with_margins(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volume with FLT_MAX fill on the first A-scans and a NaN patch, and its invalid mask."""
    out = data.copy()
    out[:, :, :9] = np.finfo(np.float32).max
    out[4, 100:110, 50:60] = np.nan
    return out, ~np.isfinite(out) | (out >= 1e30)


def _peak(fn, *args, **kwargs):
    """Peak of traced allocations above the start while ``fn`` runs, and its result."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


def _slab_bscans(monkeypatch, n: int) -> None:
    per = SHAPE[1] * SHAPE[2]
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", n * per)
    monkeypatch.setattr(layers, "BLOCK_PIXELS", n * per)


def test_element_wise_maps_in_slabs_equal_the_whole_volume(monkeypatch, phantom):
    data, invalid = _with_margins(phantom.data)
    whole_disp, whole_lin = linear_to_display(data), display_to_linear(linear_to_display(data))
    whole_norm = normalize_volume(whole_disp, invalid=invalid, percentiles=(0.5, 99.5))
    _slab_bscans(monkeypatch, 1)
    assert np.array_equal(linear_to_display(data), whole_disp)
    assert np.array_equal(display_to_linear(whole_disp), whole_lin)
    norm = normalize_volume(whole_disp, invalid=invalid, percentiles=(0.5, 99.5))
    assert np.array_equal(norm[0], whole_norm[0]) and norm[1] == whole_norm[1]
    # and the one-piece formula itself (float64 throughout)
    x = np.where(np.isfinite(data) & (data < 1e30), np.maximum(data.astype(np.float64), 0.0), 0.0)
    ref = np.clip((np.log(x + 2.44e-4) + 8.3) / 8.285, 0.0, 1.0).astype(np.float32)
    assert np.array_equal(whole_disp, ref)


def test_downsampling_in_slabs_equals_the_whole_volume(monkeypatch, phantom):
    data, invalid = _with_margins(phantom.data)
    disp = linear_to_display(data)
    disp[invalid] = np.nan
    one_nan = linear_to_display(phantom.data)
    one_nan[4, 100:110, 50:60] = np.nan  # NaN in one slab only: both code paths of the function
    runs = [lambda: downsample_columns(disp, 2, invalid=invalid),
            lambda: downsample_columns(one_nan, 2),
            lambda: downsample_columns(phantom.data, 3)]
    whole = [run() for run in runs]
    _slab_bscans(monkeypatch, 1)
    for run, expected in zip(runs, whole, strict=True):
        assert np.array_equal(run(), expected, equal_nan=True)
    assert np.isnan(whole[1][4]).any() and not np.isnan(whole[1][3]).any()


def test_segmentation_in_slabs_equals_the_whole_volume(monkeypatch, phantom):
    data, invalid = _with_margins(phantom.data)
    whole = segment_ilm_bm(data, spacing_mm=SMALL_SPACING, invalid=invalid, domain="linear")
    _slab_bscans(monkeypatch, 1)
    slabbed = segment_ilm_bm(data, spacing_mm=SMALL_SPACING, invalid=invalid, domain="linear")
    assert np.array_equal(whole.ilm, slabbed.ilm) and np.array_equal(whole.bm, slabbed.bm)
    assert whole.qc == slabbed.qc
    assert np.median(np.abs(slabbed.bm - phantom.bm)[:, 12:]) < 1.5  # and it is still a segmentation


def test_source_geometry_in_slabs_equals_the_whole_volume(monkeypatch, phantom):
    prepared = prepare_volume(OctVolume(data=phantom.data, spacing_mm=SMALL_SPACING, intensity="linear"))
    flat_map = np.random.default_rng(0).random(prepared.flat.shape, dtype=np.float32)
    _, inside = source_retina(prepared.layers, factor=prepared.factor, n_axial=SHAPE[1], n_ascans=SHAPE[2])
    args = (flat_map, prepared.flatmap, inside)
    whole = to_source_geometry(*args, bm_row=prepared.bm_row, factor=prepared.factor)
    _slab_bscans(monkeypatch, 1)
    assert np.array_equal(to_source_geometry(*args, bm_row=prepared.bm_row, factor=prepared.factor), whole)
    assert whole.dtype == np.float32 and (whole[~inside] == 0).all() and whole[inside].mean() > 0.2


def test_segmentation_memory_stays_near_the_input(monkeypatch, phantom):
    """Beyond its input the segmentation holds one display copy, masks and a slab's temporaries."""
    display = linear_to_display(phantom.data)
    _slab_bscans(monkeypatch, 1)
    peak, res = _peak(segment_ilm_bm, display, spacing_mm=SMALL_SPACING)
    assert res.qc["flags"] == []
    assert peak < 3.0 * display.nbytes, f"peak {peak / display.nbytes:.2f}x the input"


def test_preparation_memory_stays_near_the_input(monkeypatch, phantom):
    """All stages, with invalid margins (the masked downsampling) and a float64-heavy log mapping."""
    data, invalid = _with_margins(phantom.data)
    vol = OctVolume(data=data, spacing_mm=SMALL_SPACING, intensity="linear", invalid=invalid)
    _slab_bscans(monkeypatch, 1)
    peak, prepared = _peak(prepare_volume, vol)
    assert prepared.flat.shape[0] == SHAPE[0]
    assert peak < 6.0 * data.nbytes, f"peak {peak / data.nbytes:.2f}x the input"
