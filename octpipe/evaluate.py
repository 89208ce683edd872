"""Anomaly-detection statistics in the f-AnoGAN paper's layout (Tables 1, 2, B1; Figs. 8, B3).

Image level: ROC AUC, and precision, sensitivity, specificity and F1 at the Youden index (the
threshold maximising sensitivity + specificity − 1). Pixel level: the same on every pixel of
the residual maps ``|x − x̂|`` against the lesion masks. Label 1 = anomalous, 0 = normal;
rows with another label (-1 = unknown) are left out. Higher scores mean more anomalous; a
patch is called anomalous when its score is ``>=`` the threshold.

The ROC AUC is the Mann–Whitney statistic computed from average ranks, so tied scores count
one half, exactly as the area under the ROC curve through the tied points.

Sources: a scores CSV (``octpipe score``: columns ``label``, ``A_R``, ``A_D``, ``A`` …) or a
store and a model run (:func:`evaluate_run`, which also gives the pixel level).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

from octpipe.errors import OctpipeError

__all__ = [
    "roc_auc",
    "roc_curve",
    "youden_statistics",
    "image_metrics",
    "pixel_metrics",
    "DetectionMetrics",
    "read_scores_csv",
    "evaluate_scores",
    "evaluate_run",
    "plot_roc",
    "plot_histograms",
    "markdown_table",
    "write_report",
    "IMAGE_COLUMNS",
    "PIXEL_COLUMNS",
]

#: Columns of the image-level tables (paper Tables 1 and 2).
IMAGE_COLUMNS = ("precision", "sensitivity", "specificity", "f1", "auc")
#: Columns of the pixel-level table (paper Table B1).
PIXEL_COLUMNS = ("sensitivity", "specificity", "auc")


def _clean(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    keep = (y == 0) | (y == 1)
    s, y = s[keep], y[keep].astype(bool)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve from average ranks (ties count one half).

    Parameters
    ----------
    scores : array_like
        Higher = more anomalous.
    labels : array_like
        1 anomalous, 0 normal; other values are ignored.

    Returns
    -------
    float
        AUC in [0, 1]; NaN when one class is empty.

    Raises
    ------
    ValueError
        If the lengths differ or a score is not finite.

    Examples
    --------
    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> roc_auc([1, 1, 1], [0, 1, 1])
    0.5
    """
    s, y = _clean(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks: ties share their mean rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve through every distinct threshold (``score >= t`` is positive).

    Parameters
    ----------
    scores, labels : array_like
        As for :func:`roc_auc`.

    Returns
    -------
    fpr, tpr, thresholds : ndarray
        Starting at (0, 0) with threshold ``+inf``, then one point per distinct score in
        decreasing order, ending at (1, 1).

    Examples
    --------
    >>> fpr, tpr, t = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    s, y = _clean(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, int)
    tps = np.cumsum(y)[last] if s.size else np.zeros(0)
    fps = (last + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def youden_statistics(scores: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, float]:
    """Statistics at the Youden index (max sensitivity + specificity − 1).

    Parameters
    ----------
    scores, labels : array_like
        As for :func:`roc_auc`.

    Returns
    -------
    dict
        ``threshold``, ``youden``, ``precision``, ``sensitivity``, ``specificity``, ``f1``,
        ``tp``, ``fp``, ``tn``, ``fn``. The first of tied optimal thresholds (the highest) is used.

    Examples
    --------
    >>> st = youden_statistics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    >>> st["threshold"], st["sensitivity"], st["specificity"]
    (0.8, 0.5, 1.0)
    """
    s, y = _clean(scores, labels)
    fpr, tpr, thresholds = roc_curve(s, y)
    j = tpr - fpr
    best = int(np.argmax(j[1:]) + 1) if j.size > 1 else 0
    t = float(thresholds[best])
    pred = s >= t
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    tn = int((~pred & ~y).sum())
    fn = int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"threshold": t, "youden": float(j[best]), "precision": precision, "sensitivity": sens,
            "specificity": spec, "f1": f1, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


@dataclass(frozen=True)
class DetectionMetrics:
    """AUC and Youden statistics of one score.

    Attributes
    ----------
    auc, precision, sensitivity, specificity, f1, threshold, youden : float
        As in the paper's tables.
    n, n_anomalous : int
        Samples (patches or pixels) evaluated and how many are anomalous.
    """

    auc: float
    precision: float
    sensitivity: float
    specificity: float
    f1: float
    threshold: float
    youden: float
    n: int
    n_anomalous: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-safe dict (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in self.__dict__.items()}


def image_metrics(scores: npt.ArrayLike, labels: npt.ArrayLike) -> DetectionMetrics:
    """Image-level AUC and Youden statistics (paper Tables 1 and 2).

    Parameters
    ----------
    scores : array_like
        One score per patch, higher = more anomalous.
    labels : array_like
        1 anomalous, 0 normal (others ignored).

    Returns
    -------
    DetectionMetrics

    Raises
    ------
    ValueError
        If there are no normal or no anomalous samples.

    Examples
    --------
    >>> image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]).auc
    0.75
    """
    s, y = _clean(scores, labels)
    if y.all() or not y.any():
        raise ValueError(f"need normal and anomalous samples, got {int(y.sum())} anomalous of {y.size}")
    st = youden_statistics(s, y)
    return DetectionMetrics(auc=roc_auc(s, y), precision=st["precision"], sensitivity=st["sensitivity"],
                            specificity=st["specificity"], f1=st["f1"], threshold=st["threshold"],
                            youden=st["youden"], n=int(y.size), n_anomalous=int(y.sum()))


def pixel_metrics(residuals: npt.ArrayLike, masks: npt.ArrayLike, *, max_pixels: int = 0, seed: int = 0
                  ) -> DetectionMetrics:
    """Pixel-level AUC and Youden statistics of residual maps against lesion masks (Table B1).

    Parameters
    ----------
    residuals : array_like
        ``|x − x̂|`` maps, any shape (e.g. ``(N, H, W)``).
    masks : array_like
        Lesion masks of the same shape (non-zero = lesion pixel).
    max_pixels : int, default 0
        Evaluate a seeded random subset of at most this many pixels (0 = all).
    seed : int, default 0
        Seed of the subset.

    Returns
    -------
    DetectionMetrics

    Raises
    ------
    ValueError
        If the shapes differ or no pixel is a lesion.
    """
    r = np.asarray(residuals, dtype=np.float32)
    m = np.asarray(masks)
    if r.shape != m.shape:
        raise ValueError(f"residuals {r.shape} and masks {m.shape} differ in shape")
    r, y = r.ravel(), (m.ravel() > 0).astype(np.int8)
    if max_pixels and r.size > max_pixels:
        keep = np.random.default_rng(seed).choice(r.size, max_pixels, replace=False)
        r, y = r[keep], y[keep]
    return image_metrics(r, y)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def read_scores_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Read a scores CSV (``octpipe score``) into columns; numeric columns become float arrays.

    Raises
    ------
    OctpipeError
        If the file is missing, empty or has no ``label`` column.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise OctpipeError(f"cannot read scores: {exc.strerror or exc}", path) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise OctpipeError(f"not a scores CSV (octpipe score writes one): {type(exc).__name__}", path) from None
    if not rows:
        raise OctpipeError("no rows in the scores CSV", path)
    if "label" not in rows[0]:
        raise OctpipeError(f"the scores CSV has no label column (columns: {', '.join(rows[0])})", path)
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        try:
            out[key] = np.array([float(v) for v in values])
        except ValueError:
            out[key] = np.array(values)
    return out


def evaluate_scores(scores: Mapping[str, npt.ArrayLike], labels: npt.ArrayLike) -> dict[str, DetectionMetrics]:
    """Image-level metrics of several scores of the same patches.

    Parameters
    ----------
    scores : mapping of str to array_like
        Score name → one value per patch.
    labels : array_like
        Patch labels.

    Returns
    -------
    dict of str to DetectionMetrics
    """
    return {name: image_metrics(values, labels) for name, values in scores.items()}


def evaluate_run(store: str | Path, run: str | Path, *, split: str = "test", batch_size: int = 256,
                 pixel: bool = True, max_pixels: int = 0, device: str = "auto"
                 ) -> tuple[dict[str, np.ndarray], dict[str, DetectionMetrics], DetectionMetrics | None]:
    """Score a store split with an f-AnoGAN run; image-level metrics of each score and pixel level.

    Parameters
    ----------
    store : path
        A store with ``patches/<split>`` (labels and, for annotated volumes, masks).
    run : path
        An ``octpipe train`` run directory.
    split : str, default 'test'
        Patch split.
    batch_size : int, default 256
        Patches per forward pass.
    pixel : bool, default True
        Also compute the pixel-level metrics of ``|x − G(E(x))|`` against the masks (patches
        without a mask are left out).
    max_pixels : int, default 0
        Pixel subset size (0 = all).
    device : str, default 'auto'
        ``auto``, ``cpu`` or ``cuda``.

    Returns
    -------
    scores : dict
        ``label`` and every score column, one value per patch.
    image : dict of str to DetectionMetrics
        Per score (``A``, ``A_R``, ``A_D``, ``z_distance``).
    pixel : DetectionMetrics or None
        None when ``pixel`` is False or no patch has a lesion pixel.

    Raises
    ------
    OctpipeError
        If the split is missing.
    """
    from octpipe.models.fanogan.checkpoint import load_run
    from octpipe.models.fanogan.score import SCORE_NAMES, pixel_residual, score_patches
    from octpipe.store import open_patch_split

    model = load_run(run)
    group = open_patch_split(store, split, patch_size=model.image_size)
    x = np.asarray(group["x"][...], dtype=np.float32)[:, None]
    labels = np.asarray(group["label"][...])
    s = score_patches(model, x, batch_size=batch_size, device=device)
    scores: dict[str, np.ndarray] = {"label": labels, **{k: s[k] for k in SCORE_NAMES}}
    image = evaluate_scores({k: s[k] for k in ("A", "A_R", "A_D", "z_distance")}, labels)
    pix = None
    if pixel and "mask" in group:
        masks = np.asarray(group["mask"][...])
        known = (labels == 0) | (labels == 1)
        if (masks[known] > 0).any():
            r = pixel_residual(model, x[known], batch_size=batch_size, device=device)[:, 0]
            pix = pixel_metrics(r, masks[known], max_pixels=max_pixels)
    return scores, image, pix


# --------------------------------------------------------------------------------------------
# Figures and tables
# --------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]], path: str | Path, *,
             title: str = "ROC") -> Path:
    """ROC curves of several methods in one figure (paper Fig. 8), AUC in the legend.

    Parameters
    ----------
    curves : mapping
        Method name → ``(scores, labels)``.
    path : path
        PNG to write.
    title : str
        Figure title.

    Returns
    -------
    Path
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=110)
    for name, (s, y) in curves.items():
        fpr, tpr, _ = roc_curve(s, y)
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} ({roc_auc(s, y):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_histograms(scores: Mapping[str, npt.ArrayLike], labels: npt.ArrayLike, path: str | Path, *,
                    bins: int = 50) -> Path:
    """Histograms of normal vs anomalous scores, one panel per score (paper Fig. B3).

    Parameters
    ----------
    scores : mapping of str to array_like
        Score name → one value per patch.
    labels : array_like
        Patch labels.
    path : path
        PNG to write.
    bins : int, default 50
        Bins per panel (shared by both classes).

    Returns
    -------
    Path
    """
    plt = _pyplot()
    n = max(len(scores), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, (name, values) in zip(axes.ravel(), scores.items(), strict=False):
        s, y = _clean(values, labels)
        edges = np.histogram_bin_edges(s, bins=bins)
        ax.hist(s[~y], bins=edges, alpha=0.6, density=True, label=f"normal (n={int((~y).sum())})", color="tab:blue")
        ax.hist(s[y], bins=edges, alpha=0.6, density=True, label=f"anomalous (n={int(y.sum())})", color="tab:red")
        ax.set(title=name, xlabel="score", ylabel="density")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def markdown_table(rows: Mapping[str, DetectionMetrics | Mapping[str, Any]], *, columns: Sequence[str] = IMAGE_COLUMNS,
                   paper: Mapping[str, Mapping[str, float]] | None = None, label: str = "method") -> str:
    """A Markdown table in the paper's layout (one row per method).

    Parameters
    ----------
    rows : mapping
        Method → :class:`DetectionMetrics` (or a dict with the columns).
    columns : sequence of str
        :data:`IMAGE_COLUMNS` (Tables 1, 2) or :data:`PIXEL_COLUMNS` (Table B1).
    paper : mapping, optional
        Method → the paper's values; adds ``paper <column>`` cells after each row's values.
    label : str
        Header of the first column.

    Returns
    -------
    str

    Examples
    --------
    >>> m = image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    >>> print(markdown_table({"x": m}, columns=("auc",)))
    | method | AUC |
    |---|---|
    | x | 0.7500 |
    """
    names = {"precision": "precision", "sensitivity": "sensitivity", "specificity": "specificity", "f1": "F1",
             "auc": "AUC"}
    header = [label, *(names.get(c, c) for c in columns)]
    if paper:
        header += [f"paper {names.get(c, c)}" for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, metrics in rows.items():
        d = metrics.to_dict() if isinstance(metrics, DetectionMetrics) else dict(metrics)
        cells = [method, *(_fmt(d.get(c)) for c in columns)]
        if paper:
            ref = paper.get(method, {})
            cells += [_fmt(ref.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: str | Path, scores: Mapping[str, npt.ArrayLike], labels: npt.ArrayLike, *,
                 pixel: DetectionMetrics | None = None, source: str = "", overwrite: bool = False
                 ) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.md``, ``roc.png`` and ``histograms.png`` to ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Output folder (created).
    scores : mapping of str to array_like
        Score name → one value per patch.
    labels : array_like
        Patch labels.
    pixel : DetectionMetrics, optional
        Pixel-level metrics to include.
    source : str
        Where the scores came from (for the record).
    overwrite : bool, default False
        Replace existing outputs.

    Returns
    -------
    dict of str to Path

    Raises
    ------
    OctpipeError
        If an output exists and ``overwrite`` is False.
    """
    out = Path(out_dir)
    paths = {"json": out / "metrics.json", "markdown": out / "metrics.md", "roc": out / "roc.png",
             "histograms": out / "histograms.png"}
    if not overwrite:
        for p in paths.values():
            if p.exists():
                raise OctpipeError("output exists; pass --overwrite to replace it", p)
    out.mkdir(parents=True, exist_ok=True)
    image = evaluate_scores(scores, labels)
    y = np.asarray(labels)
    known = (y == 0) | (y == 1)
    data: dict[str, Any] = {
        "source": source,
        "n_patches": int(known.sum()),
        "n_anomalous": int((y == 1).sum()),
        "image_level": {k: v.to_dict() for k, v in image.items()},
        "pixel_level": pixel.to_dict() if pixel is not None else None,
    }
    from octpipe import __version__

    data["octpipe_version"] = __version__
    paths["json"].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md = [f"# Anomaly detection: {source}" if source else "# Anomaly detection", "",
          f"{data['n_patches']} patches, {data['n_anomalous']} anomalous. Statistics at the Youden index.", "",
          "## Image level", "", markdown_table(image, label="score"), ""]
    if pixel is not None:
        md += ["## Pixel level (residual |x − x̂| against lesion masks)", "",
               markdown_table({"residual": pixel}, columns=PIXEL_COLUMNS, label="map"), ""]
    paths["markdown"].write_text("\n".join(md), encoding="utf-8")
    plot_roc({k: (v, labels) for k, v in scores.items()}, paths["roc"], title="Image-level ROC")
    plot_histograms(scores, labels, paths["histograms"])
    return paths
