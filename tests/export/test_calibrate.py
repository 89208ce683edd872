"""Volume-level calibration (``octpipe calibrate``): the export's percentile among normal volumes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from octpipe.cli import main
from octpipe.export.calibrate import MIN_VOLUMES, volume_calibration, volume_percentile
from tests.conftest import small_phantom
from tests.export.test_export import save_model_dir


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    """Six small healthy phantoms (.vol) in one folder, and one diseased phantom beside it."""
    from octpipe.io.writers.heyex_vol import write_heyex_vol

    root = tmp_path_factory.mktemp("calibrate")
    for k in range(6):
        ph = small_phantom(40 + k, shape=(2, 248, 256))
        write_heyex_vol(root / "normal" / f"n{k}.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OD")
    ph = small_phantom(50, "srf,irf:2", shape=(2, 248, 256))
    write_heyex_vol(root / "sick.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OD")
    return root


def test_volume_percentile_is_among_the_normal_volumes():
    rec = volume_calibration([0.2, 0.1, 0.4, 0.3, 0.5], stride=16, weighting="gaussian", source="test")
    assert rec["n"] == 5 and rec["sorted"] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [volume_percentile(v, rec) for v in (0.05, 0.3, 0.45, 9.0)] == [0.0, 60.0, 80.0, 100.0]
    with pytest.raises(ValueError, match=f"at least {MIN_VOLUMES}"):
        volume_calibration([0.1, 0.2], stride=16, weighting="gaussian", source="test")


def test_calibrate_command_stores_the_normal_volume_scores_and_exports_use_them(normals, tmp_path, capsys):
    model = save_model_dir(tmp_path / "model", size=32)
    before = torch.load(model / "model.pt", map_location="cpu", weights_only=False)
    assert main(["--no-progress", "calibrate", str(model), str(normals / "normal"), "--stride", "32",
                 "--device", "cpu"]) == 0
    assert "calibrate: 6 normal volumes (stride 32)" in capsys.readouterr().out
    after = torch.load(model / "model.pt", map_location="cpu", weights_only=False)
    record = after["calibration"]["volumes"]
    assert record["n"] == 6 and record["stride"] == 32 and record["sorted"] == sorted(record["sorted"])
    # the rest of the bundle is unchanged: networks and the patch calibration
    assert after["calibration"]["scores"] == before["calibration"]["scores"]
    for name in ("generator", "discriminator", "encoder"):
        for key, value in before[name].items():
            assert torch.equal(after[name][key], value)
    # an export of the normal volumes gives their own percentiles; of these six, the top one is at 100
    out = tmp_path / "ex"
    assert main(["--no-progress", "export", str(normals / "normal"), "--model", str(model), "-o", str(out),
                 "--stride", "32", "--device", "cpu"]) == 0
    with (out / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["percentile_among"] for r in rows} == {"6 normal volumes"}
    pct = sorted(float(r["volume_percentile"]) for r in rows)
    np.testing.assert_allclose(pct, [100 * (k + 1) / 6 for k in range(6)], atol=0.01)  # index.csv: 4 digits
    summary = json.loads(next(out.glob("*/summary.json")).read_text())
    assert summary["volume_percentile_reference"] == "6 normal volumes"
    report = next(out.glob("*/report.html")).read_text()
    assert "percentile among 6 normal volumes" in report


def test_calibrate_needs_enough_normal_volumes_and_a_model(normals, tmp_path, capsys):
    model = save_model_dir(tmp_path / "model", size=32)
    code = main(["--no-progress", "calibrate", str(model), str(normals / "normal" / "n0.vol"),
                 str(normals / "normal" / "n1.vol"), "--stride", "32", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "2 normal volumes scored" in err[0] and "at least 5" in err[0]
    assert "volumes" not in torch.load(model / "model.pt", map_location="cpu", weights_only=False)["calibration"]
    assert main(["--no-progress", "calibrate", str(tmp_path / "nope"), str(normals)]) == 1
    assert main(["--no-progress", "calibrate", str(model), str(tmp_path / "missing")]) == 1
    assert main(["--no-progress", "calibrate", str(model), str(normals), "--weighting", "box"]) == 2
