"""f-AnoGAN scoring: per-patch scores, pixel residual, calibration, score_store and the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from octpipe.cli import main
from octpipe.errors import OctpipeError
from octpipe.models.fanogan.checkpoint import FAnoGANModel, RunPaths, build_networks, load_run
from octpipe.models.fanogan.config import FAnoGANConfig
from octpipe.models.fanogan.inference import prepare_model
from octpipe.models.fanogan.losses import anomaly_scores, latent_distances
from octpipe.models.fanogan.score import (
    CSV_COLUMNS,
    SCORE_NAMES,
    calibrate,
    calibration_percentile,
    pixel_residual,
    resolve_precision,
    score_patches,
)
from octpipe.models.fanogan.store_scores import score_store
from tests.models.test_fanogan_train import TINY_YAML, make_patch_store

#: float32 machine epsilon. Convolution kernels (and so the last bits of every network output)
#: differ by CPU (AVX-512, AVX2, no oneDNN), batch size and memory format, so a reference is either
#: computed with the code's own batch composition and layout (then it matches to a few ulps), or the
#: comparison allows the network's real float32 error (see ``SCORE_RTOL``).
EPS32 = float(np.finfo(np.float32).eps)
#: Relative difference allowed between scores computed with different batch sizes or memory formats
#: (different kernels). G(E(x)) then moves by up to ~5e-6 (3e-5 without oneDNN); each score is a mean
#: of squared differences of 128-1024 values whose errors mostly cancel: measured < 1e-6 relative with
#: AVX-512, AVX2 and default ATen kernels and without oneDNN. Wrong or reordered patches, a dropped
#: partial batch or BatchNorm in training mode move the scores by more than 1e-2.
SCORE_RTOL = 1e-4


def same_batches(x: torch.Tensor, batch_size: int, channels_last: bool = True) -> list[torch.Tensor]:
    """``x`` cut into the batches the scoring code forms (channels_last by default, as the code)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [b.contiguous(memory_format=fmt) for b in x.split(batch_size)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(kappa: float = 0.5, seed: int = 0) -> FAnoGANModel:
    cfg = FAnoGANConfig.from_dict({"model": {"image_size": 32, "dim": 8, "latent_dim": 16},
                                   "encoder": {"kappa": kappa}})
    torch.manual_seed(seed)
    g, d, e = build_networks(cfg)
    with torch.no_grad():  # make the BatchNorm moving averages non-trivial
        g.train()(torch.randn(32, 16))
        e.train()(torch.rand(32, 1, 32, 32) * 2 - 1)
    return FAnoGANModel(g, d, e, cfg).eval()


def hand_scores(model: FAnoGANModel, x: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """The four scores by hand with ``model``'s networks, on the batches the scoring code forms."""
    g, d, e = model.generator, model.discriminator, model.encoder
    parts = []
    with torch.no_grad():
        for xb in same_batches(x, batch_size):
            z = e(xb)
            x_rec = g(z)
            f_x, f_rec = d.features(torch.cat([xb, x_rec])).split(len(xb))
            sc = anomaly_scores(xb, x_rec, f_x, f_rec, kappa=model.kappa)
            parts.append(torch.stack([sc.residual, sc.feature, sc.total, latent_distances(z, e(x_rec))]))
    return dict(zip(SCORE_NAMES, torch.cat(parts, 1).numpy(), strict=True))


def test_every_patch_is_scored_and_equals_the_hand_computation():
    model = tiny_model(kappa=0.5)
    x = torch.rand(10, 1, 32, 32) * 2 - 1
    s = score_patches(model, x, batch_size=4, device="cpu", precision="fp32")  # batches of 4, 4 and a partial 2
    assert set(s) == set(SCORE_NAMES) and all(v.shape == (10,) and v.dtype == np.float32 for v in s.values())
    # the hand computation on the same batches as the code (4, 4, 2; channels_last; D sees x and G(E(x))
    # of a batch together) with the networks the code runs (the inference copies by default, the trained
    # networks with fast=False), so that the same kernels run; tests/models/test_fanogan_inference.py
    # checks that the two agree
    naive = score_patches(model, x, batch_size=4, device="cpu", precision="fp32", fast=False)
    # each score is a mean of non-negative squares: summation order alone moves it by < 1e-6 relative
    for scores, nets in ((s, prepare_model(model)), (naive, model)):
        ref = hand_scores(nets, x, 4)
        for name in SCORE_NAMES:
            np.testing.assert_allclose(scores[name], ref[name], rtol=1e-5, atol=0, err_msg=name)
    np.testing.assert_allclose(s["A"], s["A_R"] + 0.5 * s["A_D"], rtol=4 * EPS32)
    # streamed blocks of any size and (N, H, W) numpy input give the same scores (the same batches)
    blocks = [x[:3, 0].numpy(), x[3:10, 0].numpy()]
    s2 = score_patches(model, iter(blocks), batch_size=4, channels_last=True, precision="fp32")
    for name in SCORE_NAMES:
        np.testing.assert_allclose(s2[name], s[name], rtol=1e-5, atol=0, err_msg=name)
    # other batch sizes and NCHW give the same scores up to float32 rounding (other kernels run)
    for kwargs in ({"batch_size": 3, "channels_last": False}, {"batch_size": 10, "channels_last": True}):
        s3 = score_patches(model, x, precision="fp32", **kwargs)
        for name in SCORE_NAMES:
            np.testing.assert_allclose(s3[name], s[name], rtol=SCORE_RTOL, atol=0, err_msg=f"{name} {kwargs}")
    assert score_patches(model, x[:0], batch_size=4)["A"].shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        score_patches(model, x, batch_size=0)


def test_pixel_residual_is_the_absolute_reconstruction_error():
    model = tiny_model()
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    # |x - G(E(x))| by hand on the same batches (2, 2, 1; channels_last) with the networks the code runs
    # (inference copies by default, the trained networks with fast=False): with other batches or networks
    # other conv kernels run and G(E(x)) moves by up to ~40 eps (1.3e-6 seen on an AVX2-only EPYC)
    for fast, nets in ((True, prepare_model(model)), (False, model)):
        r = pixel_residual(model, x, batch_size=2, device="cpu", precision="fp32", fast=fast)
        with torch.no_grad():
            ref = torch.cat([(xb - nets.generator(nets.encoder(xb))).abs() for xb in same_batches(x, 2)]).numpy()
        assert r.shape == (5, 1, 32, 32) and r.dtype == np.float32
        # values in [0, 2]: a few ulps of 2; a squared or signed residual is off by ~0.1 on most pixels
        np.testing.assert_allclose(r, ref, rtol=0, atol=8 * EPS32, err_msg=f"fast={fast}")
        assert (r >= 0).all()


def test_scoring_needs_an_encoder():
    model = tiny_model()
    model.encoder = None
    with pytest.raises(OctpipeError, match="no trained encoder"):
        score_patches(model, torch.zeros(2, 1, 32, 32))


def test_calibration_percentiles():
    rng = np.random.default_rng(0)
    scores = {name: rng.gamma(2.0, size=500) for name in SCORE_NAMES}
    cal = calibrate(scores, source="held-out")
    assert cal["n"] == 500 and cal["source"] == "held-out"
    a = cal["scores"]["A"]
    assert a["sorted"] == sorted(scores["A"].tolist())
    assert a["percentiles"][4] == pytest.approx(np.percentile(scores["A"], 50))
    p = calibration_percentile([0.0, np.median(scores["A"]), 1e9], cal)
    assert p.tolist() == [0.0, 50.0, 100.0]
    small = calibrate(scores, max_values=11)
    assert len(small["scores"]["A"]["sorted"]) == 11 and small["n"] == 500
    json.dumps(cal)  # JSON-safe


# --- store scoring and the command line ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store and a tiny run trained through ``octpipe train``."""
    root = tmp_path_factory.mktemp("fanogan-score")
    store = make_patch_store(root)
    run = root / "run"
    code = main(["train", str(store), "-o", str(run), "--config", str(TINY_YAML), "--iterations", "10"])
    assert code == 0
    return store, run


def test_train_command_writes_a_complete_run(trained, capsys):
    store, run = trained
    paths = RunPaths(run)
    for p in (paths.config, paths.run_json, paths.log, paths.checkpoint("gan"), paths.checkpoint("encoder"),
              paths.calibration, paths.bundle, paths.samples / "interpolation.png"):
        assert p.is_file(), p
    info = json.loads(paths.run_json.read_text())
    assert info["stages"]["gan"]["critic_step"] == 10 and info["stages"]["encoder"]["step"] == 10
    # running again without --resume or --overwrite is refused with one line
    assert main(["train", str(store), "-o", str(run), "--config", str(TINY_YAML)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --resume" in err[0]
    # --resume with a longer encoder stage continues it
    assert main(["train", str(store), "-o", str(run), "--config", str(TINY_YAML), "--stage", "encoder",
                 "--resume", "--iterations", "12"]) == 0
    assert "encoder: step 12 (2 run" in capsys.readouterr().out
    assert main(["train", str(store), "-o", str(run), "--stage", "both"]) == 2
    assert main(["train", str(store), "-o", str(run), "--device", "tpu"]) == 2
    bad = run.parent / "bad.yaml"
    bad.write_text("gan:\n  critic_steps: 5\n")
    assert main(["train", str(store), "-o", str(run.parent / "r2"), "--config", str(bad)]) == 1
    assert "unknown key gan.critic_steps" in capsys.readouterr().err


def test_score_command_writes_one_row_per_patch(trained, tmp_path, capsys):
    import zarr

    store, run = trained
    out = tmp_path / "scores.csv"
    assert main(["score", str(store), "--model", str(run), "--split", "test", "-o", str(out),
                 "--batch-size", "50"]) == 0  # 192 patches: the last batch of each chunk is partial
    assert "scored 192 patches of split test" in capsys.readouterr().out
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 192
    g = zarr.open_group(str(store / "patches" / "test"), mode="r")
    index, labels, vols = g["index"][...], g["label"][...], g.attrs["volumes"]
    assert [r["volume_id"] for r in rows] == [vols[i] for i in index[:, 0]]
    assert [int(r["bscan"]) for r in rows] == index[:, 1].tolist()
    assert [int(r["col"]) for r in rows] == index[:, 3].tolist()
    assert [int(r["label"]) for r in rows] == labels.tolist()
    meta = json.loads((tmp_path / "scores.csv.json").read_text())
    assert meta["n_patches"] == 192 and meta["split"] == "test" and meta["git_hash"]
    # the reference scores the same batches (each 64-patch chunk as 50 + 14) in the precision the command
    # chose: auto is bf16 on CPUs with native bf16 (2e-2 off fp32), whose roundings also follow the kernels
    model = load_run(run)
    x, step = g["x"][...].astype(np.float32), g["x"].chunks[0]
    parts = [score_patches(model, x[i:i + step], batch_size=50, precision=meta["precision"])
             for i in range(0, len(x), step)]
    for name in SCORE_NAMES:  # the CSV keeps 9 significant digits: float32 round-trips exactly
        ref = np.concatenate([p[name] for p in parts])
        np.testing.assert_allclose([float(r[name]) for r in rows], ref, rtol=1e-5, atol=0, err_msg=name)
    # no overwrite without --overwrite; missing split, missing model: one-line errors
    assert main(["score", str(store), "--model", str(run), "-o", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["score", str(store), "--model", str(run), "--split", "val", "-o", str(tmp_path / "v.csv")]) == 1
    assert "no patches/val" in capsys.readouterr().err
    assert main(["score", str(store), "--model", str(tmp_path), "-o", str(tmp_path / "m.csv")]) == 1
    assert "no trained model" in capsys.readouterr().err
    assert main(["score", str(store), "--model", str(run), "-o", str(tmp_path / "p.csv"), "--precision", "fp8"]) == 2


def test_score_store_rejects_a_patch_size_mismatch(trained, tmp_path):
    from octpipe.patches import write_patch_split

    store, run = trained
    write_patch_split(store, "test", patch=64, stride=64, workers=0, overwrite=True)
    try:
        with pytest.raises(OctpipeError, match=r"patches are \(64, 64\) pixels but the model expects 32×32"):
            score_store(store, run, "test", tmp_path / "s.csv")
    finally:
        write_patch_split(store, "test", patch=32, stride=32, workers=0, chunk=64, overwrite=True)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_for_cpu_inference_only_with_native_bf16(monkeypatch, native):
    import octpipe.models.fanogan.score as score_module

    monkeypatch.setattr(score_module, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, training=False) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", cpu, training=True) == "fp32"
    assert resolve_precision("tf32", cpu, training=False) == "fp32"
    assert resolve_precision("fp32", cpu, training=False) == "fp32"
