import numpy as np
import pytest
from scipy import ndimage as ndi

from octpipe.preprocess.intensity import linear_to_display
from octpipe.testing.phantoms import (
    LESION_LABELS,
    LesionSpec,
    make_cohort,
    make_phantom,
    parse_lesion_specs,
)
from tests.conftest import SMALL_SHAPE, SMALL_SPACING, small_phantom

ALL = "irf,srf,ped,drusen,hrf"


def _edge_rows(image, rows_truth, window, sign):
    """Sub-pixel row of the strongest vertical gradient of ``sign`` near each truth row."""
    grad = np.diff(image, axis=1)  # grad[:, r] lies between rows r and r+1
    found = np.empty_like(rows_truth, dtype=np.float64)
    for i in range(rows_truth.shape[0]):
        for c in range(rows_truth.shape[1]):
            r0 = int(np.floor(rows_truth[i, c] - window))
            seg = sign * grad[i, r0:r0 + 2 * window, c]
            k = int(np.argmax(seg))
            if 0 < k < len(seg) - 1:
                a, b, d = seg[k - 1], seg[k], seg[k + 1]
                k = k + 0.5 * (a - d) / (a - 2 * b + d)
            found[i, c] = r0 + k + 0.5
    return found - rows_truth


def test_same_seed_same_phantom():
    a = small_phantom(7, ALL)
    b = small_phantom(7, ALL)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.surfaces, b.surfaces)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert a.lesions == b.lesions
    c = small_phantom(8, ALL)
    assert not np.array_equal(a.data, c.data)


def test_cohort_is_reproducible_and_independent_of_size():
    specs = parse_lesion_specs("srf")
    kw = dict(seed=3, lesions=specs, healthy_fraction=0.5, shape=SMALL_SHAPE, spacing_mm=SMALL_SPACING)
    first = list(make_cohort(4, **kw))
    again = list(make_cohort(4, **kw))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert [p.diseased for p in first] == [False, False, True, True]
    assert [p.name for p in first] == [f"phantom-{k:04d}" for k in range(4)]


def test_default_geometry_is_spectralis_like():
    ph = make_phantom(np.random.default_rng(0), vessels=False)
    assert ph.data.shape == (49, 496, 512)
    assert ph.data.dtype == np.float32
    assert ph.spacing_mm == (0.12, 0.00387, 0.0113)
    # linear reflectivity as a .vol stores it: about [0, 1], dark vitreous
    assert 0 <= ph.data.min() and ph.data.max() <= 1.0
    thickness_um = (ph.bm - ph.ilm) * 3.87
    assert 180 < thickness_um.min() < 260  # the foveal pit
    assert 300 < thickness_um.max() < 420  # the parafoveal ring
    # foveal pit: thinnest point lies at the recorded fovea
    i, c = np.unravel_index(np.argmin(thickness_um), thickness_um.shape)
    z_mm = (i - 24) * 0.12
    x_mm = (c - 255.5) * 0.0113
    assert abs(z_mm - ph.fovea_mm[0]) < 0.25 and abs(x_mm - ph.fovea_mm[1]) < 0.25
    # surfaces are ordered top to bottom
    assert np.all(np.diff(ph.surfaces, axis=0) >= -1e-3)


def test_ilm_and_bm_truth_lie_on_the_intensity_edges_clean():
    ph = small_phantom(3, ALL, speckle=False, vessels=False)
    linear = ph.data.astype(np.float64)
    ilm_err = _edge_rows(linear, ph.ilm, 6, +1)
    bm_err = _edge_rows(linear, ph.bm, 4, -1)
    assert np.median(np.abs(ilm_err)) < 0.25
    assert np.percentile(np.abs(ilm_err), 95) < 0.5
    # the steepest fall sits inside the thin BM band, just above its lower edge
    assert np.median(np.abs(bm_err)) < 1.0


def test_ilm_and_bm_truth_lie_on_the_intensity_edges_with_speckle():
    ph = small_phantom(4, ALL)
    smooth = ndi.gaussian_filter(ph.data.astype(np.float64), (0, 1.0, 2.0))
    ilm_err = _edge_rows(smooth, ph.ilm, 6, +1)
    bm_err = _edge_rows(smooth, ph.bm, 4, -1)
    assert np.median(np.abs(ilm_err)) < 0.5
    assert np.median(np.abs(bm_err)) < 1.0
    # a boundary shifted by 3 rows no longer matches: the check can fail
    assert np.median(np.abs(_edge_rows(smooth, ph.ilm + 3, 6, +1))) > 2


@pytest.mark.parametrize("kind", sorted(LESION_LABELS))
def test_lesion_masks_lie_inside_the_retina(kind):
    ph = small_phantom(11, kind)
    assert ph.diseased and ph.lesion_types == (kind,)
    z, y, x = np.nonzero(ph.lesion_mask)
    assert len(z) > 0
    assert set(np.unique(ph.lesion_mask[z, y, x])) == {LESION_LABELS[kind]}
    assert np.all(y >= ph.ilm[z, x] - 0.5)
    assert np.all(y <= ph.bm[z, x] + 0.5)


@pytest.mark.parametrize("kind", sorted(LESION_LABELS))
def test_lesion_masks_change_the_image_where_they_say(kind):
    from octpipe.testing.phantoms import _LESION_LEVEL

    ph = small_phantom(12, kind, speckle=False, vessels=False)
    display = linear_to_display(ph.data)
    mask = ph.lesion_mask > 0
    core = ndi.binary_erosion(mask, structure=np.ones((1, 3, 3))) if kind != "hrf" else mask
    assert core.any()
    level = _LESION_LEVEL[kind]
    if kind == "hrf":  # tiny foci: their peak reaches the lesion level
        labels, n = ndi.label(mask)
        peaks = ndi.maximum(display, labels, index=np.arange(1, n + 1))
        assert np.median(peaks) > 0.75
    else:
        assert abs(np.median(display[core]) - level) < 0.06
    # the healthy eye of the same geometry has other values there
    healthy = small_phantom(12, "", speckle=False, vessels=False)
    assert not np.allclose(linear_to_display(healthy.data)[core], display[core], atol=0.05)


@pytest.mark.parametrize("kind", ["irf", "srf", "ped"])
def test_fluid_is_dark_against_its_surroundings(kind):
    ph = small_phantom(13, kind)
    display = linear_to_display(ph.data)
    mask = ph.lesion_mask > 0
    ring = ndi.binary_dilation(mask, structure=np.ones((1, 5, 5)), iterations=2) & ~mask
    assert display[mask].mean() < display[ring].mean() - 0.15


def test_lesions_lift_the_retina_but_not_bruchs_membrane():
    spec = (LesionSpec("ped", count=1, radius_mm=0.8, height_um=300.0),)
    lifted = make_phantom(np.random.default_rng(5), shape=SMALL_SHAPE, spacing_mm=SMALL_SPACING, lesions=spec)
    z, y, x = np.nonzero(lifted.lesion_mask)
    assert (y.max() - y.min() + 1) * SMALL_SPACING[1] * 1e3 > 150  # a tall PED
    thickness = lifted.bm - lifted.ilm
    inside = lifted.lesion_mask.any(axis=1)
    assert thickness[inside].max() > np.median(thickness[~inside]) + 200 / 7.74


def test_lesion_count_and_size_control():
    ph = make_phantom(np.random.default_rng(1), shape=SMALL_SHAPE, spacing_mm=SMALL_SPACING,
                      lesions=(LesionSpec("drusen", count=6, radius_mm=(0.1, 0.15), height_um=50.0),))
    assert len(ph.lesions) == 6
    assert all(0.1 <= les["radius_mm"] <= 0.15 for les in ph.lesions)
    assert all(les["height_um"] == 50.0 for les in ph.lesions)


def test_parse_lesion_specs():
    specs = parse_lesion_specs("irf:2-4:0.2, srf ,ped:1:0.6:200")
    assert [s.kind for s in specs] == ["irf", "srf", "ped"]
    assert specs[0].count == (2, 4) and specs[0].radius_mm == (0.2, 0.2)
    assert specs[2].height_um == (200.0, 200.0)
    assert parse_lesion_specs("none") == ()
    with pytest.raises(ValueError, match="unknown lesion kind 'cnv'"):
        parse_lesion_specs("cnv")
    with pytest.raises(ValueError, match="cannot read"):
        parse_lesion_specs("irf:many")


@pytest.mark.parametrize("bad", [dict(shape=(0, 10, 10)), dict(spacing_mm=(0.1, -1, 0.1)),
                                 dict(laterality="left"), dict(shape=(2, 100, 64))])
def test_make_phantom_rejects_bad_arguments(bad):
    kwargs = dict(shape=SMALL_SHAPE, spacing_mm=SMALL_SPACING) | bad
    with pytest.raises(ValueError):
        make_phantom(np.random.default_rng(0), **kwargs)


def test_to_volume_carries_truth_layers():
    ph = small_phantom(2)
    vol = ph.to_volume()
    assert vol.shape == SMALL_SHAPE and vol.intensity == "linear"
    np.testing.assert_array_equal(vol.layers["ILM"], ph.ilm)
    np.testing.assert_array_equal(vol.layers["BM"], ph.bm)
