"""Detection statistics: ROC AUC against brute force, Youden statistics, pixel level, reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from octpipe.errors import OctpipeError
from octpipe.evaluate import (
    PIXEL_COLUMNS,
    image_metrics,
    markdown_table,
    pixel_metrics,
    read_scores_csv,
    roc_auc,
    roc_curve,
    write_report,
    youden_statistics,
)


def brute_force_auc(scores, labels) -> float:
    """P(score of an anomalous sample > a normal one) + 0.5·P(tie), over every pair."""
    s, y = np.asarray(scores, float), np.asarray(labels)
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_equals_the_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 6, n) + labels * rng.integers(0, 3, n)  # many ties
    assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    # the trapezoidal area under the curve through every distinct threshold is the same number
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(thresholds) < 0)


def test_auc_edge_cases():
    assert roc_auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert roc_auc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert roc_auc([3, 3, 3, 3], [0, 1, 0, 1]) == 0.5
    assert math.isnan(roc_auc([1, 2], [1, 1]))
    # unknown labels (-1) are left out, not counted as normal
    assert roc_auc([0.1, 0.9, 5.0], [0, 1, -1]) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([1, np.nan], [0, 1])


@pytest.mark.parametrize("seed", range(4))
def test_youden_point_is_the_best_threshold_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = rng.normal(size=150) + 1.2 * labels
    st = youden_statistics(scores, labels)
    best = max(np.mean(scores[labels == 1] >= t) + np.mean(scores[labels == 0] < t) - 1 for t in scores)
    assert st["youden"] == pytest.approx(best)
    pred = scores >= st["threshold"]
    tp = np.sum(pred & (labels == 1))
    fp = np.sum(pred & (labels == 0))
    fn = np.sum(~pred & (labels == 1))
    tn = np.sum(~pred & (labels == 0))
    assert (st["tp"], st["fp"], st["fn"], st["tn"]) == (tp, fp, fn, tn)
    assert st["precision"] == pytest.approx(tp / (tp + fp))
    assert st["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert st["specificity"] == pytest.approx(tn / (tn + fp))
    assert st["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert st["youden"] == pytest.approx(st["sensitivity"] + st["specificity"] - 1)


def test_image_metrics_perfect_and_degenerate():
    m = image_metrics([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert (m.auc, m.precision, m.sensitivity, m.specificity, m.f1) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (m.n, m.n_anomalous, m.threshold) == (4, 2, 0.8)
    with pytest.raises(ValueError, match="normal and anomalous"):
        image_metrics([1, 2, 3], [0, 0, 0])


def test_pixel_metrics_against_masks():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[1, 2:5, 2:5] = 2  # any non-zero label is a lesion pixel
    perfect = masks.astype(np.float32) + 0.01 * rng.random(masks.shape)
    assert pixel_metrics(perfect, masks).auc == 1.0
    noise = rng.random(masks.shape)
    m = pixel_metrics(noise, masks)
    assert m.n == masks.size and m.n_anomalous == 9
    assert m.auc == pytest.approx(brute_force_auc(noise.ravel(), (masks > 0).ravel()))
    sub = pixel_metrics(perfect, masks, max_pixels=100, seed=1)
    assert sub.n == 100
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_metrics(noise[:2], masks)


def test_markdown_table_in_the_paper_layout():
    m = image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    text = markdown_table({"f-AnoGAN": m}, paper={"f-AnoGAN": {"auc": 0.9301, "f1": 0.7975}})
    lines = text.splitlines()
    assert lines[0] == ("| method | precision | sensitivity | specificity | F1 | AUC | paper precision | "
                        "paper sensitivity | paper specificity | paper F1 | paper AUC |")
    assert lines[2] == "| f-AnoGAN | 1.0000 | 0.5000 | 1.0000 | 0.6667 | 0.7500 | – | – | – | 0.7975 | 0.9301 |"
    pix = markdown_table({"AE": {"sensitivity": 0.5, "specificity": 0.25, "auc": 0.6}}, columns=PIXEL_COLUMNS)
    assert pix.splitlines()[2] == "| AE | 0.5000 | 0.2500 | 0.6000 |"


def test_write_report_and_csv_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(70, int), np.ones(30, int), -np.ones(5, int)]
    a = rng.normal(size=105) + 2 * (labels == 1)
    csv_path = tmp_path / "scores.csv"
    csv_path.write_text("volume_id,label,A\n" + "".join(f"v{i % 3},{lab},{s:.17g}\n" for i, (lab, s) in
                                                          enumerate(zip(labels, a, strict=True))))
    table = read_scores_csv(csv_path)
    assert table["volume_id"].dtype.kind == "U" and np.allclose(table["A"], a)
    pix = pixel_metrics(rng.random((2, 4, 4)), np.eye(4)[None].repeat(2, 0))
    paths = write_report(tmp_path / "out", {"A": table["A"]}, table["label"], pixel=pix, source="test")
    data = json.loads(paths["json"].read_text())
    assert data["n_patches"] == 100 and data["n_anomalous"] == 30
    assert data["image_level"]["A"]["auc"] == pytest.approx(roc_auc(a, labels))
    assert data["pixel_level"]["auc"] == pytest.approx(pix.auc)
    assert "## Pixel level" in paths["markdown"].read_text()
    for key in ("roc", "histograms"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 300
    with pytest.raises(OctpipeError, match="overwrite"):
        write_report(tmp_path / "out", {"A": table["A"]}, table["label"])
    bad = tmp_path / "bad.csv"
    bad.write_text("A,B\n1,2\n")
    with pytest.raises(OctpipeError, match="no label column"):
        read_scores_csv(bad)
