"""Input validation across the CLI: bad input gives one line on stderr and the documented exit code.

Exit codes (octpipe.cli): 0 success, 1 an error or failed inputs, 2 a usage error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from octpipe.cli import main
from tests.conftest import small_phantom


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from octpipe.io.writers.heyex_vol import write_heyex_vol
    from octpipe.pipeline import ingest

    root = tmp_path_factory.mktemp("cli-validation")
    ph = small_phantom(seed=7)
    write_heyex_vol(root / "src" / "a.vol", ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                    layers={"ILM": ph.ilm, "BM": ph.bm})
    store = root / "s.zarr"
    ingest([root / "src"], store, workers=0)
    return store


BUNDLED = str(Path(__file__).resolve().parents[2] / "models" / "fanogan-phantom")


@pytest.mark.parametrize("command", [["info"], ["layers", "-o", "OUT/l.npz"], ["export", "--model", BUNDLED, "-o",
                                                                                  "OUT/e"]])
def test_missing_file(capsys, tmp_path, command):
    argv = [a.replace("OUT", str(tmp_path)) for a in command]
    code, _, err = _run(capsys, *argv[:1], str(tmp_path / "missing.vol"), *argv[1:])
    assert code == 1
    _one_error_line(err, "missing.vol", "no such file")


@pytest.mark.parametrize("command", [["info"], ["layers", "-o", "OUT/l.npz"], ["export", "--model", BUNDLED, "-o",
                                                                                  "OUT/e"]])
def test_wrong_file_type(capsys, tmp_path, command):
    bad = tmp_path / "notes.vol"
    bad.write_text("just some text, not an OCT file\n" * 10)
    argv = [a.replace("OUT", str(tmp_path)) for a in command]
    code, _, err = _run(capsys, *argv[:1], str(bad), *argv[1:])
    assert code == 1
    _one_error_line(err, "error: notes.vol: not a supported OCT format")
    assert not (tmp_path / "l.npz").exists() and not (tmp_path / "e").exists()


def test_export_odd_inputs_are_one_line(capsys, tmp_path, store):
    """A folder where a file is expected, a file where a store or model is expected, an empty folder."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("a file")
    out = str(tmp_path / "out")
    cases = [
        (["export", str(tmp_path / "empty"), "--model", BUNDLED, "-o", out], "empty: no OCT file or B-scan image"),
        (["export", str(store), "--model", str(tmp_path / "x.txt"), "-o", out], "x.txt: not a model folder"),
        (["export", str(store), "--model", str(tmp_path / "empty"), "-o", out], "empty: no trained model in the run"),
        (["export", str(store), "--model", BUNDLED, "-o", str(tmp_path / "x.txt")], "x.txt: is a file, not an output"),
        (["export", str(store), "--model", BUNDLED, "-o", out, "--volume", "nope"], "no complete volume nope"),
    ]
    for argv, needle in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 1, (argv, err)
        _one_error_line(err, needle)
    assert not (tmp_path / "out").exists()


def test_truncated_vol_is_one_line(capsys, tmp_path, store):
    from octpipe.io.writers.heyex_vol import write_heyex_vol

    ph = small_phantom(seed=1)
    path = write_heyex_vol(tmp_path / "t.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OD")
    path.write_bytes(path.read_bytes()[:5000])
    code, _, err = _run(capsys, "info", str(path))
    assert code == 1
    _one_error_line(err, "t.vol: truncated")


def test_ingest_missing_source_and_wrong_type_fail_with_code_1(capsys, tmp_path):
    bad = tmp_path / "src" / "scan.vol"
    bad.parent.mkdir()
    bad.write_bytes(b"HSF-OCT-103" + bytes(64))  # right magic, truncated header
    code, out, err = _run(capsys, "ingest", str(tmp_path / "src"), str(tmp_path / "nowhere"), "-o",
                          str(tmp_path / "s.zarr"), "--workers", "0")
    assert code == 1
    assert "0 written, 0 skipped, 2 failed" in out
    failed = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and any("scan.vol" in f and "truncated" in f for f in failed)
    assert any("nowhere: no such file or folder" in f for f in failed)


def test_stride_and_patch_zero_are_usage_errors(capsys, store):
    for option in ("--stride", "--patch"):
        code, _, err = _run(capsys, "patches", str(store), "--split", "test", option, "0")
        assert code == 2
        assert f"Invalid value for '{option}'" in err
    assert not (store / "patches" / "test").exists()


def test_unknown_split_is_a_usage_error(capsys, store):
    code, _, err = _run(capsys, "patches", str(store), "--split", "validation")
    assert code == 2 and "must be one of train, test" in err


def test_patch_larger_than_the_image(capsys, store):
    code, _, err = _run(capsys, "patches", str(store), "--split", "test", "--patch", "4096", "--workers", "0")
    assert code == 1
    _one_error_line(err, "patch size 4096 is larger than the flattened area")
    assert not (store / "patches" / "test").exists()


def test_empty_store(capsys, tmp_path):
    from octpipe.store import open_store

    empty = tmp_path / "empty.zarr"
    open_store(empty)
    code, _, err = _run(capsys, "patches", str(empty), "--split", "test", "--workers", "0")
    assert code == 1
    _one_error_line(err, "empty.zarr: no preprocessed volumes in the store")
    code, _, err = _run(capsys, "score", str(empty), "--model", str(tmp_path), "-o", str(tmp_path / "s.csv"))
    assert code == 1
    _one_error_line(err, "no patches/test in the store")


def test_not_a_store(capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    code, _, err = _run(capsys, "patches", str(tmp_path / "folder"), "--split", "test")
    assert code == 1
    _one_error_line(err, "folder: no octpipe store here")
    (tmp_path / "x.txt").write_text("a file where the store should go")
    code, _, err = _run(capsys, "ingest", str(tmp_path / "folder"), "-o", str(tmp_path / "x.txt"), "--workers", "0")
    assert code == 1
    _one_error_line(err, "x.txt: is a file, not a store folder")


def test_bad_option_values_are_usage_errors(capsys, tmp_path, store):
    cases = [
        (["ingest", str(tmp_path), "-o", str(tmp_path / "s.zarr"), "--label", "maybe"], "--label"),
        (["ingest", str(tmp_path), "-o", str(tmp_path / "s.zarr"), "--robust", "99,1"], "--robust"),
        (["ingest", str(tmp_path), "-o", str(tmp_path / "s.zarr"), "--workers", "-1"], "--workers"),
        (["score", str(store), "--model", str(tmp_path), "-o", str(tmp_path / "s.csv"), "--device", "tpu"],
         "--device"),
        (["layers", str(tmp_path / "a.vol"), "-o", str(tmp_path / "l.npz"), "--series", "-1"], "--series"),
        (["export", str(store), "--model", BUNDLED, "-o", str(tmp_path / "e"), "--spacing-mm", "0.1,,"],
         "--spacing-mm"),
        (["export", str(store), "--model", BUNDLED, "-o", str(tmp_path / "e"), "--stride", "0"], "--stride"),
        (["export", str(tmp_path), "--model", BUNDLED, "-o", str(tmp_path / "e"), "--spacing-mm", "1,2"],
         "--spacing-mm"),
        (["export", str(tmp_path), "--model", BUNDLED, "-o", str(tmp_path / "e"), "--images", "some"], "--images"),
    ]
    for argv, option in cases:
        code, _, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert option in err
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_score_with_a_model_that_does_not_fit_the_store(capsys, tmp_path):
    """A model trained on 32-px patches refuses a store cut into 64-px patches, in one line."""
    from octpipe.models.fanogan.train import train_encoder, train_gan
    from octpipe.patches import write_patch_split
    from tests.models.test_fanogan_train import make_patch_store, tiny_config

    store = make_patch_store(tmp_path)
    cfg = tiny_config(**{"gan.iterations": 2, "encoder.iterations": 2, "encoder.val_every": 0})
    run = tmp_path / "run"
    train_gan(store, run, cfg)
    train_encoder(store, run, cfg)
    write_patch_split(store, "test", patch=64, stride=64, workers=0, overwrite=True)
    code, _, err = _run(capsys, "score", str(store), "--model", str(run), "-o", str(tmp_path / "s.csv"),
                        "--device", "cpu")
    assert code == 1
    _one_error_line(err, "patches are (64, 64) pixels but the model expects")
    assert not (tmp_path / "s.csv").exists()


def test_evaluate_on_an_image_is_one_line(tmp_path, capsys):
    """A binary file given as scores CSV: one line naming it, no traceback."""
    from octpipe.cli import main

    img = tmp_path / "scan.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert main(["evaluate", str(img), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "scan.png: not a scores CSV" in err


def test_unexpected_exception_is_one_line(monkeypatch, capsys):
    """The floor: an exception no command foresaw prints one line and exits 1."""
    import octpipe.cli.info as info_mod
    from octpipe.cli import main

    def boom(*args, **kwargs):
        raise RuntimeError("kaput\nsecond line")

    monkeypatch.setattr(info_mod, "describe", boom)
    assert main(["info", __file__]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected RuntimeError: kaput (an octpipe bug: run with -v for the traceback)"]
