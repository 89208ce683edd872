"""``--images`` and ``--spacing-mm`` on info, layers and ingest; ``info`` on folders of B-scan images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from octpipe.cli import main
from octpipe.io.writers.heyex_vol import write_heyex_vol
from tests.conftest import REAL_DATA, small_phantom

GOODSEA_NORMAL = REAL_DATA.parent / "cohorts" / "Goodsea_heysaw" / "deploy" / "val" / "NORMAL"
BILAL_VOLUME = "BilalHassan90_OCT-Biomarker-Segmentation/OCT Volumes/1/Raw Scans"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def vol_file(tmp_path_factory):
    ph = small_phantom(4, shape=(2, 496, 256), spacing_mm=(0.24, 0.00387, 0.0113))
    path = tmp_path_factory.mktemp("spacing") / "p.vol"
    return write_heyex_vol(path, ph.data, spacing_mm=ph.spacing_mm, laterality="OD")


@pytest.fixture
def goodsea_normal():
    if not GOODSEA_NORMAL.is_dir():
        pytest.skip(f"cohort folder {GOODSEA_NORMAL} not present")
    return GOODSEA_NORMAL


def test_info_on_a_folder_of_independent_bscans_gives_one_record_each(goodsea_normal, capsys):
    code, out, _ = _run(capsys, "info", str(goodsea_normal), "--json")
    assert code == 0
    records = json.loads(out)
    assert isinstance(records, list) and len(records) == 8
    assert [r["file"] for r in records] == sorted(p.name for p in goodsea_normal.iterdir())
    assert {(r["format"], r["images"], tuple(r["shape"])) for r in records} == {("image", "bscan", (1, 496, 512))}
    assert all("differ in 2 numbers" in r["images_reason"] for r in records)
    code, out, _ = _run(capsys, "info", str(goodsea_normal))
    assert code == 0
    assert out.splitlines()[0].startswith("NORMAL: 8 independent B-scan image(s), one record each: names differ in 2")
    assert out.count("(series 0): image,") == 8
    # forced into one volume (all 512x496 here)
    code, out, _ = _run(capsys, "info", str(goodsea_normal), "--json", "--images", "volume")
    assert code == 0
    record = json.loads(out)
    assert (record["format"], record["images"], record["shape"]) == ("bscan-folder", "volume", [8, 496, 512])


def test_info_on_a_numbered_folder_gives_one_volume(real_data, capsys):
    folder = real_data / BILAL_VOLUME
    code, out, _ = _run(capsys, "info", str(folder), "--json")
    assert code == 0
    record = json.loads(out)
    assert (record["file"], record["format"], record["images"], record["shape"]) == (
        "Raw Scans", "bscan-folder", "volume", [19, 512, 496])
    code, out, _ = _run(capsys, "info", str(folder))
    assert out.splitlines()[0] == ("Raw Scans: one volume of 19 B-scans: 19 images of 496x512 numbered 1..19 "
                                   "(Image <n>.TIFF)")
    code, out, _ = _run(capsys, "info", str(folder), "--json", "--images", "bscans")
    records = json.loads(out)
    assert [r["file"] for r in records] == sorted(f"Image {k}.TIFF" for k in range(1, 20))
    assert {tuple(r["shape"]) for r in records} == {(1, 512, 496)}


def test_info_images_volume_on_mixed_sizes_is_one_line_error(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, width in enumerate((64, 64, 48), start=1):
        Image.fromarray(rng.integers(0, 256, (40, width), dtype=np.uint8)).save(tmp_path / f"Image {k}.png")
    code, _, err = _run(capsys, "info", str(tmp_path), "--images", "volume")
    assert code == 1
    assert err.strip().splitlines() == [f"error: {tmp_path.name}: --images volume: cannot stack 3 images as one "
                                        "volume: image sizes differ (WxH: 64x40 (2), 48x40 (1))"]
    code, out, _ = _run(capsys, "info", str(tmp_path), "--json")  # auto: mixed sizes are independent B-scans
    assert code == 0 and [r["shape"][2] for r in json.loads(out)] == [64, 64, 48]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(capsys, "info", str(empty))
    assert code == 1 and err.strip().splitlines() == ["error: empty: no B-scan images (.png, .jpg, .jpeg, .tif, "
                                                      ".tiff, .bmp) in the folder"]


def test_info_spacing_option(vol_file, capsys):
    code, out, _ = _run(capsys, "info", str(vol_file), "--json", "--spacing-mm", ",0.0039,0.0114")
    assert code == 0
    record = json.loads(out)
    assert record["spacing_mm"] == [0.24, 0.0039, 0.0114] and record["spacing_source"] == "user"
    code, out, _ = _run(capsys, "info", str(vol_file), "--json")
    assert json.loads(out)["spacing_source"] == "file"


def test_layers_spacing_option(vol_file, tmp_path, capsys):
    out = tmp_path / "l.npz"
    code, _, err = _run(capsys, "layers", str(vol_file), "-o", str(out), "--spacing-mm", "0.2,0.004,")
    assert code == 0, err
    with np.load(out) as data:
        np.testing.assert_allclose(data["spacing_mm"], [0.2, 0.004, 0.0113])
        assert data["ilm"].shape == (2, 256)


def test_ingest_spacing_option_reaches_store_and_manifest(vol_file, tmp_path, capsys):
    from octpipe.manifest import load_manifest
    from octpipe.store import read_volume_group

    store = tmp_path / "s.zarr"
    code, _, err = _run(capsys, "ingest", str(vol_file), "-o", str(store), "--workers", "0",
                        "--spacing-mm", "0.1,,0.0226")
    assert code == 0, err
    (row,) = load_manifest(tmp_path / "s-manifest.csv")
    assert (row["spacing_mm"], row["spacing_source"]) == ("0.1;0.00387;0.0226", "user")
    _, attrs = read_volume_group(store, row["volume_id"])
    assert attrs["spacing_source"] == "user"
    assert attrs["source_spacing_mm"] == pytest.approx([0.1, 0.00387, 0.0226])
    assert attrs["column_factor"] == 1  # already at the target lateral spacing: no downsampling


@pytest.mark.parametrize("value", ["1,2", "a,0.004,0.01", ",0,", ",,", "0.1,-0.004,0.01", "nan,0.004,0.01"])
@pytest.mark.parametrize("command", ["info", "layers", "ingest"])
def test_bad_spacing_is_a_one_line_usage_error(vol_file, tmp_path, capsys, command, value):
    extra = {"info": [], "layers": ["-o", str(tmp_path / "l.npz")],
             "ingest": ["-o", str(tmp_path / "s.zarr"), "--workers", "0"]}[command]
    code, out, err = _run(capsys, command, str(vol_file), *extra, f"--spacing-mm={value}")
    assert code == 2, (out, err)
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--spacing-mm" in errors[0] and "spacing" in errors[0].split("--spacing-mm", 1)[1]
    assert "Traceback" not in err and "Traceback" not in out
    assert not (tmp_path / "l.npz").exists() and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("command", ["info", "ingest"])
def test_bad_images_value_is_a_usage_error(vol_file, tmp_path, capsys, command):
    extra = [] if command == "info" else ["-o", str(tmp_path / "s.zarr"), "--workers", "0"]
    code, _, err = _run(capsys, command, str(vol_file), *extra, "--images", "stack")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--images" in errors[0] and "auto, volume, bscans" in errors[0]
    assert not (tmp_path / "s.zarr").exists()
