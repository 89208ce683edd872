"""Work on a volume a slab of B-scans at a time, so temporaries stay small.

Preprocessing steps that treat every B-scan (or every pixel) alone give the same result
whether they see the whole volume or consecutive slabs of it. Run on slabs, their float64
and intermediate arrays are the size of one slab, not of the volume: a 49-B-scan
496 x 768 volume (71 MiB as float32) then needs a few tens of MiB beyond its input and
output instead of several times its size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import EllipsisType

import numpy as np
import numpy.typing as npt

__all__ = ["BLOCK_ELEMENTS", "slabs", "map_blocks"]

#: Elements per slab (at least one B-scan each): float64 temporaries of 8 MiB.
BLOCK_ELEMENTS = 1 << 20


def slabs(shape: tuple[int, ...], elements: int | None = None) -> Iterator[slice | EllipsisType]:
    """Slices along the first axis of an array of ``shape``, each about ``elements`` elements.

    ``elements`` defaults to :data:`BLOCK_ELEMENTS`; a slab holds at least one B-scan. A
    0-d shape gets one ``...`` (the whole array).

    Examples
    --------
    >>> list(slabs((5, 2, 3), elements=12))
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    if not shape:
        yield ...
        return
    per = int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, (BLOCK_ELEMENTS if elements is None else elements) // max(1, per))
    for i in range(0, shape[0], step):
        yield slice(i, min(i + step, shape[0]))


def map_blocks(fn: Callable[[np.ndarray], np.ndarray], data: npt.ArrayLike, *,
               out: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
    """``fn(data)`` as float32, computed slab by slab along the first axis.

    ``fn`` must be element-wise (each output value depends on its input value only), so the
    result equals ``fn(data).astype(np.float32)``. ``out`` may be ``data`` itself (in place).

    Examples
    --------
    >>> x = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    >>> bool(np.array_equal(map_blocks(np.sqrt, x), np.sqrt(x)))
    True
    """
    arr = np.asarray(data)
    if out is None:
        out = np.empty(arr.shape, dtype=np.float32)
    for sl in slabs(arr.shape):
        out[sl] = fn(arr[sl])
    return out
