"""Patch positions, extraction and the patch datasets in the store (the paper's 64×64 patches).

Pure functions compute where patches go (:func:`grid_starts`, :func:`patch_grid`,
:func:`random_starts`) and cut them out (:func:`extract_patches`); every patch carries
its location. :func:`write_patch_split` runs one Dask task per volume and streams the
patches into ``STORE/patches/<split>/`` (``x``, ``index``, ``label``, ``mask``), chunked
along n and compressed.

Splits: ``train`` takes K random positions per B-scan from healthy volumes (the paper
trains on normal patches only); ``test`` lays a regular grid (stride 32 by default, the
last patch flush with the border) over the flattened retina of every volume. A patch's
label is 1 when any pixel is a lesion, 0 when none is (or the volume is known healthy),
-1 when unknown. A split can be written under another name (``name=``, e.g. a grid of
held-out normal volumes as ``patches/calib``).

The ``train`` split is stored in a seeded random order across volumes (a full permutation,
done in blocks of bounded memory), so that the training stream, which mixes a few chunks at a
time, draws every batch from many volumes, as the official code's full reshuffle does.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import product
from pathlib import Path

import numpy as np
import numpy.typing as npt

from octpipe.edge import run_tasks, staged_dir
from octpipe.errors import OctpipeError

__all__ = [
    "grid_starts",
    "patch_grid",
    "random_starts",
    "extract_patches",
    "patch_labels",
    "volume_patch_index",
    "PatchSplitResult",
    "write_patch_split",
    "SPLITS",
]

SPLITS = ("train", "test")

#: Memory budget of one block of the cross-volume shuffle of the train split.
SHUFFLE_BLOCK_BYTES = 256 << 20


def grid_starts(size: int, patch: int, stride: int) -> npt.NDArray[np.int64]:
    """Start indices of patches along one axis; the last one ends flush with the border.

    Examples
    --------
    >>> grid_starts(10, 4, 3).tolist()
    [0, 3, 6]
    >>> grid_starts(11, 4, 3).tolist()
    [0, 3, 6, 7]
    """
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got patch={patch}, stride={stride}")
    if patch > size:
        raise ValueError(f"patch size {patch} is larger than the image size {size}")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return np.asarray(starts, dtype=np.int64)


def patch_grid(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> npt.NDArray[np.int64]:
    """All grid starts, N-D: ``(n, ndim)``, C order, last patch flush on every axis."""
    if not len(shape) == len(patch) == len(stride):
        raise ValueError(f"shape, patch and stride need the same length, got {shape}, {patch}, {stride}")
    axes = [grid_starts(s, p, t) for s, p, t in zip(shape, patch, stride, strict=True)]
    return np.asarray(list(product(*axes)), dtype=np.int64).reshape(-1, len(shape))


def random_starts(rng: np.random.Generator, shape: Sequence[int], patch: Sequence[int], k: int
                  ) -> npt.NDArray[np.int64]:
    """``k`` uniformly random starts ``(k, ndim)`` of patches lying wholly inside ``shape``."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    highs = []
    for s, p in zip(shape, patch, strict=True):
        if p > s:
            raise ValueError(f"patch size {p} is larger than the image size {s}")
        highs.append(s - p + 1)
    return np.stack([rng.integers(0, h, size=k) for h in highs], axis=1).astype(np.int64)


def extract_patches(volume: npt.ArrayLike, index: npt.ArrayLike, patch: tuple[int, int]) -> np.ndarray:
    """Cut ``(n, ph, pw)`` patches at ``index`` rows ``(bscan, row, col)`` from a (z, h, w) volume."""
    v = np.asarray(volume)
    idx = np.asarray(index, dtype=np.int64)
    ph, pw = patch
    if v.ndim != 3 or idx.ndim != 2 or idx.shape[1] != 3:
        raise ValueError(f"need a (z, h, w) volume and (n, 3) index, got {v.shape} and {idx.shape}")
    if len(idx) and (idx.min(0) < 0).any() or len(idx) and (
            (idx[:, 1] + ph > v.shape[1]).any() or (idx[:, 2] + pw > v.shape[2]).any() or
            (idx[:, 0] >= v.shape[0]).any()):
        raise ValueError(f"patch index outside the volume of shape {v.shape}")
    # a strided view of every window, then one gather of the n windows asked for
    windows = np.lib.stride_tricks.sliding_window_view(v, (ph, pw), axis=(1, 2))
    return windows[idx[:, 0], idx[:, 1], idx[:, 2]]


def patch_labels(mask_patches: np.ndarray | None, n: int, volume_label: int) -> npt.NDArray[np.int8]:
    """1 if any lesion pixel, 0 if none; without a mask the volume label (0, or -1 unknown)."""
    if mask_patches is not None:
        return (mask_patches.reshape(len(mask_patches), -1) > 0).any(1).astype(np.int8)
    return np.full(n, 0 if volume_label == 0 else -1, dtype=np.int8)


def volume_patch_index(split: str, flat_shape: tuple[int, int, int], *, patch: int, stride: int, k: int,
                       rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """``(n, 3)`` patch positions (bscan, row, col) for one volume's flattened area."""
    nz, h, w = flat_shape
    if split == "train":
        per = [np.column_stack([np.full(k, z), random_starts(rng, (h, w), (patch, patch), k)]) for z in range(nz)]
    elif split == "test":
        grid = patch_grid((h, w), (patch, patch), (stride, stride))
        per = [np.column_stack([np.full(len(grid), z), grid]) for z in range(nz)]
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.concatenate(per).astype(np.int64) if per else np.zeros((0, 3), np.int64)


def _volume_rng(seed: int, volume_id: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, int(volume_id.lstrip("v")[:12], 16)]))


def _volume_patches(volume_id: str, store: str, split: str, patch: int, stride: int, k: int, seed: int,
                    dtype: str) -> dict[str, np.ndarray | int]:
    """One Dask task: read a volume's flattened area and mask, return its patches."""
    from octpipe.preprocess.flatten import flatten_image
    from octpipe.store import open_volume

    group = open_volume(store, volume_id)
    flat = group["flat"][...]
    attrs = dict(group.attrs)
    rng = _volume_rng(seed, volume_id)
    index = volume_patch_index(split, flat.shape, patch=patch, stride=stride, k=k, rng=rng)
    x = extract_patches(flat, index, (patch, patch)).astype(dtype)
    mask = None
    if "mask" in group and int(attrs.get("label", -1)) == 0:
        mask = np.zeros((len(index), patch, patch), np.uint8)  # annotated healthy: known empty
    elif "mask" in group:
        geometry = attrs["flatten"]
        mask_flat = flatten_image(group["mask"][...], group["flatmap"][...], height=geometry["height"],
                                  bm_row=geometry["bm_row"], order=0, fill=0)
        mask = extract_patches(mask_flat, index, (patch, patch)).astype(np.uint8)
    label = patch_labels(mask, len(index), int(attrs.get("label", -1)))
    return {"x": x, "index": index.astype(np.int32), "label": label, "mask": mask}


def _check_patch_memory(store: Path, k: int, n_bscans: int, patch: int, itemsize: int) -> None:
    """Refuse a ``k`` whose patches of one volume (held in memory at once) exceed half the RAM."""
    need = k * n_bscans * patch * patch * (itemsize + 1)  # the patches, and a mask of each at most
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no bound known
        return
    if need > ram / 2:
        raise OctpipeError(f"k={k} patches per B-scan need {need / 2**30:.1f} GiB in memory for one volume of "
                           f"{n_bscans} B-scans (half this machine's {ram / 2**30:.1f} GiB is the limit); "
                           "lower --k", store)


@dataclass
class PatchSplitResult:
    """What :func:`write_patch_split` wrote."""

    split: str
    n_patches: int
    n_volumes: int
    label_counts: dict[int, int]
    seconds: float
    path: Path


def _select_volumes(store: Path, split: str, include_unknown: bool, volume_ids: Sequence[str] | None) -> list[str]:
    from octpipe.store import complete_volumes, read_volume_attrs

    chosen = []
    for vid in sorted(complete_volumes(store).values()):
        if volume_ids is not None and vid not in volume_ids:
            continue
        attrs = read_volume_attrs(store, vid)
        if "flatten" not in attrs:
            continue  # ingested without preprocessing
        label = int(attrs.get("label", -1))
        if split == "train" and not (label == 0 or (include_unknown and label == -1)):
            continue
        chosen.append(vid)
    return chosen


def write_patch_split(
    store: str | Path,
    split: str,
    *,
    patch: int = 64,
    stride: int = 32,
    k: int = 64,
    seed: int = 0,
    volume_ids: Sequence[str] | None = None,
    include_unknown: bool = False,
    dtype: str = "float16",
    chunk: int = 1024,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    name: str | None = None,
    shuffle: bool | None = None,
) -> PatchSplitResult:
    """Write ``STORE/patches/<split>`` from the store's flattened volumes.

    Parameters
    ----------
    store : path
        An ingested store.
    split : {"train", "test"}
        ``train``: ``k`` random patches per B-scan of healthy volumes; ``test``: a grid
        with ``stride`` over every volume.
    patch, stride, k : int
        Patch size (px), grid stride (px) and random patches per B-scan.
    seed : int
        Makes the random positions reproducible (per volume, whatever the order).
    volume_ids : sequence of str, optional
        Restrict to these volumes.
    include_unknown : bool
        For ``train``, also use volumes whose health is unknown (no annotation).
    dtype : {"float16", "float32"}
        Storage type of ``x``.
    chunk : int
        Patches per Zarr chunk.
    workers, scheduler
        As for :func:`octpipe.edge.run_tasks`; ``workers=0`` runs in this process.
    overwrite : bool
        Replace an existing split.
    progress : bool
        Show a progress bar.
    name : str, optional
        Folder name under ``patches/`` (default: ``split``), e.g. ``calib`` for a grid of
        held-out normal volumes that training uses as ``data.val_split``.
    shuffle : bool, optional
        Store the patches in a seeded random order across volumes; default True for
        ``train`` (the training stream then mixes volumes as a full reshuffle does), False
        for ``test`` (kept in volume order, as export and evaluation read them).

    Returns
    -------
    PatchSplitResult
    """
    import time

    t0 = time.perf_counter()
    if split not in SPLITS:
        raise OctpipeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}", store)
    if patch < 1 or stride < 1 or k < 0 or chunk < 1:
        raise OctpipeError(f"patch and stride must be >= 1 and k >= 0, got patch={patch}, stride={stride}, k={k}",
                           store)
    if split == "train" and k < 1:
        raise OctpipeError("k must be >= 1 for --split train (random patches per B-scan), got 0", store)
    if dtype not in ("float16", "float32"):
        raise OctpipeError(f"dtype must be float16 or float32, got {dtype!r}", store)
    name = split if name is None else name
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
        raise OctpipeError(f"split name must be letters, digits, '_' or '-', got {name!r}", store)
    shuffle = (split == "train") if shuffle is None else bool(shuffle)
    store = Path(store)
    from octpipe.store import open_store, store_lock

    open_store(store, create=False)
    with store_lock(store, command="patches"):
        return _write_patch_split_locked(store, split, patch=patch, stride=stride, k=k, seed=seed,
                                         volume_ids=volume_ids, include_unknown=include_unknown, dtype=dtype,
                                         chunk=chunk, workers=workers, scheduler=scheduler, overwrite=overwrite,
                                         progress=progress, t0=t0, name=name, shuffle=shuffle)


def _write_patch_split_locked(store: Path, split: str, *, patch: int, stride: int, k: int, seed: int,
                              volume_ids: Sequence[str] | None, include_unknown: bool, dtype: str, chunk: int,
                              workers: int | None, scheduler: str | None, overwrite: bool, progress: bool,
                              t0: float, name: str, shuffle: bool) -> PatchSplitResult:
    """:func:`write_patch_split` while holding the store lock."""
    import time

    import zarr

    from octpipe.store import open_volume

    target = store / "patches" / name
    if target.exists() and not overwrite:
        raise OctpipeError(f"patches/{name} exists; pass --overwrite to replace it", store)
    vids = _select_volumes(store, split, include_unknown, volume_ids)
    if not vids:
        what = "healthy (label 0) volumes" if split == "train" else "preprocessed volumes"
        raise OctpipeError(f"no {what} in the store for split {split!r}", store)
    first = open_volume(store, vids[0])["flat"]
    if patch > first.shape[1] or patch > first.shape[2]:
        raise OctpipeError(f"patch size {patch} is larger than the flattened area {first.shape[1:]}", store)
    if split == "train":
        _check_patch_memory(store, k, first.shape[0], patch, np.dtype(dtype).itemsize)

    from octpipe.store import FAST_ZSTD

    buffers: dict[str, list[np.ndarray]] = {name: [] for name in ("x", "index", "label", "mask")}
    counts = {"n": 0, "buffered": 0}

    def create_mask_array() -> None:
        arrays["mask"] = group.create_array("mask", shape=(0, patch, patch), dtype="uint8",
                                            chunks=(chunk, patch, patch), compressors=FAST_ZSTD)

    def flush(final: bool = False) -> None:
        n_buf = counts["buffered"]
        n_write = n_buf if final else (n_buf // chunk) * chunk
        if n_write == 0:
            return
        for name in list(buffers):
            if not buffers[name]:
                continue
            data = np.concatenate(buffers[name])
            if name == "mask" and "mask" not in arrays:
                create_mask_array()
            arrays[name].append(data[:n_write], axis=0)
            buffers[name] = [data[n_write:]] if n_write < len(data) else []
        counts["buffered"] = n_buf - n_write
        counts["n"] += n_write

    def collect(number: int, result: dict) -> None:
        n = len(result["index"])
        index = np.column_stack([np.full(n, number, np.int32), result["index"]]).astype(np.int32)
        buffers["x"].append(result["x"])
        buffers["index"].append(index)
        buffers["label"].append(result["label"])
        if result["mask"] is not None:
            if not buffers["mask"] and "mask" not in arrays and counts["n"] + counts["buffered"] > 0:
                # the first annotated volume after unannotated ones: their masks are zeros
                create_mask_array()
                for start in range(0, counts["n"], chunk):
                    arrays["mask"].append(np.zeros((min(chunk, counts["n"] - start), patch, patch), np.uint8))
                if counts["buffered"]:
                    buffers["mask"].append(np.zeros((counts["buffered"], patch, patch), np.uint8))
            buffers["mask"].append(result["mask"])
        elif buffers["mask"] or "mask" in arrays:  # mixed annotated/unannotated: unknown mask is zeros
            buffers["mask"].append(np.zeros((n, patch, patch), np.uint8))
        counts["buffered"] += n
        flush()

    args = {"patch": patch, "stride": stride, "k": k, "seed": seed, "dtype": dtype}
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        task_id = bar.add_task(f"patches {split}", total=len(vids))
        bar.start()
    try:
        with staged_dir(target, under=store / ".staging", prefix="patches-") as staging:
            group = zarr.open_group(str(staging), mode="w")
            arrays = {
                "x": group.create_array("x", shape=(0, patch, patch), dtype=dtype, chunks=(chunk, patch, patch),
                                        compressors=FAST_ZSTD),
                "index": group.create_array("index", shape=(0, 4), dtype="int32", chunks=(chunk * 16, 4)),
                "label": group.create_array("label", shape=(0,), dtype="int8", chunks=(chunk * 16,)),
            }
            task = partial(_volume_patches, store=str(store), split=split, **args)
            tasks = run_tasks(task, vids, workers=workers, scheduler=scheduler, ordered=True, catch=False)
            for number, (_, result) in enumerate(tasks):
                collect(number, result)
                if bar:
                    bar.advance(task_id)
            flush(final=True)
            labels = arrays["label"][...]
            label_counts = {int(v): int((labels == v).sum()) for v in (-1, 0, 1)}
            has_mask = "mask" in arrays
            if has_mask and arrays["mask"].shape[0] != arrays["x"].shape[0]:
                raise OctpipeError("some volumes have lesion masks and others not; mask array incomplete", store)
            if shuffle and arrays["x"].shape[0] > 1:
                shuffled = staging.with_name(staging.name + "-shuffled")
                try:
                    shuffle_rows(group, shuffled, seed=seed)
                except BaseException:
                    shutil.rmtree(shuffled, ignore_errors=True)  # staged_dir removes the unshuffled copy
                    raise
                shutil.rmtree(staging)
                os.rename(shuffled, staging)
                group = zarr.open_group(str(staging), mode="r+")
                arrays = {k: group[k] for k in arrays}
            group.attrs.update({
                "split": name, "sampling": split, "order": "random" if shuffle else "volume", "volumes": vids,
                "patch": patch, "stride": stride, "k_per_bscan": k, "seed": seed,
                "dtype": dtype, "n": int(arrays["x"].shape[0]), "label_counts": label_counts,
                "index_columns": ["volume", "bscan", "row", "col"], "geometry": "flattened area (flat)",
            })
            (store / "patches").mkdir(exist_ok=True)
            if not (store / "patches" / "zarr.json").exists():
                zarr.open_group(str(store), mode="r+").require_group("patches")
    finally:
        if bar:
            bar.stop()
    return PatchSplitResult(split=split, n_patches=int(sum(label_counts.values())), n_volumes=len(vids),
                            label_counts=label_counts, seconds=round(time.perf_counter() - t0, 2), path=target)


def shuffle_rows(group, path: Path, *, seed: int, block_bytes: int = SHUFFLE_BLOCK_BYTES):
    """Copy every array of ``group`` to a new group at ``path``, rows in one seeded permutation.

    Output rows are written in blocks of at most ``block_bytes``; each block gathers its rows
    from the source one chunk at a time, so memory stays bounded whatever the split's size
    (a split of B blocks is read B times).
    """
    import zarr

    src = {k: group[k] for k in group.array_keys()}
    n = src["x"].shape[0]
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5F1A])).permutation(n)
    out = zarr.open_group(str(path), mode="w")
    dst = {k: out.create_array(k, shape=a.shape, dtype=a.dtype, chunks=a.chunks, compressors=a.compressors)
           for k, a in src.items()}
    row_bytes = sum(int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize for a in src.values())
    block = max(1, block_bytes // max(row_bytes, 1))
    for start in range(0, n, block):
        rows = perm[start:start + block]
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for k, a in src.items():
            buf = np.empty((len(rows), *a.shape[1:]), a.dtype)
            step = a.chunks[0]
            first, last = sorted_rows[0] // step, sorted_rows[-1] // step
            for c in range(int(first), int(last) + 1):
                lo, hi = np.searchsorted(sorted_rows, [c * step, (c + 1) * step])
                if lo == hi:
                    continue
                data = a[c * step:min((c + 1) * step, n)]
                buf[order[lo:hi]] = data[sorted_rows[lo:hi] - c * step]
            dst[k][start:start + len(rows)] = buf
    out.attrs.update(dict(group.attrs))
    return out

