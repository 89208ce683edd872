"""Every command against every kind of bad path: one line on stderr and the documented exit code.

Kinds: a read-only output folder (the file system refuses every write below it), an output
that exists as a file where a folder is wanted (or a folder where a file is wanted), a missing
input and an empty folder as input. Exit codes (octpipe.cli): 0 success, 1 an error or failed
inputs, 2 a usage error. A traceback, or more than one line, fails.

The read-only folder is simulated (the tests may run as root, for whom permissions do not
hold): every call that creates or writes a file or folder below it raises ``OSError(EROFS)``,
as a read-only mount does.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest

from octpipe.cli import main
from tests.conftest import small_phantom

BUNDLED = str(Path(__file__).resolve().parents[2] / "models" / "fanogan-phantom")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A .vol file, a store with train and test patches, a file and an empty folder."""
    from octpipe.io.writers.heyex_vol import write_heyex_vol
    from octpipe.patches import write_patch_split
    from octpipe.pipeline import ingest

    root = tmp_path_factory.mktemp("sweep")
    import numpy as np

    for name, ph in (("a", small_phantom(seed=3)), ("b", small_phantom(seed=4, lesions="irf,srf"))):
        vol = write_heyex_vol(root / "src" / f"{name}.vol", ph.data, spacing_mm=ph.spacing_mm,
                              laterality=ph.laterality, layers={"ILM": ph.ilm, "BM": ph.bm})
        if ph.lesion_mask.any():
            np.savez_compressed(root / "src" / f"{name}_truth.npz", lesion_mask=ph.lesion_mask)
    vol = root / "src" / "a.vol"
    store = root / "s.zarr"
    ingest([root / "src"], store, workers=0, label=0)
    write_patch_split(store, "test", workers=0)
    write_patch_split(store, "train", k=4, workers=0)
    (root / "empty").mkdir()
    (root / "a-file.txt").write_text("not a folder\n")
    return {"vol": Path(vol), "store": store, "file": root / "a-file.txt", "empty": root / "empty"}


def _commands(i: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Each command with its output at ``out`` (a folder or, for layers and score, a file in it)."""
    vol, store = str(i["vol"]), str(i["store"])
    return {
        "layers": ["layers", vol, "-o", str(out / "l.npz")],
        "ingest": ["ingest", vol, "-o", str(out / "s.zarr"), "--workers", "0"],
        "export": ["export", vol, "--model", BUNDLED, "-o", str(out / "e"), "--device", "cpu"],
        "score": ["score", store, "--model", BUNDLED, "-o", str(out / "s.csv"), "--device", "cpu"],
        "evaluate": ["evaluate", "--store", store, "--model", BUNDLED, "-o", str(out / "ev"), "--device", "cpu"],
        "phantom": ["phantom", "-o", str(out / "ph"), "--n", "1", "--shape", "2,248,128", "--formats", "vol"],
        "train": ["train", store, "-o", str(out / "run")],
    }


def _reading(command: str, source: Path, out: Path) -> list[str]:
    """``command`` reading ``source`` (a file, folder or store), writing below ``out``."""
    src = str(source)
    return {
        "info": ["info", src],
        "layers": ["layers", src, "-o", str(out / "l.npz")],
        "ingest": ["ingest", src, "-o", str(out / "s.zarr"), "--workers", "0"],
        "export": ["export", src, "--model", BUNDLED, "-o", str(out / "e")],
        "patches": ["patches", src, "--split", "test"],
        "score": ["score", src, "--model", BUNDLED, "-o", str(out / "s.csv")],
        "train": ["train", src, "-o", str(out / "run")],
    }[command]


def _run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    code = main(["--no-progress", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _assert_one_line(code: int, err: list[str], expect_code: int, *needles: str) -> None:
    assert code == expect_code, (code, err)
    assert len(err) == 1 and err[0].startswith(("error: ", "Error: ")), err
    assert "Traceback" not in err[0] and "unexpected" not in err[0], err
    for needle in needles:
        assert needle in err[0], err


def _simulate_read_only(ro: Path, monkeypatch) -> Path:
    """Make every create or write below ``ro`` fail with EROFS, as on a read-only mount."""
    ro = ro.resolve()

    def below(path) -> bool:
        try:
            return Path(os.path.abspath(os.fspath(path))).is_relative_to(ro)
        except TypeError:  # a file descriptor
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_mkdir, real_open, real_os_open = os.mkdir, builtins.open, os.open
    real_replace, real_rename = os.replace, os.rename
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def mkdir(path, *args, **kwargs):
        return refuse(path) if below(path) else real_mkdir(path, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        return refuse(file) if below(file) and set(mode) & set("wax+") else real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        return refuse(path) if below(path) and flags & writes else real_os_open(path, flags, *args, **kwargs)

    def move(real):
        def inner(src, dst, *args, **kwargs):
            return refuse(dst) if below(dst) or below(src) else real(src, dst, *args, **kwargs)
        return inner

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "replace", move(real_replace))
    monkeypatch.setattr(os, "rename", move(real_rename))
    return ro


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """An empty read-only folder."""
    (tmp_path / "ro").mkdir()
    return _simulate_read_only(tmp_path / "ro", monkeypatch)


def test_the_simulated_folder_is_read_only(read_only):
    with pytest.raises(OSError, match="Read-only"):
        (read_only / "x").mkdir()
    with pytest.raises(OSError, match="Read-only"):
        (read_only / "f.txt").write_text("x")


@pytest.mark.parametrize("command", ["layers", "ingest", "export", "score", "evaluate", "phantom"])
def test_read_only_output_folder(command, inputs, read_only, capsys):
    argv = _commands(inputs, read_only)[command]
    code, err = _run(capsys, argv)
    _assert_one_line(code, err, 1, "Read-only file system")
    named = err[0].removeprefix("error: ").split(": ")[0]
    assert Path(named).name in {"ro", *(Path(a).name for a in argv)}, err  # names the user's path


def test_patches_and_export_on_a_read_only_store(inputs, tmp_path, monkeypatch, capsys):
    """A store on a read-only mount: writing patches fails in one line; exporting from it works."""
    import shutil

    store = tmp_path / "ro" / "s.zarr"
    shutil.copytree(inputs["store"], store)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    _simulate_read_only(tmp_path / "ro", monkeypatch)
    code, err = _run(capsys, ["patches", str(store), "--split", "test", "--name", "again", "--workers", "0"])
    _assert_one_line(code, err, 1, "Read-only file system")
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


@pytest.mark.parametrize("command", ["ingest", "export", "evaluate", "phantom", "train"])
def test_output_folder_that_is_a_file(command, inputs, tmp_path, capsys):
    argv = _commands(inputs, tmp_path)[command]
    target = {"ingest": "s.zarr", "export": "e", "evaluate": "ev", "phantom": "ph", "train": "run"}[command]
    (tmp_path / target).write_text("a file where a folder belongs\n")
    code, err = _run(capsys, argv)
    _assert_one_line(code, err, 1, target)
    assert (tmp_path / target).read_text() == "a file where a folder belongs\n"  # nothing lost


@pytest.mark.parametrize("command", ["layers", "score"])
def test_output_file_that_is_a_folder(command, inputs, tmp_path, capsys):
    argv = [*_commands(inputs, tmp_path)[command], "--overwrite"]
    target = {"layers": "l.npz", "score": "s.csv"}[command]
    (tmp_path / target).mkdir()
    (tmp_path / target / "keep.txt").write_text("keep")
    code, err = _run(capsys, argv)
    _assert_one_line(code, err, 1, target)
    assert (tmp_path / target / "keep.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".*tmp*"))  # no staging file left beside it


@pytest.mark.parametrize("command", ["info", "layers", "ingest", "export", "patches", "score", "train"])
def test_missing_input(command, inputs, tmp_path, capsys):
    code, err = _run(capsys, _reading(command, tmp_path / "nope", tmp_path))
    if command == "ingest":  # a batch: the missing source is a failed row, and the run fails
        assert code == 1 and any("nope: no such file or folder" in line for line in err), err
        return
    _assert_one_line(code, err, 1, "nope")


@pytest.mark.parametrize("command", ["info", "layers", "ingest", "export", "patches", "score", "train"])
def test_empty_folder_as_input(command, inputs, tmp_path, capsys):
    code, err = _run(capsys, _reading(command, inputs["empty"], tmp_path))
    _assert_one_line(code, err, 1, "empty")
    assert not list(inputs["empty"].iterdir())  # nothing written into the input


@pytest.mark.parametrize(("argv", "option"), [
    (["ingest", "SRC", "-o", "OUT/s.zarr", "--memory-limit", "-5GB"], "--memory-limit"),
    (["ingest", "SRC", "-o", "OUT/s.zarr", "--memory-limit", "lots"], "--memory-limit"),
    (["ingest", "SRC", "-o", "OUT/s.zarr", "--target-spacing", "0"], "--target-spacing"),
    (["ingest", "SRC", "-o", "OUT/s.zarr", "--target-spacing", "-1"], "--target-spacing"),
    (["ingest", "SRC", "-o", "OUT/s.zarr", "--target-spacing", "1000"], "--target-spacing"),
    (["ingest", "SRC", "-o", "OUT/s.zarr", "--target-spacing", "nan"], "--target-spacing"),
    (["export", "SRC", "--model", BUNDLED, "-o", "OUT/e", "--threshold", "0"], "--threshold"),
    (["export", "SRC", "--model", BUNDLED, "-o", "OUT/e", "--threshold", "-2"], "--threshold"),
    (["patches", "STORE", "--split", "train", "--k", "0"], "--k"),
])
def test_bad_values_are_usage_errors_before_any_work(argv, option, inputs, tmp_path, capsys):
    subst = {"SRC": str(inputs["vol"]), "STORE": str(inputs["store"])}
    argv = [subst.get(a, a.replace("OUT", str(tmp_path))) for a in argv]
    code, err = _run(capsys, argv)
    assert code == 2, (code, err)
    assert option in "\n".join(err) and not any("Traceback" in line for line in err)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "e").exists()


def test_patches_with_an_absurd_k_is_refused_before_any_work(inputs, capsys):
    code, err = _run(capsys, ["patches", str(inputs["store"]), "--split", "train", "--name", "huge",
                              "--k", "100000000", "--workers", "0"])
    _assert_one_line(code, err, 1, "k=100000000", "GiB", "lower --k")
    assert not (inputs["store"] / "patches" / "huge").exists()


def test_evaluate_with_a_model_of_another_patch_size(inputs, tmp_path, capsys):
    """The same one line as score gives, before any scoring."""
    from octpipe.patches import write_patch_split

    write_patch_split(inputs["store"], "test", name="p32", patch=32, stride=32, workers=0, overwrite=True)
    code, err = _run(capsys, ["evaluate", "--store", str(inputs["store"]), "--model", BUNDLED, "--split", "p32",
                              "-o", str(tmp_path / "ev"), "--device", "cpu"])
    _assert_one_line(code, err, 1, "patches are (32, 32) pixels but the model expects 64×64")
    assert not (tmp_path / "ev").exists()


def test_phantom_into_an_earlier_cohort_names_the_folder_given(tmp_path, capsys):
    argv = ["phantom", "-o", str(tmp_path / "phantoms"), "--n", "1", "--shape", "2,248,128", "--formats", "vol"]
    assert _run(capsys, argv)[0] == 0
    code, err = _run(capsys, argv)
    _assert_one_line(code, err, 1, "phantoms: holds an earlier cohort; pass --overwrite")
    assert "manifest.csv" not in err[0]


def test_export_sidecar_names_the_model_without_its_path(inputs, tmp_path, capsys):
    import json

    from octpipe.io._common import file_sha256

    out = tmp_path / "e"
    assert _run(capsys, ["export", str(inputs["vol"]), "--model", BUNDLED, "-o", str(out), "--device", "cpu",
                         "--stride", "64"])[0] == 0
    (sidecar,) = out.glob("*/anomaly.json")
    model = json.loads(sidecar.read_text())["model"]
    assert model["id"] == "fanogan-phantom" and "path" not in model
    assert model["sha256"] == file_sha256(Path(BUNDLED) / "model.pt")
    assert str(Path(BUNDLED).parent) not in sidecar.read_text()


def test_layers_on_an_image_too_small_for_a_retina_is_one_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((10, 300), 128, np.uint8)).save(tmp_path / "strip.png")
    code, err = _run(capsys, ["layers", str(tmp_path / "strip.png"), "-o", str(tmp_path / "l.npz")])
    _assert_one_line(code, err, 1, "strip.png: cannot segment: volume shape (1, 10, 300) is too small")
    assert not (tmp_path / "l.npz").exists()


@pytest.mark.parametrize("command", ["export", "score", "evaluate", "calibrate"])
def test_a_missing_model_folder_is_named_as_given(command, inputs, tmp_path, capsys):
    nope = str(tmp_path / "models" / "nope")
    argv = {
        "export": ["export", str(inputs["vol"]), "--model", nope, "-o", str(tmp_path / "e")],
        "score": ["score", str(inputs["store"]), "--model", nope, "-o", str(tmp_path / "s.csv")],
        "evaluate": ["evaluate", "--store", str(inputs["store"]), "--model", nope, "-o", str(tmp_path / "ev")],
        "calibrate": ["calibrate", nope, str(inputs["vol"])],
    }[command]
    code, err = _run(capsys, argv)
    assert code == 1 and len(err) == 1 and "nope" in err[0], err
    assert "no such" in err[0] or "no model.pt" in err[0], err
