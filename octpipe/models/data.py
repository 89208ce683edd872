"""PyTorch datasets that stream patches from a store, never loading the whole set.

:class:`PatchDataset` is map-style (random access; it keeps the last decoded Zarr
chunk, so sequential or chunk-grouped access is cheap). :class:`ChunkedPatchStream` is
iterable: it visits the Zarr chunks in a seeded random order, shuffles inside each
chunk and splits the chunks across DataLoader workers, so each chunk is read and
decompressed once per epoch. Both open the store lazily in each worker process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

__all__ = ["PatchDataset", "ChunkedPatchStream"]


def _open_split(store: Path, split: str):
    from octpipe.store import open_patch_split

    return open_patch_split(store, split)


class PatchDataset(Dataset):
    """Patches of one split as ``(x, label)`` tensors, ``x`` of shape (1, 64, 64) float32.

    Parameters
    ----------
    store : path
        The store.
    split : str
        ``"train"`` or ``"test"``.
    return_index : bool
        Also return the (volume, bscan, row, col) index row.
    """

    def __init__(self, store: str | Path, split: str, *, return_index: bool = False) -> None:
        self.store = Path(store)
        self.split = split
        self.return_index = return_index
        group = _open_split(self.store, split)
        self._n = int(group["x"].shape[0])
        self._chunk = int(group["x"].chunks[0])
        self._group = None
        self._cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._n

    def _chunk_arrays(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != c:
            if self._group is None:  # opened lazily, once per worker process
                self._group = _open_split(self.store, self.split)
            sl = slice(c * self._chunk, min((c + 1) * self._chunk, self._n))
            self._cache = (c, self._group["x"][sl], self._group["label"][sl], self._group["index"][sl])
        return self._cache[1:]

    def __getitem__(self, i: int):
        if not -self._n <= i < self._n:
            raise IndexError(f"patch {i} out of range for {self._n} patches")
        i %= self._n
        x, label, index = self._chunk_arrays(i // self._chunk)
        j = i % self._chunk
        out = (torch.from_numpy(x[j].astype(np.float32))[None], torch.tensor(int(label[j])))
        return (*out, torch.from_numpy(index[j].astype(np.int64))) if self.return_index else out


class ChunkedPatchStream(IterableDataset):
    """Shuffled stream of ``(x, label)`` patches, one Zarr chunk at a time.

    Parameters
    ----------
    store, split : as for :class:`PatchDataset`
    seed : int
        Shuffle seed; the epoch number is added (see :meth:`set_epoch`).
    shuffle : bool
        Shuffle chunk order and patches within a chunk.
    hflip : bool
        Random horizontal flip with p = 0.5 (the paper's only augmentation).
    """

    def __init__(self, store: str | Path, split: str, *, seed: int = 0, shuffle: bool = True,
                 hflip: bool = False) -> None:
        self.store = Path(store)
        self.split = split
        self.seed = seed
        self.shuffle = shuffle
        self.hflip = hflip
        self.epoch = 0
        group = _open_split(self.store, split)
        self._n = int(group["x"].shape[0])
        self._chunk = int(group["x"].chunks[0])

    def __len__(self) -> int:
        return self._n

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle for the next pass."""
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch])
        n_chunks = -(-self._n // self._chunk)
        order = rng.permutation(n_chunks) if self.shuffle else np.arange(n_chunks)
        group = _open_split(self.store, self.split)
        local = np.random.default_rng([self.seed, self.epoch, worker + 1])
        for c in order[worker::n_workers]:
            sl = slice(int(c) * self._chunk, min((int(c) + 1) * self._chunk, self._n))
            x = group["x"][sl].astype(np.float32)
            labels = group["label"][sl]
            inner = local.permutation(len(x)) if self.shuffle else np.arange(len(x))
            for j in inner:
                patch = x[j]
                if self.hflip and local.random() < 0.5:
                    patch = patch[:, ::-1]
                yield torch.from_numpy(np.ascontiguousarray(patch))[None], torch.tensor(int(labels[j]))
