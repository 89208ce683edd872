"""The bundled model models/fanogan-phantom: it loads, and its maps find phantom lesions."""

from __future__ import annotations

import numpy as np

from octpipe.export.anomaly import MapSettings, compute_anomaly
from octpipe.export.run import file_volume_input
from octpipe.testing.phantom_files import write_phantom_files


def test_bundled_model_maps_are_higher_inside_phantom_lesions_than_in_healthy_retina(tmp_path):
    """The real check of the maps: the bundled model, a phantom with fluid, the truth mask."""
    from octpipe.demo import BUNDLED_MODEL
    from octpipe.models.fanogan.checkpoint import load_run
    from octpipe.testing.phantoms import make_phantom, parse_lesion_specs

    ph = make_phantom(np.random.default_rng(11), shape=(9, 496, 512), spacing_mm=(0.6, 0.00387, 0.0113),
                      lesions=parse_lesion_specs("irf:3,srf,ped"), laterality="OD")
    files = write_phantom_files(ph, tmp_path, formats=["vol"])
    vol = file_volume_input(files["vol"])
    result = compute_anomaly(vol, load_run(BUNDLED_MODEL), MapSettings(precision="fp32"))
    lesion = (ph.lesion_mask > 0) & result.inside
    healthy = (ph.lesion_mask == 0) & result.inside
    assert lesion.sum() > 2000
    inside_lesions = float(result.residual[lesion].mean())
    healthy_retina = float(result.residual[healthy].mean())
    assert inside_lesions > 1.5 * healthy_retina, (inside_lesions, healthy_retina)

