"""f-AnoGAN training under faults: disk full while checkpointing, kill -9 mid-run then --resume.

Resume after a clean stop and the NaN stop are tested in test_fanogan_train.py; not repeated here.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from octpipe.models.fanogan import checkpoint as ckpt_mod
from octpipe.models.fanogan.checkpoint import RunPaths, load_checkpoint
from octpipe.models.fanogan.train import train_gan
from tests.models.test_fanogan_train import LOSS_COLUMNS, TINY_YAML, make_patch_store, read_log, tiny_config


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_patch_store(tmp_path_factory.mktemp("fanogan-faults"))


def _losses(run: Path) -> list[tuple[str, ...]]:
    return [tuple(r[c] for c in LOSS_COLUMNS) for r in read_log(run)]


@pytest.mark.slow  # ~20 s with its store
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(store, tmp_path, monkeypatch):
    cfg = tiny_config(**{"gan.iterations": 20, "gan.checkpoint_every": 10, "gan.log_every": 5})
    straight = tmp_path / "straight"
    train_gan(store, straight, cfg)

    real_save = torch.save
    calls = {"n": 0}

    def disk_full(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (critic step 20): half written, then ENOSPC
            fh.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    run = tmp_path / "run"
    with pytest.raises(OSError) as info:
        train_gan(store, run, cfg)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)

    path = RunPaths(run).checkpoint("gan")
    kept = load_checkpoint(path)  # the previous checkpoint: intact and loadable
    assert kept["counters"]["critic_step"] == 10
    assert all(torch.isfinite(v).all() for v in kept["generator"].values())
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written temporary

    # with space again, resuming gives exactly the uninterrupted run
    assert train_gan(store, run, cfg, resume=True)["critic_step"] == 20
    assert _losses(run) == _losses(straight)
    a, b = load_checkpoint(RunPaths(straight).checkpoint("gan")), load_checkpoint(path)
    for key in a["generator"]:
        assert torch.equal(a["generator"][key], b["generator"][key]), key


def _train_cmd(store: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from octpipe.cli import main; main()", "--no-progress", "train", str(store),
            "-o", str(run), "--config", str(TINY_YAML), "--stage", "gan", "--iterations", "60", "--threads", "1",
            *extra]


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_equals_uninterrupted(store, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    res = subprocess.run(_train_cmd(store, straight), capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr

    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(store, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = RunPaths(run).checkpoint("gan")
    t0 = time.monotonic()
    while not ckpt.exists():  # the first checkpoint (critic step 10 of 60): kill the run right after it
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() - t0 < 300
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["counters"]["critic_step"]
    assert 10 <= killed_at < 60

    res = subprocess.run(_train_cmd(store, run, "--resume"), capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert _losses(run) == _losses(straight)
    a, b = load_checkpoint(RunPaths(straight).checkpoint("gan")), load_checkpoint(ckpt)
    assert b["counters"]["critic_step"] == 60
    nets = [k for k, v in a.items() if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values())]
    assert "generator" in nets and len(nets) >= 2  # generator and critic weights (and optimiser tensors)
    for net in nets:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), (net, key)
