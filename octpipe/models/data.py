"""The patch stream: deterministic, chunk-friendly batches from a store's patch split.

:class:`PatchSource` holds one split's labels and indices in memory and reads patches chunk
by chunk (each Zarr chunk decoded once while it is in the cache). :class:`BatchStream` draws
batches over a subset of its patches in an order that is a seeded function of the epoch
(chunks visited in random order a few at a time, patches shuffled within them), with a
position that a checkpoint saves and a resumed run restores. Training reads its patches
through these two classes only (:mod:`octpipe.models.fanogan.train`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from octpipe.errors import OctpipeError

if TYPE_CHECKING:
    from octpipe.models.fanogan.runtime import Dist

__all__ = ["PatchSource", "BatchStream", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (NumPy ``SeedSequence``).

    Examples
    --------
    >>> derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    True
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class PatchSource:
    """One patch split of a store: labels and indices in memory, patches read chunk by chunk.

    Parameters
    ----------
    store : path
        The store.
    split : str
        The split's name (``train``, ``test`` or a ``--name`` of ``octpipe patches``).
    cache_chunks : int
        Decoded Zarr chunks kept (least recently used first out).

    Attributes
    ----------
    n : int
        Number of patches.
    chunk : int
        Patches per Zarr chunk.
    labels : ndarray (n,)
        0 normal, 1 anomalous, -1 unknown.
    index : ndarray (n, 4)
        Volume number, B-scan, row and column of each patch.
    volume_numbers : ndarray (n,)
        ``index[:, 0]``.
    """

    def __init__(self, store: Path, split: str, *, cache_chunks: int = 9) -> None:
        from octpipe.store import open_patch_split

        group = open_patch_split(store, split)
        self.split = split
        self.x = group["x"]
        self.n = int(self.x.shape[0])
        self.chunk = int(self.x.chunks[0])
        self.patch_size = tuple(int(s) for s in self.x.shape[1:])
        self.labels = np.asarray(group["label"][...])
        self.index = np.asarray(group["index"][...]) if self.n else np.zeros((0, 4), np.int32)
        self.volume_numbers = self.index[:, 0]
        self.cache_chunks = cache_chunks
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _chunk_data(self, c: int) -> np.ndarray:
        data = self._cache.get(c)
        if data is None:
            data = np.asarray(self.x[c * self.chunk:min((c + 1) * self.chunk, self.n)])
            self._cache[c] = data
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(c)
        return data

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Patches ``idx`` (any order) as float32 ``(len(idx), H, W)``."""
        out = np.empty((len(idx), *self.patch_size), np.float32)
        chunks = idx // self.chunk
        for c in np.unique(chunks):
            sel = chunks == c
            out[sel] = self._chunk_data(int(c))[idx[sel] - int(c) * self.chunk]
        return out


class BatchStream:
    """Deterministic batches over ``indices`` with a saved position.

    The order of epoch ``e`` depends only on (seed, stream, e): the chunks are visited in a seeded
    random order, ``window`` chunks at a time, and the patches of each window are shuffled; each
    position also gets a seeded flip. A global batch is ``batch_size × world`` consecutive
    positions, of which rank ``r`` takes the ``r``-th slice; the last incomplete global batch of an
    epoch is dropped. :meth:`state` / :meth:`load_state` save and restore the position, so a
    resumed run reads the same batches as an uninterrupted one.

    Parameters
    ----------
    source : PatchSource
        The split.
    indices : ndarray of int
        The patches to draw from (e.g. the training patches after holding out normal ones).
    batch_size : int
        Patches per batch of this process.
    d : Dist
        This process's rank and the number of processes.
    seed, stream : int
        The order of epoch ``e`` is a function of ``(seed, stream, e)`` only.
    hflip : bool
        Flip half the patches horizontally (a seeded flip per position).
    window : int
        Chunks shuffled together.
    """

    def __init__(self, source: PatchSource, indices: np.ndarray, *, batch_size: int, d: Dist, seed: int,
                 stream: int, hflip: bool, window: int) -> None:
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        self.batch_size = batch_size
        self.d = d
        self.seed = seed
        self.stream = stream
        self.hflip = hflip
        self.window = window
        self.per_step = batch_size * d.world
        if len(self.indices) < self.per_step:
            raise OctpipeError(f"split {source.split!r} has {len(self.indices)} training patches, fewer than one "
                               f"batch of {batch_size} × {d.world} process(es); lower the batch size")
        self.epoch = 0
        self.offset = 0
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng(derive_seed(self.seed, self.stream, epoch))
            chunk_of = self.indices // self.source.chunk
            chunks = np.unique(chunk_of)
            rank = np.empty(int(chunks.max()) + 1, np.int64)
            rank[rng.permutation(chunks)] = np.arange(len(chunks))
            window_of = rank[chunk_of] // self.window
            order = self.indices[np.lexsort((rng.random(len(self.indices)), window_of))]
            flips = rng.random(len(order)) < 0.5
            self._order = (epoch, order, flips)
        return self._order[1], self._order[2]

    def next(self) -> np.ndarray:
        """The next batch of this rank, float32 ``(batch_size, 1, H, W)``."""
        if self.offset + self.per_step > len(self.indices):
            self.epoch += 1
            self.offset = 0
        order, flips = self._epoch_order(self.epoch)
        start = self.offset + self.d.rank * self.batch_size
        sl = slice(start, start + self.batch_size)
        x = self.source.read(order[sl])
        if self.hflip:
            f = flips[sl]
            x[f] = x[f][:, :, ::-1]
        self.offset += self.per_step
        return x[:, None]

    def state(self) -> dict[str, int]:
        """The position: ``{"epoch": ..., "offset": ...}``."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue from a position :meth:`state` returned."""
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
