"""f-AnoGAN training: config, data order, GAN and encoder stages, resume, divergence, checkpoints."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from octpipe.errors import ConfigError, OctpipeError
from octpipe.models.data import BatchStream, PatchSource
from octpipe.models.fanogan import train as train_mod
from octpipe.models.fanogan.checkpoint import RunPaths, load_checkpoint, load_run, save_atomic
from octpipe.models.fanogan.config import FAnoGANConfig, load_config, save_config
from octpipe.models.fanogan.runtime import Dist
from octpipe.models.fanogan.train import TrainingDiverged, train_encoder, train_gan

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "pipelines" / "fanogan-tiny.yaml"
LOSS_COLUMNS = ("stage", "critic_step", "generator_step", "step", "d_loss", "g_loss", "wasserstein", "gp", "loss")


def make_patch_store(root: Path) -> Path:
    """Three healthy and one diseased small phantom, ingested, with 32-px train and test patches."""
    from octpipe.patches import write_patch_split
    from octpipe.pipeline import ingest
    from octpipe.testing.phantom_files import write_phantom_files
    from tests.conftest import small_phantom

    src = root / "src"
    for seed, lesions in ((1, ""), (2, ""), (3, ""), (4, "srf,irf:3")):
        ph = small_phantom(seed, lesions, shape=(3, 496, 256), spacing_mm=(0.24, 0.00387, 0.0113))
        ph = type(ph)(**{**ph.__dict__, "name": f"p{seed}"})
        write_phantom_files(ph, src, formats=["vol"])
    store = root / "s.zarr"
    ingest([src], store, workers=0)
    # small chunks so that the chunk-window shuffle and the chunk cache are exercised
    write_patch_split(store, "train", patch=32, k=16, seed=0, workers=0, chunk=32)  # 3 volumes x 3 B-scans x 16
    write_patch_split(store, "test", patch=32, stride=32, workers=0, chunk=64)
    return store


def tiny_config(**overrides) -> FAnoGANConfig:
    """The tiny test config, one thread (fast and reproducible on a shared CPU), no sample PNGs."""
    base = {"runtime.threads": 1, "gan.sample_every": 0, "gan.log_every": 1, "encoder.log_every": 1}
    return load_config(TINY_YAML).with_overrides({**base, **overrides})


def read_log(run: Path) -> list[dict[str, str]]:
    with open(RunPaths(run).log, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_patch_store(tmp_path_factory.mktemp("fanogan-train"))


@pytest.fixture(scope="module")
def gan_run(store, tmp_path_factory) -> Path:
    """A tiny GAN trained for 10 critic steps (2 generator steps)."""
    run = tmp_path_factory.mktemp("gan-run") / "run"
    train_gan(store, run, tiny_config(**{"gan.iterations": 10}))
    return run


# --- configuration ------------------------------------------------------------------------
def test_default_config_is_the_official_one_and_the_yaml_files_load():
    cfg = FAnoGANConfig()
    assert (cfg.gan.lr, cfg.gan.betas, cfg.gan.gp_weight, cfg.gan.critic_iters, cfg.gan.batch_size) == (
        1e-4, (0.0, 0.9), 10.0, 5, 64)
    assert (cfg.encoder.mode, cfg.encoder.kappa, cfg.encoder.lr, cfg.encoder.alpha, cfg.encoder.eps) == (
        "izi_f", 1.0, 5e-5, 0.9, 1e-10)
    m = cfg.model
    assert (m.latent_dim, m.dim, m.image_size, m.encoder_output) == (128, 64, 64, "tanh")
    assert load_config(REPO / "pipelines" / "fanogan.yaml") == cfg
    tiny = load_config(TINY_YAML)
    assert (tiny.model.image_size, tiny.model.dim, tiny.model.latent_dim) == (32, 8, 16)
    assert FAnoGANConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.gan.total_critic_steps == 100000
    assert cfg.with_overrides({"gan.count": "generator", "gan.iterations": 7}).gan.total_critic_steps == 35


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key gan\.iters"):
        FAnoGANConfig.from_dict({"gan": {"iters": 3}})
    with pytest.raises(ConfigError, match="unknown section 'trainer'"):
        FAnoGANConfig.from_dict({"trainer": {}})
    bad = [
        ({"gan": {"lr": -1}}, r"gan\.lr must be in \(0"),
        ({"gan": {"betas": [0.0]}}, r"gan\.betas"),
        ({"gan": {"count": "epochs"}}, r"gan\.count must be one of critic, generator, epoch"),
        ({"gan": {"batch_size": 2.5}}, r"gan\.batch_size must be an integer"),
        ({"gan": {"hflip": "yes"}}, r"gan\.hflip must be true or false"),
        ({"encoder": {"mode": "ali"}}, r"encoder\.mode must be one of izi_f, izi, ziz"),
        ({"encoder": {"alpha": 1.0}}, r"encoder\.alpha must be in \[0.0, 1.0\)"),
        ({"model": {"image_size": 40}}, r"multiple of 16"),
        ({"model": {"encoder_output": "sigmoid"}}, r"encoder_output"),
        ({"data": {"val_fraction": 0.9}}, r"data\.val_fraction"),
        ({"runtime": {"precision": "fp16"}}, r"runtime\.precision"),
        ({"runtime": {"channels_last": "yes"}}, r"runtime\.channels_last"),
        ({"gan": {"lr": "fast"}}, r"gan\.lr must be a number"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            FAnoGANConfig.from_dict(data)
    assert FAnoGANConfig.from_dict({"gan": {"lr": "1e-4"}}).gan.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    path = tmp_path / "c.yaml"
    path.write_text("gan:\n  iterations: 5\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key gan\.learning_rate"):
        load_config(path)
    path.write_text("gan: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    save_config(tiny_config(), path, header="test")
    assert load_config(path) == tiny_config()


# --- data order ----------------------------------------------------------------------------
def test_batches_are_a_seeded_function_of_epoch_and_position(store):
    source = PatchSource(store, "train", cache_chunks=3)
    idx = np.arange(source.n)[::2]  # a subset, as after holding out patches

    def stream(rank: int = 0, world: int = 1):
        return BatchStream(source, idx, batch_size=8, d=Dist(rank, world), seed=1, stream=1, hflip=True,
                           window=2)

    a = stream()
    order, flips = a._epoch_order(0)
    assert sorted(order.tolist()) == idx.tolist() and flips.any() and not flips.all()
    assert not np.array_equal(order, a._epoch_order(1)[0])
    batches = [a.next() for _ in range(12)]  # 9 full batches per epoch (72 patches): crosses an epoch
    assert a.state() == {"epoch": 1, "offset": 24}
    b = stream()
    b.load_state({"epoch": 0, "offset": 40})
    np.testing.assert_array_equal(b.next(), batches[5])
    # the batch is the flipped/unflipped patches at those positions
    x = source.read(order[:8])
    x[flips[:8]] = x[flips[:8]][:, :, ::-1]
    np.testing.assert_array_equal(batches[0][:, 0], x)
    # two ranks take disjoint halves of each global batch
    r0, r1 = stream(0, 2), stream(1, 2)
    np.testing.assert_array_equal(r0.next(), batches[0])
    np.testing.assert_array_equal(r1.next(), batches[1])


def test_held_out_volumes_are_never_trained_on(store):
    source = PatchSource(store, "train")
    cfg = tiny_config()
    train_idx, val_source, val_idx, what = train_mod._holdout(source, cfg, store)
    vols_train = set(source.volume_numbers[train_idx].tolist())
    vols_val = set(source.volume_numbers[val_idx].tolist())
    assert vols_train and vols_val and not vols_train & vols_val and "1 of 3 volumes" in what
    assert len(train_idx) + len(val_idx) == source.n
    by_patch = train_mod._holdout(source, tiny_config(**{"data.val_unit": "patch"}), store)
    assert len(by_patch[2]) == round(0.25 * source.n) and not set(by_patch[0]) & set(by_patch[2])
    other = train_mod._holdout(source, tiny_config(**{"data.val_split": "test"}), store)
    assert other[1].split == "test" and (other[1].labels[other[2]] == 0).all() and len(other[0]) == source.n


# --- GAN stage ----------------------------------------------------------------------------------
def test_epoch_count_is_the_official_stopping_rule(store, tmp_path):
    cfg = tiny_config(**{"gan.count": "epoch", "gan.iterations": 2})
    with pytest.raises(ConfigError, match="depends on the training split"):
        _ = cfg.gan.total_critic_steps
    assert cfg.gan.critic_steps_for(7) == 14
    result = train_gan(store, tmp_path / "run", cfg)
    info = json.loads(RunPaths(tmp_path / "run").run_json.read_text())["stages"]["gan"]
    per_epoch = info["n_train"] // cfg.gan.batch_size  # the last partial batch of an epoch is dropped
    assert per_epoch >= 2 and info["total_critic_steps"] == 2 * per_epoch == result["critic_step"]
    assert info["count"] == "epoch"


def test_a_few_gan_steps_write_checkpoint_log_and_pngs(store, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(**{"gan.iterations": 10, "gan.sample_every": 5})
    result = train_gan(store, run, cfg, progress=True)
    assert (result["critic_step"], result["generator_step"]) == (10, 1)
    assert math.isfinite(result["last"]["d_loss"]) and math.isfinite(result["last"]["wasserstein"])
    paths = RunPaths(run)
    rows = read_log(run)
    assert list(rows[0]) == list(train_mod.LOG_COLUMNS)
    assert [(r["critic_step"], r["generator_step"]) for r in rows] == [("5", "0"), ("10", "1")]
    assert rows[0]["g_loss"] == "" and all(math.isfinite(float(r["d_loss"])) for r in rows)
    for name in ("gan-00000005.png", "gan-00000010.png", "interpolation.png"):
        assert (paths.samples / name).stat().st_size > 100
    from PIL import Image

    with Image.open(paths.samples / "interpolation.png") as im:
        assert im.size == (2 + 10 * 34, 2 + 8 * 34)  # 8 rows x 10 interpolation steps
    ckpt = load_checkpoint(paths.checkpoint("gan"))
    assert ckpt["counters"]["critic_step"] == 10 and ckpt["octpipe_version"] and ckpt["git_hash"]
    assert FAnoGANConfig.from_dict(ckpt["config"]) == cfg
    assert load_config(paths.config) == cfg
    info = json.loads(paths.run_json.read_text())
    assert info["stages"]["gan"]["status"] == "complete" and info["git_hash"]
    assert not list(paths.checkpoints.glob(".*tmp"))
    model = load_run(run)
    assert model.encoder is None and not model.generator.training
    # the run is protected
    with pytest.raises(OctpipeError, match="already has a GAN checkpoint; pass --resume"):
        train_gan(store, run, cfg)


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(store, tmp_path):
    cfg = tiny_config(**{"gan.iterations": 20, "encoder.iterations": 6, "encoder.val_every": 0})
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_gan(store, straight, cfg)
    train_encoder(store, straight, cfg)
    first = train_gan(store, split, cfg.with_overrides({"gan.iterations": 10}))
    assert first["critic_step"] == 10
    second = train_gan(store, split, cfg, resume=True)
    assert (second["resumed_from"], second["critic_step"], second["steps_run"]) == (10, 20, 10)
    train_encoder(store, split, cfg.with_overrides({"encoder.iterations": 3}))
    assert train_encoder(store, split, cfg, resume=True)["resumed_from"] == 3

    def losses(run):
        return [tuple(r[c] for c in LOSS_COLUMNS) for r in read_log(run)]

    assert losses(split) == losses(straight)  # bitwise: the CSV holds 7 significant digits of identical floats
    a = load_checkpoint(RunPaths(straight).checkpoint("encoder"))
    b = load_checkpoint(RunPaths(split).checkpoint("encoder"))
    for key in a["encoder"]:
        assert torch.equal(a["encoder"][key], b["encoder"][key]), key
    with pytest.raises(ConfigError, match=r"cannot resume: gan\.lr"):
        train_gan(store, split, cfg.with_overrides({"gan.lr": 2e-4}), resume=True)
    # a GAN trained further makes the encoder checkpoint stale
    train_gan(store, split, cfg.with_overrides({"gan.iterations": 25}), resume=True)
    with pytest.raises(ConfigError, match="GAN was trained further since it started"):
        train_encoder(store, split, cfg.with_overrides({"encoder.iterations": 8}), resume=True)


def test_generator_batchnorm_statistics_change_only_on_generator_steps(store, tmp_path):
    run = tmp_path / "run"
    # 5 critic steps = the first outer iteration, which has no generator step
    train_gan(store, run, tiny_config(**{"gan.iterations": 5}))
    bn = {k: v for k, v in load_checkpoint(RunPaths(run).checkpoint("gan"))["generator"].items() if "running" in k
          or "num_batches" in k}
    assert all(int(v) == 0 for k, v in bn.items() if k.endswith("num_batches_tracked"))
    assert all(torch.all(v == 0) for k, v in bn.items() if k.endswith("running_mean"))
    assert all(torch.all(v == 1) for k, v in bn.items() if k.endswith("running_var"))
    # igul222 counting: 3 outer iterations = 15 critic steps and 2 generator steps
    cfg = tiny_config(**{"gan.iterations": 3, "gan.count": "generator", "gan.checkpoint_every": 1})
    result = train_gan(store, tmp_path / "gen", cfg)
    assert (result["critic_step"], result["generator_step"]) == (15, 2)
    g = load_checkpoint(RunPaths(tmp_path / "gen").checkpoint("gan"))["generator"]
    counts = {int(v) for k, v in g.items() if k.endswith("num_batches_tracked")}
    assert counts == {2}
    assert not torch.all(g["output_norm.running_mean"] == 0)


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_bf16_autocast_trains_with_the_gradient_penalty(store, tmp_path):
    result = train_gan(store, tmp_path / "run", tiny_config(**{"gan.iterations": 10, "runtime.precision": "bf16",
                                                              "runtime.channels_last": True}))
    assert result["runtime"]["precision"] == "bf16" and result["runtime"]["channels_last"]
    assert all(math.isfinite(v) for v in result["last"].values())
    g = load_checkpoint(RunPaths(tmp_path / "run").checkpoint("gan"))["generator"]
    assert all(v.dtype != torch.bfloat16 for v in g.values())  # weights stay float32


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train_mod.wgan_generator_loss

    def poisoned(critic, fake):
        calls["n"] += 1
        loss = real_loss(critic, fake)
        return loss * math.nan if calls["n"] == 3 else loss  # the 3rd generator step

    monkeypatch.setattr(train_mod, "wgan_generator_loss", poisoned)
    run = tmp_path / "run"
    cfg = tiny_config(**{"gan.iterations": 30, "gan.checkpoint_every": 10, "gan.log_every": 5})
    with pytest.raises(TrainingDiverged, match=r"GAN training diverged at critic step 20 \(generator step 3\): "
                                               r"a non-finite loss.*last good checkpoint .*gan-last\.pt is kept"):
        train_gan(store, run, cfg)
    ckpt = load_checkpoint(RunPaths(run).checkpoint("gan"))
    assert ckpt["counters"]["critic_step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values())
    assert load_run(run).generator is not None
    assert json.loads(RunPaths(run).run_json.read_text())["stages"]["gan"]["status"] == "diverged"
    rows = read_log(run)
    assert rows[-1]["critic_step"] == "20" and rows[-1]["g_loss"] == "nan"
    # resuming from the good checkpoint (without the fault) continues normally
    monkeypatch.setattr(train_mod, "wgan_generator_loss", real_loss)
    assert train_gan(store, run, cfg, resume=True)["critic_step"] == 30
    assert [r["critic_step"] for r in read_log(run)] == ["5", "10", "15", "20", "25", "30"]


def test_wasserstein_bound_stops_training(store, tmp_path):
    cfg = tiny_config(**{"gan.iterations": 10, "gan.max_wasserstein": 1e-6})
    with pytest.raises(TrainingDiverged, match=r"critic step 5 .*gan\.max_wasserstein.*no checkpoint was written"):
        train_gan(store, tmp_path / "run", cfg)
    assert not RunPaths(tmp_path / "run").checkpoint("gan").exists()


# --- encoder stage ------------------------------------------------------------------------------
def test_encoder_training_lowers_the_loss_and_leaves_the_gan_frozen(store, gan_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gan_run, run)
    cfg = tiny_config(**{"gan.iterations": 10, "encoder.iterations": 40, "encoder.lr": 1e-3,
                         "encoder.val_every": 10, "encoder.checkpoint_every": 40})
    result = train_encoder(store, run, cfg)
    rows = [r for r in read_log(run) if r["stage"] == "encoder"]
    loss = np.array([float(r["loss"]) for r in rows])
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(loss) == 40 and len(val) == 4
    assert loss[-10:].mean() < 0.8 * loss[:10].mean()
    assert val[-1] < val[0]
    gan = load_checkpoint(RunPaths(run).checkpoint("gan"))
    for path in (RunPaths(run).checkpoint("encoder"), RunPaths(run).bundle):
        enc = load_checkpoint(path)
        for net in ("generator", "discriminator"):
            for key, value in gan[net].items():
                assert torch.equal(value, enc[net][key]), (path.name, net, key)  # bitwise, BN statistics too
    cal = json.loads(RunPaths(run).calibration.read_text())
    assert cal["n"] == 48 and set(cal["scores"]) == {"A_R", "A_D", "A", "z_distance"}
    assert cal["scores"]["A"]["sorted"] == sorted(cal["scores"]["A"]["sorted"])
    model = load_run(run)
    assert model.encoder is not None and model.calibration["n"] == 48 and not model.encoder.training
    assert result["calibration"] == RunPaths(run).calibration
    with pytest.raises(OctpipeError, match="already has an encoder checkpoint"):
        train_encoder(store, run, cfg)
    with pytest.raises(ConfigError, match=r"data\.val_fraction is 0\.1 but the GAN was trained with 0\.25"):
        train_encoder(store, run, cfg.with_overrides({"data.val_fraction": 0.1}), overwrite=True)


@pytest.mark.parametrize("mode", ["izi", "ziz"])
def test_other_encoder_losses_train(store, gan_run, tmp_path, mode):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gan_run, run)
    cfg = tiny_config(**{"gan.iterations": 10, "encoder.iterations": 4, "encoder.mode": mode,
                         "model.encoder_output": "linear" if mode == "izi" else "tanh"})
    with pytest.raises(ConfigError, match=r"model\.dim is 16 but the GAN was trained with 8"):
        train_encoder(store, run, cfg.with_overrides({"model.dim": 16}))
    result = train_encoder(store, run, cfg)  # the encoder's output constraint may differ from the GAN config's
    assert math.isfinite(result["last"]["loss"]) and math.isfinite(result["val_loss"])
    assert load_run(run).encoder.output_mode == cfg.model.encoder_output


def test_encoder_needs_a_gan_and_tensorboard_is_optional(store, tmp_path):
    with pytest.raises(OctpipeError, match="no GAN checkpoint"):
        train_encoder(store, tmp_path / "empty", tiny_config())
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorboard package is not installed"):
            train_gan(store, tmp_path / "tb", tiny_config(**{"runtime.tensorboard": True}))
    with pytest.raises(ConfigError, match="patches of split 'train' are 32×32 pixels but model.image_size is 64"):
        train_gan(store, tmp_path / "big", tiny_config(**{"model.image_size": 64}))


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_atomic({"format": "octpipe-fanogan/1", "a": torch.ones(2)}, path)

    def broken(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": "octpipe-fanogan/1", "a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OctpipeError, match="bad.pt: cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(OctpipeError, match="no trained model"):
        load_run(tmp_path)


@pytest.mark.slow
# torch's own inductor import (torch/utils/mkldnn.py) uses the deprecated torch.jit.script_method
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_of_the_generator_trains(store, tmp_path):
    result = train_gan(store, tmp_path / "run", tiny_config(**{"gan.iterations": 10, "runtime.compile": True}))
    assert result["runtime"]["compile"] and all(math.isfinite(v) for v in result["last"].values())


def test_overwrite_removes_only_the_runs_own_files(store, tmp_path):
    from octpipe.cli import main

    run = tmp_path / "folder"
    run.mkdir()
    (run / "keep.txt").write_text("a user's notes")
    (run / "data").mkdir()
    (run / "data" / "scan.vol").write_bytes(b"x")
    args = ["train", str(store), "-o", str(run), "--config", str(TINY_YAML), "--stage", "gan", "--iterations", "5",
            "--threads", "1"]
    assert main(args) == 0
    assert RunPaths(run).checkpoint("gan").is_file()
    assert main([*args, "--overwrite"]) == 0
    assert (run / "keep.txt").read_text() == "a user's notes" and (run / "data" / "scan.vol").is_file()
    assert RunPaths(run).checkpoint("gan").is_file() and RunPaths(run).config.is_file()


def test_resume_without_config_uses_the_runs_own_config(store, tmp_path):
    from octpipe.cli import main

    run = tmp_path / "run"
    assert main(["train", str(store), "-o", str(run), "--config", str(TINY_YAML), "--stage", "gan",
                 "--iterations", "5", "--threads", "1"]) == 0
    # no --config: the saved config.yaml (latent 16), not the official defaults (latent 128)
    assert main(["train", str(store), "-o", str(run), "--resume", "--stage", "gan", "--iterations", "10",
                 "--threads", "1"]) == 0
    assert load_checkpoint(RunPaths(run).checkpoint("gan"))["counters"]["critic_step"] == 10
    assert load_config(RunPaths(run).config).model.latent_dim == load_config(TINY_YAML).model.latent_dim
