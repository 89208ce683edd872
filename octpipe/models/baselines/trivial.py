"""Two trivial baselines that tell whether a benchmark is too easy (issue 7).

- :class:`MeanIntensity`: the patch's mean intensity, negated (fluid is dark, so a darker patch
  scores higher).
- :class:`DarkFraction`: the fraction of dark pixels inside the retina. Per column, the tissue
  span runs from the first to the last pixel whose locally smoothed intensity exceeds a tissue
  threshold; a pixel is dark when it is below a darkness threshold. Both thresholds are fitted
  on normal training patches: tissue = Otsu's threshold of the smoothed intensities, dark = the
  ``dark_percentile`` of the intensities inside the tissue spans.

If either reaches 0.90 AUC on a benchmark, that benchmark cannot tell the learned methods apart.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from octpipe.models.baselines.common import PatchData, load_patches

__all__ = ["MeanIntensity", "DarkFraction", "tissue_span_mask"]


class MeanIntensity:
    """Score = −mean intensity of the patch (no training needed).

    Examples
    --------
    >>> MeanIntensity.train(None).score(np.full((2, 4, 4), 0.5))["mean_intensity"].tolist()
    [-0.5, -0.5]
    """

    name = "mean intensity"
    score_names = ("mean_intensity",)

    def __init__(self) -> None:
        self.train_seconds = 0.0

    @classmethod
    def train(cls, data: PatchData | None = None, config: object = None) -> MeanIntensity:
        """Nothing to fit; the arguments are accepted for a uniform interface."""
        return cls()

    def score(self, patches: npt.ArrayLike, **_: object) -> dict[str, npt.NDArray[np.float32]]:
        """``{'mean_intensity': −mean(x)}`` per patch, float32 ``(N,)``."""
        x = load_patches(np.asarray(patches))
        return {"mean_intensity": (-x.reshape(len(x), -1).mean(1)).astype(np.float32)}


def tissue_span_mask(x: npt.ArrayLike, tissue_threshold: float, *, smooth_px: int = 5) -> npt.NDArray[np.bool_]:
    """Per column, True from the first to the last row whose smoothed intensity exceeds the threshold.

    Parameters
    ----------
    x : array
        Patches ``(N, H, W)``.
    tissue_threshold : float
        Intensity above which a smoothed pixel is tissue.
    smooth_px : int, default 5
        Side of the box filter (per patch, in the image plane).

    Returns
    -------
    ndarray of bool
        ``(N, H, W)``.

    Examples
    --------
    >>> x = np.full((1, 6, 2), -1.0); x[0, 2] = 1.0; x[0, 4] = 1.0
    >>> tissue_span_mask(x, 0.0, smooth_px=1)[0, :, 0].astype(int).tolist()
    [0, 0, 1, 1, 1, 0]
    """
    arr = np.asarray(x, dtype=np.float32)
    smooth = ndi.uniform_filter(arr, size=(1, smooth_px, smooth_px), mode="nearest")
    tissue = smooth > tissue_threshold
    rows = np.arange(arr.shape[1])[None, :, None]
    any_tissue = tissue.any(axis=1, keepdims=True)
    first = np.where(any_tissue, tissue.argmax(axis=1)[:, None, :], arr.shape[1])
    last = np.where(any_tissue, arr.shape[1] - 1 - tissue[:, ::-1].argmax(axis=1)[:, None, :], -1)
    return (rows >= first) & (rows <= last)


class DarkFraction:
    """Score = fraction of dark pixels inside the retina (thresholds fitted on normal patches).

    Parameters
    ----------
    tissue_threshold, dark_threshold : float
        See the module docstring.
    smooth_px : int
        Box filter side for the tissue test.

    Examples
    --------
    >>> x = np.where(np.arange(16)[None, :, None] % 4 == 0, 1.0, 0.2) * np.ones((4, 16, 16))
    >>> m = DarkFraction.train(x)
    >>> float(m.score(x)["dark_fraction"][0]) < 0.5
    True
    """

    name = "dark fraction"
    score_names = ("dark_fraction",)

    def __init__(self, tissue_threshold: float, dark_threshold: float, *, smooth_px: int = 5) -> None:
        self.tissue_threshold = float(tissue_threshold)
        self.dark_threshold = float(dark_threshold)
        self.smooth_px = smooth_px
        self.train_seconds = 0.0

    @classmethod
    def train(cls, data: PatchData, config: object = None, *, dark_percentile: float = 5.0, smooth_px: int = 5,
              max_patches: int = 20000, seed: int = 0) -> DarkFraction:
        """Fit the tissue and darkness thresholds on normal training patches.

        Parameters
        ----------
        data : store path or array
            Normal patches.
        config : object, optional
            Ignored (uniform interface).
        dark_percentile : float, default 5.0
            Percentile of in-tissue intensities that defines "dark".
        smooth_px : int, default 5
            Box filter side for the tissue test.
        max_patches : int, default 20000
            Use at most this many patches.
        seed : int, default 0
            Seed of the subset.

        Returns
        -------
        DarkFraction
        """
        from skimage.filters import threshold_otsu

        t0 = time.perf_counter()
        x = load_patches(data, max_patches=max_patches, seed=seed)
        smooth = ndi.uniform_filter(x, size=(1, smooth_px, smooth_px), mode="nearest")
        tissue_t = float(threshold_otsu(smooth.ravel()))
        inside = tissue_span_mask(x, tissue_t, smooth_px=smooth_px)
        values = x[inside] if inside.any() else x.ravel()
        model = cls(tissue_t, float(np.percentile(values, dark_percentile)), smooth_px=smooth_px)
        model.train_seconds = time.perf_counter() - t0
        return model

    def score(self, patches: npt.ArrayLike, **_: object) -> dict[str, npt.NDArray[np.float32]]:
        """``{'dark_fraction': …}`` per patch (0 when a patch has no tissue), float32 ``(N,)``."""
        x = load_patches(np.asarray(patches))
        inside = tissue_span_mask(x, self.tissue_threshold, smooth_px=self.smooth_px)
        dark = (x < self.dark_threshold) & inside
        n_in = inside.reshape(len(x), -1).sum(1)
        frac = dark.reshape(len(x), -1).sum(1) / np.maximum(n_in, 1)
        return {"dark_fraction": frac.astype(np.float32)}
