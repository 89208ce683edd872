"""ILM/BM on real B-scans of six devices (../shared/data): found, and where they should be.

The default run uses a small fixed sample; the sweeps over every real file are ``slow``
(``benchmarks/layers_real.py`` reports the same per source and vendor).
"""

from __future__ import annotations

import numpy as np
import pytest

from octpipe.io import read_volume
from octpipe.preprocess.prepare import segment_source
from octpipe.testing.realdata import (
    VITREOUS_LESIONS,
    label_ilm,
    lesion_polygons,
    rasterise_polygons,
    real_bscans,
    shared_data,
)

DATA = shared_data()
pytestmark = pytest.mark.skipif(DATA is None, reason="../shared/data not available")
ITEMS = list(real_bscans(DATA)) if DATA is not None else []
#: QC flags that real pathology earns (a huge detachment, a schisis cavity, an atrophic or
#: lifted RPE): ``benchmarks/layers_real.py`` lists every flagged B-scan; a reader agrees with
#: each. ``no_retina`` is never one of them: the retina is found on every real B-scan.
#: The ``*_at_border`` flags where the retina leaves the image: the circle scan valid.vol (cupped disc,
#: wrap-around artefacts in the top rows), cropped exports whose BM runs out at the bottom (OCTDL DME)
#: ``spacing_implausible`` where the retina found would need more axial field than any device has
#: (the RPE alone taken for the retina under a dim inner retina).
AGREED_FLAGS = {"bm_low_contrast", "thickness_out_of_range", "ilm_inpainted", "bm_inpainted", "ilm_at_border",
                "bm_at_border", "spacing_implausible"}
#: At most this share of a source's B-scans may carry such flags (measured: at most 10 %, OCTDL val DME and ERM).
MAX_FLAGGED_FRACTION = 0.12


def _pick(source: str, n: int) -> list:
    return [it for it in ITEMS if it.source == source][:n]


def _sample() -> list:
    return (_pick("bilalhassan-raw", 20)[::5] + _pick("octdl-val-AMD", 1) + _pick("octdl-train-NO", 1)
            + _pick("kermany-DME", 1) + _pick("kermany-lesions", 2))


def _ids(items: list) -> list[str]:
    return [f"{it.source}:{it.path.name[:24]}" for it in items]


@pytest.mark.parametrize("item", _sample(), ids=_ids(_sample()))
def test_retina_found_on_real_sample(item) -> None:
    res, vol = segment_source(read_volume(item.path))
    assert "no_retina" not in res.qc["flags"], res.qc
    thick = (res.bm - res.ilm)[0] * vol.spacing_mm[1] * 1e3
    assert np.median(thick) > 100 and np.isfinite(res.ilm).all() and np.isfinite(res.bm).all()


def _item(source: str, name: str):
    return next(it for it in ITEMS if it.source == source and it.path.name.startswith(name))


def test_ilm_keeps_off_a_detached_hyaloid_and_over_a_dim_inner_retina() -> None:
    """The ILM's tissue test: a hyaloid has vitreous under it, a dim inner retina does not.

    Spectralis_2 has a bright detached hyaloid 20-120 px over the retina (taken as ILM on
    two thirds of the A-scans without the test). On the OCTDL ERM B-scan the inner retina
    by the fovea is dim; an absolute brightness test dropped the ILM to the photoreceptors
    there (19 % of the A-scans, thickness_out_of_range); against the vitreous over it the
    inner retina is tissue.
    """
    hyaloid = _item("bilalhassan-raw", "Spectralis_2.jpeg")
    res, vol = segment_source(read_volume(hyaloid.path))
    # its reading jumps onto the hyaloid at 3.09 µm/px: the spacing estimate settles on
    # the side of the jump with the clearer retina (scale.estimate_spacing)
    assert vol.meta["spacing_estimate"].get("bracketed"), vol.meta["spacing_estimate"]
    truth = label_ilm(hyaloid.truth_path, vol.shape[1:])
    ok = np.isfinite(truth)
    err = np.abs(res.ilm[0][ok] - truth[ok])
    # the label maps sit about 9 px off this export's ILM (benchmarks/layers_real.py); the
    # hyaloid lies 20 px and more above it
    assert np.mean(err > 20) < 0.03, np.mean(err > 20)
    dim = _item("octdl-val-ERM", "erm_5110347_5.jpg")
    res, vol = segment_source(read_volume(dim.path))
    thick = (res.bm - res.ilm)[0]
    assert not res.qc["flags"], res.qc["flags"]
    assert np.mean(thick < 0.6 * np.median(thick)) < 0.02


def test_ilm_is_not_thrown_under_the_retina_by_a_bright_artefact_band() -> None:
    """A saturated vertical band (Kermany 1d5f15da, over the fovea) is as bright over the ILM as under it.

    Against the vitreous-contrast test alone the band held no tissue, and the ILM dropped
    through it under the cysts outlined there (3,200 of their 7,930 pixels above the ILM);
    a bright window counts as tissue whatever lies over it.
    """
    item = _item("kermany-lesions", "1d5f15da")
    res, vol = segment_source(read_volume(item.path))
    lab = rasterise_polygons(lesion_polygons(item.truth_path), vol.shape[1:], exclude=VITREOUS_LESIONS + (1,)) > 0
    rows = np.arange(vol.shape[1])[:, None]
    assert (lab & (rows < res.ilm[0][None] - 0.5)).sum() < 0.01 * lab.sum()
    assert not res.qc["flags"], res.qc["flags"]


def test_bm_is_bridged_across_an_optic_disc_at_the_scan_end() -> None:
    """OCTDL normal B-scans with the disc at one end: BM no longer dives to the image bottom there.

    The first BM pass follows the disc's edges down to the last rows where the RPE ends;
    before, the reference carried that dive inwards and ``bm_at_border`` flagged 4 normal
    B-scans of OCTDL train.
    """
    for name in ("no_5289672_1.jpg", "no_9054704_1.jpg"):
        res, vol = segment_source(read_volume(_item("octdl-train-NO", name).path))
        assert "bm_at_border" not in res.qc["flags"], (name, res.qc["flags"])
        assert (res.bm[0] < vol.shape[1] - 10).all(), name


def _label_errors(items: list) -> list[float]:
    out = []
    for item in items:
        res, vol = segment_source(read_volume(item.path))
        truth = label_ilm(item.truth_path, vol.shape[1:])
        ok = np.isfinite(truth)
        out.append(float(np.median(np.abs(res.ilm[0][ok] - truth[ok]))))
    return out


def test_ilm_matches_the_label_maps() -> None:
    """ILM against the top edge of the retina labels, one raw scan per vendor.

    The label maps are coarse (360x480, resized) and sit up to 6 px above the visible tissue
    edge on some scans (Topcon, the volume set). On the dim Spectralis_1 export the labels
    include a faint inner layer above the bright nerve fibre band where octpipe's ILM lies
    (8.4 px). So the sample's median is held to 2.5 px and each file to 10 px; the slow test
    holds all 39 labelled scans to a 2 px median.
    """
    labelled = [it for it in ITEMS if it.truth == "labels" and it.source == "bilalhassan-raw"]
    errors = _label_errors(labelled[::5])  # Bioptigen_1, Cirrus_1, Spectralis_1, Topcon_1
    assert len(errors) == 4
    assert max(errors) <= 10.0 and float(np.median(errors)) <= 2.5, errors


@pytest.mark.slow
def test_ilm_matches_every_label_map() -> None:
    errors = _label_errors([it for it in ITEMS if it.truth == "labels"])
    assert len(errors) == 39 and float(np.median(errors)) <= 2.0, errors


_LESION_SAMPLE = [it for it in _pick("kermany-lesions", 12) if "DRUSEN" in it.path.name or "DME" in it.path.name][:4]


@pytest.mark.parametrize("item", _LESION_SAMPLE, ids=_ids(_LESION_SAMPLE))
def test_lesion_outlines_lie_inside_the_retina(item) -> None:
    res, vol = segment_source(read_volume(item.path))
    # a lamellar rupture (class 1) outlines tissue that is missing: above the ILM by construction
    lab = rasterise_polygons(lesion_polygons(item.truth_path), vol.shape[1:], exclude=VITREOUS_LESIONS + (1,))
    if not lab.any():
        pytest.skip("only pre-retinal lesions")
    rows = np.arange(vol.shape[1])[:, None]
    inside = (rows >= res.ilm[0][None] - 0.5) & (rows <= res.bm[0][None] + 10)
    assert (inside & (lab > 0)).sum() / (lab > 0).sum() >= 0.9


@pytest.mark.slow
def test_sweep_every_real_bscan() -> None:
    """Every real B-scan: the retina is found; flags only of the agreed kinds, on few B-scans per source."""
    flagged: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for item in ITEMS:
        res, _ = segment_source(read_volume(item.path))
        counts[item.source] = counts.get(item.source, 0) + 1
        flags = set(res.qc["flags"])
        assert "no_retina" not in flags and flags <= AGREED_FLAGS, (item.path.name, sorted(flags))
        if flags:
            flagged.setdefault(item.source, []).append(item.path.name)
    assert sum(counts.values()) == len(ITEMS) > 900
    for source, names in flagged.items():
        assert len(names) <= max(1.0, MAX_FLAGGED_FRACTION * counts[source]), (source, names)


@pytest.mark.slow
def test_lesion_pixels_inside_retina_over_all_outlines() -> None:
    """Lesion outlines (inside-retina classes) between ILM and BM + 10 px: 0.94997 measured.

    The target is 0.95 (0.871 before BM learnt to go under huge cystoid cavities and wide
    PED/subretinal material, 0.942 before the ILM's tissue test became a contrast with the
    vitreous over it, 0.946 before a bright window counted as tissue and the spacing
    estimate learnt to bisect); cysts open to the vitreous, the ILM under some superficial
    cysts, and subretinal material outlined down into the choroid or off the image edge
    keep the rest out. This holds the measured level.
    """
    tot = inside_n = 0
    for item in (it for it in ITEMS if it.truth == "lesions"):
        res, vol = segment_source(read_volume(item.path))
        lab = rasterise_polygons(lesion_polygons(item.truth_path), vol.shape[1:], exclude=VITREOUS_LESIONS + (1,))
        rows = np.arange(vol.shape[1])[:, None]
        inside = (rows >= res.ilm[0][None] - 0.5) & (rows <= res.bm[0][None] + 10)
        tot += int((lab > 0).sum())
        inside_n += int((inside & (lab > 0)).sum())
    assert tot > 1_000_000 and inside_n / tot >= 0.949
