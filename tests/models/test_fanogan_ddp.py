"""f-AnoGAN training under torchrun: 2 CPU processes, gloo backend, DistributedDataParallel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from octpipe.models.fanogan.checkpoint import RunPaths, load_checkpoint
from tests.models.test_fanogan_train import TINY_YAML, make_patch_store

TORCHRUN = Path(sys.executable).with_name("torchrun")

WORKER = textwrap.dedent('''
    """One torchrun process: train the tiny GAN and encoder, then save this rank's final weights."""
    import os
    import sys

    import torch

    from octpipe.models.fanogan import train as T
    from octpipe.models.fanogan.config import load_config

    store, run, out, tiny = sys.argv[1:5]
    cfg = load_config(tiny).with_overrides({
        "gan.iterations": 10, "gan.batch_size": 8, "gan.sample_every": 0,
        "encoder.iterations": 4, "encoder.batch_size": 8, "runtime.threads": 1})
    final = {}
    for cls, nets in ((T._GANTrainer, ("g", "d")), (T._EncoderTrainer, ("e",))):
        def run_and_keep(self, _orig=cls.run, _nets=nets):
            result = _orig(self)
            for name in _nets:
                final[name] = {k: v.clone() for k, v in getattr(self, name).state_dict().items()}
            return result
        cls.run = run_and_keep
    gan = T.train_gan(store, run, cfg)
    enc = T.train_encoder(store, run, cfg)
    assert gan["runtime"]["world_size"] == 2 and enc["runtime"]["world_size"] == 2
    torch.save(final, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
''')


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
def test_two_gloo_processes_train_in_sync(tmp_path):
    store = make_patch_store(tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "error",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", "--standalone", str(worker), str(store), str(run),
                           str(out), str(TINY_YAML)], env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0 wrote the run; its checkpoints are complete
    gan = load_checkpoint(RunPaths(run).checkpoint("gan"))
    assert gan["counters"] == {"critic_step": 10, "generator_step": 1, "seconds": gan["counters"]["seconds"]}
    assert gan["runtime"]["world_size"] == 2
    assert RunPaths(run).bundle.is_file() and RunPaths(run).calibration.is_file()
    # DDP kept every trainable parameter identical across the ranks (each rank saw different data)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for net in ("g", "d", "e"):
        for key, value in r0[net].items():
            if "running_" in key or "num_batches" in key:
                continue  # BatchNorm statistics are per process (only parameters are all-reduced)
            assert torch.equal(value, r1[net][key]), (net, key)
    # and rank 0's final weights are the checkpoint's
    for key, value in r0["d"].items():
        assert torch.equal(value, gan["discriminator"][key])
    # the two ranks saw different data, so a model trained on one process would differ
    assert not torch.equal(r0["g"]["blocks.0.norm1.running_mean"], r1["g"]["blocks.0.norm1.running_mean"])
