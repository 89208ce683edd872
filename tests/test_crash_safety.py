"""Crash safety of the store: kill -9 mid-ingest / mid-patches, rerun, compare with a clean run; the store lock."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from octpipe.store import complete_volumes, read_volume_group, store_lock
from tests.conftest import small_phantom

N_VOLUMES = 6


def _octpipe(*args: str) -> list[str]:
    return [sys.executable, "-c", "from octpipe.cli import main; main()", "--no-progress", *args]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    from octpipe.io.writers.heyex_vol import write_heyex_vol

    src = tmp_path_factory.mktemp("crash-src")
    for i in range(N_VOLUMES):
        ph = small_phantom(seed=100 + i)
        write_heyex_vol(src / f"scan{i}.vol", ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                        layers={"ILM": ph.ilm, "BM": ph.bm})
    return src


@pytest.fixture(scope="module")
def clean_store(sources, tmp_path_factory) -> Path:
    from octpipe.pipeline import ingest

    store = tmp_path_factory.mktemp("clean") / "clean.zarr"
    result = ingest([sources], store, workers=0)
    assert result.counts["ok"] == N_VOLUMES
    return store


def _checksums(store: Path) -> dict[tuple[str, int], dict[str, str]]:
    """Per source (sha256, series): sha256 of every array of the volume group."""
    out = {}
    for key, vid in complete_volumes(store).items():
        arrays, attrs = read_volume_group(store, vid)
        assert attrs["status"] == "complete"
        out[key] = {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for name, a in arrays.items()}
    return out


def _groups(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir()]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> bool:
    """Poll ``ready()``; kill -9 the process as soon as it is true. False when the process ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail("the run never reached the point where it should be killed")


def test_ingest_killed_mid_run_then_resumed_equals_clean_run(sources, clean_store, tmp_path):
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen(_octpipe("ingest", str(sources), "-o", str(store), "--workers", "0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def mid_run() -> bool:  # two volumes finished and a third being staged
        vols = store / "volumes"
        staging = store / ".staging"
        return (vols.is_dir() and len(_groups(vols)) >= 2 and staging.is_dir()
                and any(staging.iterdir()))

    assert _kill_when(proc, mid_run), "ingest finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    # what survived: only complete, fully readable volumes, each identical to the clean run's
    clean = _checksums(clean_store)
    survived = _checksums(store)
    assert 2 <= len(survived) < N_VOLUMES
    for key, sums in survived.items():
        assert sums == clean[key]
    assert len(_groups(store / "volumes")) == len(survived)  # nothing half-written under volumes/
    assert any((store / ".staging").iterdir())  # the interrupted volume was left in staging, not in volumes/
    before = {vid: (store / "volumes" / vid / "zarr.json").stat().st_mtime_ns
              for vid in complete_volumes(store).values()}

    rerun = subprocess.run(_octpipe("ingest", str(sources), "-o", str(store), "--workers", "0"),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{N_VOLUMES - len(survived)} written, {len(survived)} skipped, 0 failed" in rerun.stdout
    after = complete_volumes(store)
    for vid, mtime in before.items():  # finished volumes were not redone
        assert vid in after.values()
        assert (store / "volumes" / vid / "zarr.json").stat().st_mtime_ns == mtime
    assert _checksums(store) == clean
    assert not any((store / ".staging").iterdir())  # the dead run's staging was cleaned up


def _patch_arrays(store: Path, split: str) -> dict[str, str]:
    import zarr

    group = zarr.open_group(str(store / "patches" / split), mode="r")
    return {name: hashlib.sha256(np.ascontiguousarray(arr[...]).tobytes()).hexdigest()
            for name, arr in group.arrays()}


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def clean_patches(clean_store, tmp_path_factory) -> Path:
    from octpipe.patches import write_patch_split

    store = _copy_store(clean_store, tmp_path_factory.mktemp("cp") / "p.zarr")
    write_patch_split(store, "test", patch=32, stride=2, workers=0)
    return store


def test_patches_killed_mid_run_leaves_no_split_and_rerun_equals_clean(clean_store, clean_patches, tmp_path):
    store = _copy_store(clean_store, tmp_path / "p.zarr")
    cmd = _octpipe("patches", str(store), "--split", "test", "--patch", "32", "--stride", "2", "--workers", "0")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def writing() -> bool:
        staging = store / ".staging"
        return staging.is_dir() and any(p.name.startswith("patches-test") for p in staging.iterdir())

    assert _kill_when(proc, writing), "patches finished before it could be killed"
    assert not (store / "patches" / "test").exists()  # no split that looks complete

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _patch_arrays(store, "test") == _patch_arrays(clean_patches, "test")


@pytest.mark.slow
def test_patches_overwrite_killed_keeps_old_split_or_none(clean_patches, tmp_path):
    import zarr

    store = _copy_store(clean_patches, tmp_path / "p.zarr")
    old = _patch_arrays(store, "test")
    # a different split (stride 3) overwriting the complete one, killed while it is being written
    cmd = _octpipe("patches", str(store), "--split", "test", "--patch", "32", "--stride", "3", "--workers", "0",
                   "--overwrite")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def writing() -> bool:
        staging = store / ".staging"
        return staging.is_dir() and any(p.name.startswith("patches-test") for p in staging.iterdir())

    assert _kill_when(proc, writing)
    target = store / "patches" / "test"
    if target.exists():  # killed before the swap: the old split, intact and complete
        assert _patch_arrays(store, "test") == old
        assert zarr.open_group(str(target), mode="r").attrs["stride"] == 2
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    attrs = zarr.open_group(str(target), mode="r").attrs
    assert attrs["stride"] == 3 and attrs["n"] == zarr.open_group(str(target), mode="r")["x"].shape[0]


_HOLD = """
import sys
from octpipe.store import store_lock
with store_lock(sys.argv[1], command="ingest"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_writer_is_refused_with_one_line_naming_the_pid(sources, tmp_path):
    store = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(store)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = subprocess.run(_octpipe("ingest", str(sources), "-o", str(store), "--workers", "0"),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert lines == [f"error: s.zarr: store is being written by another octpipe ingest process "
                         f"(pid {holder.pid}); wait for it to finish"]
        assert not (store / "volumes").exists()  # the refused run wrote nothing
        res = subprocess.run(_octpipe("patches", str(store), "--split", "test"), capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 1
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a dead holder's lock is released by the kernel
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    with store_lock(store, command="test"):
        assert (store / ".lock").read_text().split() == [str(os.getpid()), "test"]


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    from octpipe.errors import OctpipeError

    store = tmp_path / "s.zarr"
    with store_lock(store):
        with pytest.raises(OctpipeError, match=r"another octpipe .*\(pid \d+\)"):
            with store_lock(store):
                pass
    with store_lock(store):  # released on exit
        pass


def test_store_lock_refuses_a_foreign_folder(tmp_path):
    from octpipe.errors import OctpipeError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OctpipeError, match="not an empty octpipe store"):
        with store_lock(tmp_path / "mine"):
            pass
    assert not (tmp_path / "mine" / ".lock").exists()


@pytest.mark.slow
def test_two_concurrent_ingests_never_corrupt_the_store(sources, clean_store, tmp_path):
    store = tmp_path / "s.zarr"
    cmd = _octpipe("ingest", str(sources), "-o", str(store), "--workers", "0")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:  # the loser refused cleanly, in one line
            assert p.returncode == 1 and "store is being written by another octpipe" in err
            assert len(err.strip().splitlines()) == 1
    assert _checksums(store) == _checksums(clean_store)


@pytest.mark.slow
def test_load_benchmark_small(tmp_path):
    """benchmarks/load.py at N=6: 2 workers under a 2 GB limit lose nothing and stay under the limit."""
    import json

    out = tmp_path / "load.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    res = subprocess.run([sys.executable, str(script), "--n", "6", "--out", str(out)], capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(out.read_text())
    assert result["nothing_lost"] and result["complete_volumes"] == 6
    assert result["worker_peak_below_limit"]


def _export_checksums(out: Path) -> dict[str, dict[str, str]]:
    import nibabel as nib

    sums = {}
    for summary in sorted(out.glob("*/summary.json")):
        folder = summary.parent
        sums[folder.name] = {
            "windows.csv": hashlib.sha256((folder / "windows.csv").read_bytes()).hexdigest(),
            "anomaly": hashlib.sha256(np.asarray(nib.load(folder / "anomaly.nii.gz").dataobj).tobytes()).hexdigest(),
        }
    return sums


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_export_killed_mid_run_then_resumed_equals_clean_run(clean_store, tmp_path):
    from octpipe.export.anomaly import MapSettings
    from octpipe.export.run import export_store
    from tests.export.test_export import save_model_dir

    model = save_model_dir(tmp_path / "model", size=32)
    settings = ["--stride", "32", "--precision", "fp32", "--workers", "0"]
    clean = tmp_path / "clean"
    export_store(clean_store, model, clean, settings=MapSettings(stride=32, precision="fp32"))
    expected = _export_checksums(clean)
    assert len(expected) == N_VOLUMES

    out = tmp_path / "out"
    proc = subprocess.Popen(_octpipe("export", str(clean_store), "--model", str(model), "-o", str(out), *settings),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = _kill_when(proc, lambda: len(list(out.glob("*/summary.json"))) >= 2)
    assert killed, "the export finished before it could be killed"
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert 2 <= len(done_before) < N_VOLUMES
    # nothing that is not finished looks finished: every volume folder has its summary, the rest is staging
    assert all((d / "summary.json").is_file() for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))
    code = subprocess.run(_octpipe("export", str(clean_store), "--model", str(model), "-o", str(out), *settings),
                          capture_output=True, text=True).returncode
    assert code == 0
    assert not list(out.glob(".staging-*"))
    assert {v: (out / v / "summary.json").stat().st_mtime_ns for v in done_before} == done_before  # not redone
    assert _export_checksums(out) == expected
