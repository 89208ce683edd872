"""Phantoms against the real Spectralis files, measured by the same statistics.

Tolerances (display domain, 0..1) are written here; the measured values are recorded by
``benchmarks/phantom_realism.py``.
"""

import numpy as np
import pytest

from octpipe.io.heyex_vol import read_heyex_vol
from octpipe.preprocess.intensity import linear_to_display
from octpipe.testing.phantoms import make_phantom
from octpipe.testing.realism import bscan_statistics

TOLERANCE = {
    # histogram inside ILM..BM
    "retina_p10": 0.04, "retina_p25": 0.04, "retina_p50": 0.04, "retina_p75": 0.04, "retina_p90": 0.04,
    "retina_mean": 0.03, "retina_std": 0.03,
    # contrast between bright and dark bands, and retina against vitreous
    "contrast_bright_dark": 0.06, "contrast_rpe_onl": 0.06, "contrast_retina_vitreous": 0.05,
    "vitreous_median": 0.02,
    # speckle
    "speckle_std": 0.012, "speckle_corr_axial": 0.1, "speckle_corr_lateral": 0.12,
}


@pytest.fixture(scope="module")
def real_stats(real_data):
    path = real_data / "halirutan_spectralis-raw-data" / "test-data" / "Willis_B_716_0.vol"
    vol = read_heyex_vol(path)
    ilm = vol.layers["ILM"][0].copy()
    ilm[650:] = np.nan  # the optic disc: no retina layers to compare there
    return bscan_statistics(linear_to_display(vol.data[0]), ilm, vol.layers["BM"][0])


@pytest.fixture(scope="module")
def phantom_stats():
    stats = []
    for seed in (0, 1):
        ph = make_phantom(np.random.default_rng(seed), shape=(5, 496, 512), spacing_mm=(0.96, 0.00387, 0.0113))
        for i in range(ph.data.shape[0]):
            stats.append(bscan_statistics(linear_to_display(ph.data[i]), ph.ilm[i], ph.bm[i]))
    return {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_phantom_statistics_match_real_spectralis(name, real_stats, phantom_stats):
    diff = phantom_stats[name] - real_stats[name]
    assert abs(diff) <= TOLERANCE[name], f"{name}: phantom {phantom_stats[name]:.3f} real {real_stats[name]:.3f}"


def test_statistics_tell_a_flat_image_from_a_retina(real_stats):
    """The comparison has teeth: a retina without speckle or band contrast fails it."""
    ph = make_phantom(np.random.default_rng(0), shape=(1, 496, 512), spacing_mm=(0.12, 0.00387, 0.0113),
                      speckle=False)
    flat = bscan_statistics(linear_to_display(ph.data[0]), ph.ilm[0], ph.bm[0])
    assert abs(flat["speckle_std"] - real_stats["speckle_std"]) > TOLERANCE["speckle_std"]
