"""How many volumes a training batch draws on: patches stored in volume order vs in random order.

The training stream (``octpipe.models.data.BatchStream``) visits the chunks of the
train split in a random order, ``data.shuffle_chunks`` at a time, and shuffles the patches of
each window: cheap, but when the split is stored one volume after another a batch of 64 sees
only the few volumes inside its window. The official code reshuffles the whole training set
each epoch. ``octpipe patches --split train`` now stores the patches in a seeded random order
across volumes; this script writes the same train split both ways (``shuffle=False`` is the old
layout) and counts, over one epoch of the very batches training would draw, the distinct volumes
and distinct B-scans per batch, next to a full reshuffle of the same patches.

Stores: a phantom cohort (``--volumes`` healthy phantoms of 49 B-scans, 64 patches per B-scan,
as the bundled phantom model's data) and, with ``--real STORE``, a store of single real B-scans
(e.g. the OCTDL normal store of ``benchmarks/real_benchmark.py``).

Writes ``benchmarks/results/shuffle.json``.

Usage: .venv/bin/python benchmarks/shuffle.py [--volumes 12] [--real WORK/octdl-normal.zarr]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octpipe.models.data import BatchStream, PatchSource  # noqa: E402
from octpipe.models.fanogan.runtime import Dist  # noqa: E402
from octpipe.patches import write_patch_split  # noqa: E402

BATCH = 64
WINDOW = 8  # data.shuffle_chunks default


def batch_diversity(store: Path, split: str, *, seed: int = 0) -> dict:
    """Distinct volumes / B-scans per batch over one epoch of the training stream's order."""
    source = PatchSource(store, split)
    import zarr

    index = np.asarray(zarr.open_group(str(store / "patches" / split), mode="r")["index"][...])
    stream = BatchStream(source, np.arange(source.n), batch_size=BATCH, d=Dist(), seed=seed, stream=1,
                         hflip=False, window=WINDOW)
    order, _ = stream._epoch_order(0)
    full = np.random.default_rng(seed).permutation(source.n)

    def count(o: np.ndarray) -> dict[str, float]:
        n = len(o) // BATCH * BATCH
        b = o[:n].reshape(-1, BATCH)
        vols = np.array([len(np.unique(index[r, 0])) for r in b])
        scans = np.array([len(np.unique(index[r, 0].astype(np.int64) * 100000 + index[r, 1])) for r in b])
        return {"volumes_mean": round(float(vols.mean()), 2), "volumes_min": int(vols.min()),
                "bscans_mean": round(float(scans.mean()), 2), "bscans_min": int(scans.min()), "batches": len(b)}

    return {"stream": count(order), "full_reshuffle": count(full), "n_patches": int(source.n),
            "n_volumes": int(len(np.unique(index[:, 0]))), "chunk": source.chunk}


def compare(store: Path, k: int) -> dict:
    out = {}
    for name, shuffle in (("volume_order", False), ("random_order", True)):
        t0 = time.perf_counter()
        res = write_patch_split(store, "train", name=f"train-{name}", k=k, seed=0, workers=0, shuffle=shuffle,
                                overwrite=True)
        out[name] = {"write_s": round(time.perf_counter() - t0, 2), **batch_diversity(store, res.path.name)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=12)
    ap.add_argument("--real", type=Path, default=None, help="a store of real single B-scans (optional)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shuffle.json")
    args = ap.parse_args(argv)
    exe = str(Path(sys.executable).with_name("octpipe"))
    result = {"benchmark": "shuffle", "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "batch_size": BATCH, "shuffle_chunks": WINDOW, "stores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([exe, "-q", "phantom", "-o", str(work / "src"), "--n", str(args.volumes), "--seed", "1000",
                        "--healthy-fraction", "1", "--lesions", "none", "--formats", "vol"], check=True)
        subprocess.run([exe, "-q", "ingest", str(work / "src"), "-o", str(work / "s.zarr"), "--workers", "1",
                        "--label", "healthy"], check=True)
        result["stores"]["phantom"] = {"what": f"{args.volumes} healthy phantoms x 49 B-scans, k=64",
                                       **compare(work / "s.zarr", 64)}
    if args.real is not None:
        result["stores"]["real"] = {"what": f"{args.real.name}: single real B-scans, k=96", **compare(args.real, 96)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
