import json

import numpy as np
import pytest

from octpipe.cli import main
from octpipe.io.writers.heyex_vol import write_heyex_vol
from tests.conftest import small_phantom


def test_layers_command_writes_source_geometry_rows(tmp_path, capsys):
    ph = small_phantom(4, "srf", shape=(2, 496, 256), spacing_mm=(0.24, 0.00387, 0.0113))
    src = write_heyex_vol(tmp_path / "p.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OD")
    out = tmp_path / "p-layers.npz"
    assert main(["layers", str(src), "-o", str(out)]) == 0
    assert "QC flags: none" in capsys.readouterr().out
    with np.load(out) as data:
        assert data["ilm"].shape == (2, 256) and data["bm"].shape == (2, 256)
        assert np.nanmean(np.abs(data["ilm"] - ph.ilm)) < 1.0
        assert np.nanmean(np.abs(data["bm"] - ph.bm)) < 1.5
        qc = json.loads(str(data["qc"]))
    assert qc["source"] == "octpipe" and 0.9 <= qc["thickness_ok_fraction"] <= 1.0
    assert main(["layers", str(src), "-o", str(out)]) == 1  # no overwrite


def test_layers_command_can_use_the_device_layers(real_data, tmp_path):
    path = real_data / "halirutan_spectralis-raw-data/test-data/Willis_B_716_0.vol"
    out = tmp_path / "l.npz"
    assert main(["layers", str(path), "-o", str(out)]) == 0  # the default, as in ingest
    with np.load(out) as data:
        qc = json.loads(str(data["qc"]))
    assert qc["source"] == "vendor"
    assert main(["layers", str(path), "-o", str(out), "--no-use-vendor", "--overwrite"]) == 0
    with np.load(out) as data:
        assert json.loads(str(data["qc"]))["source"] == "octpipe"


def test_a_retina_running_out_of_the_window_is_flagged(real_data, tmp_path, capsys):
    """valid.vol: a circle scan through a cupped disc; the ILM found lies on the top rows on about a
    sixth of the A-scans (the image's edge, not the anatomy): the QC flags say so."""
    path = real_data / "halirutan_spectralis-raw-data/test-data/valid.vol"
    out = tmp_path / "l.npz"
    assert main(["layers", str(path), "-o", str(out)]) == 0
    assert "QC flags: ilm_at_border" in capsys.readouterr().out
    with np.load(out) as data:
        qc = json.loads(str(data["qc"]))
        assert qc["border_fraction"]["ilm"] == pytest.approx(float(np.mean(data["ilm"] <= 1.5)))
    assert qc["border_fraction"]["ilm"] > 0.1
