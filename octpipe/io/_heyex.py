"""Constants shared by the Heidelberg Heyex readers and writers (.vol, .E2E, XML export)."""

from __future__ import annotations

import numpy as np

__all__ = ["HEYEX_LAYER_NAMES", "FLT_MAX", "INVALID_FROM"]

#: Heyex boundary index -> name; the same indices in .vol segmentation blocks, E2E
#: layer chunks and the SegLine names of XML exports.
HEYEX_LAYER_NAMES: tuple[str, ...] = (
    "ILM", "BM", "RNFL", "GCL", "IPL", "INL", "OPL", "ONL", "ELM", "IOS",
    "OPT", "CHO", "VIT", "ANT", "PR1", "PR2", "RPE", "IPL+", "IPL-",
)

#: float32 maximum, which Heyex stores for "no data" (pixels, boundaries, quality).
FLT_MAX = float(np.finfo(np.float32).max)

#: Stored float values at or above this are "no data" (FLT_MAX and the ``3e+038`` of XML exports).
INVALID_FROM = 3.0e38
