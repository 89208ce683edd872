"""``octpipe evaluate`` from a scores CSV and from a store plus a model run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from octpipe.cli import main
from octpipe.evaluate import image_metrics, roc_auc


def write_scores(path, n=120, seed=0):
    """A CSV in the layout octpipe score writes, with a known separation."""
    from octpipe.models.fanogan.score import CSV_COLUMNS

    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    labels[:3] = -1  # unknown: left out
    a_r = rng.normal(size=n) + 1.5 * (labels == 1)
    a_d = rng.normal(size=n)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for i in range(n):
            w.writerow([f"v{i % 4}", i % 3, 0, 32 * (i % 5), labels[i], a_r[i], a_d[i], a_r[i] + a_d[i], 0.1])
    return labels, a_r, a_d


def test_evaluate_a_scores_csv(tmp_path, capsys):
    labels, a_r, a_d = write_scores(tmp_path / "scores.csv")
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "scores.csv"), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["image_level"]) == {"A", "A_R", "A_D"} and data["pixel_level"] is None
    assert data["n_patches"] == 117 and data["n_anomalous"] == int((labels == 1).sum())
    ref = image_metrics(a_r, labels)
    got = data["image_level"]["A_R"]
    assert got["auc"] == pytest.approx(ref.auc) and got["f1"] == pytest.approx(ref.f1)
    assert got["auc"] == pytest.approx(roc_auc(a_r, labels)) and got["auc"] > 0.8
    assert data["image_level"]["A_D"]["auc"] < 0.7  # the uninformative score stays near chance
    assert f"A_R: AUC {ref.auc:.4f}" in stdout
    md = (out / "metrics.md").read_text()
    assert "| score | precision | sensitivity | specificity | F1 | AUC |" in md
    assert (out / "roc.png").stat().st_size > 1000 and (out / "histograms.png").stat().st_size > 1000
    # existing outputs are kept unless --overwrite
    assert main(["evaluate", str(tmp_path / "scores.csv"), "-o", str(out)]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "scores.csv"), "-o", str(out), "--score", "A_R", "--overwrite"]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["image_level"]) == {"A_R"}


def test_evaluate_usage_errors(tmp_path, capsys):
    write_scores(tmp_path / "scores.csv")
    assert main(["evaluate", "-o", str(tmp_path / "e")]) == 2  # neither a CSV nor --store
    assert main(["evaluate", "--store", str(tmp_path), "-o", str(tmp_path / "e")]) == 2  # --store without --model
    assert main(["evaluate", str(tmp_path / "scores.csv"), "-o", str(tmp_path / "e"), "--score", "B"]) == 1
    assert "no score column B" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "e")]) == 1


def test_evaluate_a_store_with_a_model_adds_the_pixel_level(tmp_path, capsys):
    from tests.models.test_fanogan_train import TINY_YAML, make_patch_store

    store = make_patch_store(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(store), "-o", str(run), "--config", str(TINY_YAML), "--iterations", "4"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--store", str(store), "--model", str(run), "-o", str(out), "--device", "cpu",
                 "--score", "A", "--score", "z_distance"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["image_level"]) == {"A", "z_distance"}
    pix = data["pixel_level"]
    assert pix is not None and 0.0 <= pix["auc"] <= 1.0 and pix["n_anomalous"] > 0
    assert pix["n"] == data["n_patches"] * 32 * 32  # every pixel of every labelled patch
    assert "pixel level: AUC" in capsys.readouterr().out
    assert "## Pixel level" in (out / "metrics.md").read_text()
