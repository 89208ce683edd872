"""octpipe ingest: discovery, bad inputs, resumability, Dask, privacy."""

import os
import shutil
import struct

import numpy as np
import pydicom
import pytest

from octpipe.cli import main
from octpipe.inputs import discover_inputs
from octpipe.io.writers.dicom import write_dicom_opt
from octpipe.io.writers.heyex_vol import write_heyex_vol
from octpipe.pipeline import ingest
from octpipe.preprocess.intensity import linear_to_display
from octpipe.store import complete_volumes, read_volume_group, volume_ids
from octpipe.testing.heyex_e2e_files import write_heyex_e2e_minimal
from tests.conftest import REAL_DATA, small_phantom

SECRETS = [b"Doe^Jane", b"DOE", b"Jane", b"19450317", b"SN-SECRET-42", b"MRN-998877"]


def _vol(path, seed, **kw):
    ph = small_phantom(seed, shape=(3, 248, 256))
    return write_heyex_vol(path, ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                           layers={"ILM": ph.ilm, "BM": ph.bm}, **kw)


@pytest.fixture
def inputs(tmp_path):
    """Good phantom files plus every kind of bad input the batch must survive."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    good = _vol(src / "a.vol", 1)
    _vol(src / "sub" / "b.vol", 2)
    shutil.copy(good, src / "sub" / "a-copy.vol")  # two copies of one file -> one volume
    blob = good.read_bytes()
    (src / "empty.vol").write_bytes(b"")
    for cut in (1000, 2048 + 100, len(blob) // 2, len(blob) - 10):  # header, SLO, B-scans
        (src / f"trunc-{cut}.vol").write_bytes(blob[:cut])
    rng = np.random.default_rng(0)
    (src / "garbage.vol").write_bytes(b"HSF-OCT-103\x00" + rng.bytes(5000))
    absurd = bytearray(blob)
    struct.pack_into("<I", absurd, 12 + 4, 2**31 - 1)  # NumBScans
    (src / "absurd.vol").write_bytes(bytes(absurd))
    os.symlink(src / "missing-target.vol", src / "dangling.vol")  # unreadable
    junk = src / "junk"
    junk.mkdir()
    for i in range(1000):
        (junk / f"note{i}.txt").write_text(f"not an OCT file {i}\n")
    return src


def _by_path(rows):
    return {r["path"]: r for r in rows}


def test_ingest_survives_bad_inputs_and_records_them(inputs, tmp_path):
    store = tmp_path / "s.zarr"
    result = ingest([inputs], store, workers=0)
    rows = _by_path(result.rows)
    assert not result.ok
    ok = [r for r in result.rows if r["status"] == "ok"]
    assert sorted(r["path"] for r in ok) in (
        ["src/a.vol", "src/sub/b.vol"], ["src/sub/a-copy.vol", "src/sub/b.vol"])
    dup = rows["src/sub/a-copy.vol"] if rows["src/a.vol"]["status"] == "ok" else rows["src/a.vol"]
    assert dup["status"] == "skipped" and "duplicate" in dup["error"]
    assert rows["src/empty.vol"]["status"] == "failed" and "empty" in rows["src/empty.vol"]["error"]
    for name in ("trunc-1000.vol", "trunc-2148.vol", "garbage.vol", "absurd.vol"):
        assert rows[f"src/{name}"]["status"] == "failed", name
    assert "truncated" in rows["src/trunc-1000.vol"]["error"]
    assert rows["src/dangling.vol"]["status"] == "failed"
    junk = [r for r in result.rows if r["path"].startswith("src/junk/")]
    assert len(junk) == 1000 and all(r["status"] == "skipped" for r in junk)
    # errors are one line each
    assert all("\n" not in str(r["error"]) for r in result.rows)
    assert result.counts["ok"] == 2
    assert len(volume_ids(store)) == 2
    # the manifest is in the store (salted hashes for paths) and beside it (the paths given, said on line 1)
    from octpipe.manifest import load_manifest

    inside, beside = load_manifest(store / "manifest.csv"), load_manifest(result.manifest)
    assert result.manifest == tmp_path / "s-manifest.csv"
    assert result.manifest.read_text().startswith("# octpipe ingest manifest: the only file that maps")
    assert sorted(r["volume_id"] for r in inside) == sorted(r["volume_id"] for r in beside)
    assert all(r["path"].startswith("file-") for r in inside)
    assert {r["path"] for r in beside} == {r["path"] for r in result.rows} and "src/a.vol" in {
        r["path"] for r in beside}


def test_stored_volume_is_normalised_with_its_metadata(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ph = small_phantom(3, shape=(3, 248, 256), laterality="OS")
    write_heyex_vol(src / "x.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OS",
                    layers={"ILM": ph.ilm, "BM": ph.bm})
    result = ingest([src], tmp_path / "s.zarr", workers=0)
    (vid,) = volume_ids(tmp_path / "s.zarr")
    arrays, attrs = read_volume_group(tmp_path / "s.zarr", vid)
    image = arrays["image"]
    assert image.shape == (3, 248, 256) and image.dtype == np.float32
    assert image.min() == -1.0 and image.max() == 1.0
    # the normalisation is the display transform followed by a min-max map
    d = linear_to_display(ph.data)
    np.testing.assert_allclose(image, (d - d.min()) / (d.max() - d.min()) * 2 - 1, atol=1e-5)
    np.testing.assert_allclose(arrays["layers"][0], ph.ilm, atol=1e-4)
    assert attrs["laterality"] == "OS" and attrs["status"] == "complete"
    assert attrs["spacing_mm"] == pytest.approx(list(ph.spacing_mm))
    assert result.rows[0]["volume_id"] == vid and result.rows[0]["shape"] == "3x248x256"


def test_rerun_skips_complete_and_overwrite_redoes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _vol(src / "a.vol", 1)
    store = tmp_path / "s.zarr"
    first = ingest([src], store, workers=0)
    assert first.counts == {"ok": 1, "skipped": 0, "failed": 0}
    mtime = (store / "volumes" / first.rows[0]["volume_id"] / "zarr.json").stat().st_mtime_ns
    second = ingest([src], store, workers=0)
    assert second.counts["skipped"] == 1 and second.rows[0]["error"] == "already complete"
    assert (store / "volumes" / first.rows[0]["volume_id"] / "zarr.json").stat().st_mtime_ns == mtime
    third = ingest([src], store, workers=0, overwrite=True)
    assert third.counts["ok"] == 1
    assert volume_ids(store) == [first.rows[0]["volume_id"]]


def test_manifest_describes_the_whole_store_after_every_run(tmp_path):
    """A rerun, a rerun with one source, and a run after a kill keep every volume's metadata."""
    from octpipe.manifest import load_manifest

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        _vol(src / f"v{i}.vol", i + 1)
    store = tmp_path / "s.zarr"
    first = ingest([src], store, workers=0)
    assert first.counts["ok"] == 3
    full = {r["volume_id"]: r for r in load_manifest(tmp_path / "s-manifest.csv")}

    def check(expect_status: dict[str, str]) -> None:
        for path in (tmp_path / "s-manifest.csv", store / "manifest.csv"):
            rows = {r["volume_id"]: r for r in load_manifest(path)}
            assert set(rows) == set(full)
            for vid, r in rows.items():
                for col in ("shape", "spacing_mm", "spacing_source", "laterality", "sha256"):
                    assert r[col] == full[vid][col] and r[col] != "", (col, r)
                if path.parent == tmp_path:  # beside the store: the path as given (in/v1.vol, or v1.vol alone)
                    assert full[vid]["path"].endswith(r["path"])
                else:  # in the store: a salted hash
                    assert r["path"].startswith("file-") and r["path"].endswith(".vol")
                assert r["status"] == expect_status.get(vid, "ok")

    ingest([src], store, workers=0)  # everything already complete
    check(dict.fromkeys(full, "skipped"))
    one = ingest([src / "v1.vol"], store, workers=0)  # one source of three
    check({one.rows[0]["volume_id"]: "skipped"})
    # a run killed before it wrote its manifest: the store, not the manifest, is the record
    (store / "manifest.csv").unlink()
    (tmp_path / "s-manifest.csv").unlink()
    ingest([src], store, workers=0)  # the same sources again, as after a kill
    check(dict.fromkeys(full, "skipped"))


def test_half_written_volume_never_counts_as_complete(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _vol(src / "a.vol", 1)
    store = tmp_path / "s.zarr"
    ingest([src], store, workers=0)
    (vid,) = volume_ids(store)
    # simulate a crash: a staged copy left behind, and a group without its completion mark
    shutil.copytree(store / "volumes" / vid, store / ".staging" / f"{vid}-dead")
    meta = store / "volumes" / vid / "zarr.json"
    meta.write_text(meta.read_text().replace('"complete"', '"writing"'))
    assert complete_volumes(store) == {}
    again = ingest([src], store, workers=0, overwrite=True)
    assert again.counts["ok"] == 1 and len(complete_volumes(store)) == 1


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_dask_cluster_gives_the_same_store(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        _vol(src / f"v{k}.vol", k)
    (src / "bad.vol").write_bytes(b"HSF-OCT-103\x00")
    serial = ingest([src], tmp_path / "serial.zarr", workers=0)
    parallel = ingest([src], tmp_path / "dask.zarr", workers=2)
    assert parallel.counts == serial.counts == {"ok": 3, "skipped": 0, "failed": 1}
    # volume ids differ between stores (own salt), the content does not
    by_src = {}
    for store in ("serial.zarr", "dask.zarr"):
        for vid in volume_ids(tmp_path / store):
            arrays, attrs = read_volume_group(tmp_path / store, vid)
            by_src.setdefault(attrs["sha256"], []).append(arrays)
    assert len(by_src) == 3
    for a, b in by_src.values():  # every stage's output: image, layers, flat, flatmap
        assert set(a) == set(b) >= {"image", "layers", "flat", "flatmap"}
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_discovery_groups_bscan_folders_and_skips_label_maps(tmp_path):
    from PIL import Image

    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(folder / f"b{i}.png")
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray(rng.integers(0, 4, (40, 30), dtype=np.uint8)).save(labels / "l.png")
    inputs, skipped = discover_inputs([tmp_path])
    assert [(i.format, os.path.basename(i.path)) for i in inputs] == [("bscan-folder", "scans")]
    assert len(skipped) == 1 and "label map" in skipped[0]["error"]


def test_no_patient_identifier_reaches_store_manifest_or_logs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ph = small_phantom(5, shape=(3, 248, 256))
    u8 = np.round(linear_to_display(ph.data) * 255).astype(np.uint8)
    dcm = write_dicom_opt(src / "p.dcm", u8, spacing_mm=ph.spacing_mm, laterality="OD", patient_id="MRN-998877")
    ds = pydicom.dcmread(dcm)
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19450317"
    ds.DeviceSerialNumber = "SN-SECRET-42"
    ds.save_as(dcm)
    vol = write_heyex_vol(src / "p.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OD",
                          patient_id="Doe^Jane-MRN-998877")
    raw = bytearray(vol.read_bytes())
    struct.pack_into("<d", raw, 164, 16513.0)  # DOB 1945-03-17 as days since 1899-12-30
    vol.write_bytes(bytes(raw))
    write_heyex_e2e_minimal(src / "p.e2e", [ph.data[:2]], lateralities=["OD"], patient_name="DOE^JANE")
    for f in src.iterdir():  # the inputs do carry the identity
        data = f.read_bytes()
        assert any(s in data or s.decode().lower().encode() in data for s in SECRETS), f
    store = tmp_path / "s.zarr"
    result = ingest([src], store, workers=0)
    assert result.counts["ok"] == 3, result.rows
    written = [p for p in store.rglob("*") if p.is_file()] + [result.manifest]
    assert any(p.suffix == ".log" for p in written)
    for path in written:
        data = path.read_bytes()
        # compressed pixel chunks are random bytes: a 3-letter name matches them by chance
        chunk = "c" in path.relative_to(store).parts[:-1] if path.is_relative_to(store) else False
        for secret in SECRETS:
            if chunk and len(secret) < 6:
                continue
            assert secret not in data, (secret, path)
            assert secret.lower() not in data, (secret, path)


def test_ingest_command_exit_codes(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _vol(src / "a.vol", 1)
    assert main(["--no-progress", "ingest", str(src), "-o", str(tmp_path / "s.zarr"), "--workers", "0"]) == 0
    assert "1 written" in capsys.readouterr().out
    (src / "bad.vol").write_bytes(b"HSF-OCT-103")
    assert main(["ingest", str(src), "-o", str(tmp_path / "s.zarr"), "--workers", "0"]) == 1
    captured = capsys.readouterr()
    assert "1 skipped, 1 failed" in captured.out
    assert "failed: in/bad.vol:" in captured.err
    assert main(["ingest", str(src), "-o", str(tmp_path / "s.zarr"), "--robust", "9,1"]) == 2


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_ingest_of_the_real_sample_data(real_data, tmp_path):
    result = ingest([real_data], tmp_path / "real.zarr", workers=0)
    rows = _by_path(result.rows)
    ok = {p for p, r in rows.items() if r["status"] == "ok"}
    assert {"real/halirutan_spectralis-raw-data/test-data/valid.vol",
            "real/DIAGNijmegen_rse-panimg/tests/resources/oct/e2e_minimized.E2E",
            "real/DIAGNijmegen_rse-panimg/tests/resources/oct/fda_minimized.fda",
            "real/BilalHassan90_OCT-Biomarker-Segmentation/OCT Volumes/1/Raw Scans"} <= ok
    assert rows["real/BilalHassan90_OCT-Biomarker-Segmentation/OCT Volumes/1/Raw Scans"]["shape"] == "19x512x496"
    masks = [r for p, r in rows.items() if "Ground Truth Labels" in p or "/mask/" in p]
    assert masks and all(r["status"] == "skipped" and "label map" in r["error"] for r in masks)
    assert rows["real/SOURCES.md"]["status"] == "skipped"
    # the FDS format fixture (4 x 3 x 2 pixels) reads, but holds no retina to preprocess
    fds = rows["real/DIAGNijmegen_rse-panimg/tests/resources/oct/fds_minimized.fds"]
    assert fds["status"] == "failed" and "too small" in fds["error"]
    assert result.counts["failed"] == 1


def test_manifest_follows_its_schema(inputs, tmp_path):
    from octpipe.errors import OctpipeError
    from octpipe.manifest import load_manifest

    result = ingest([inputs], tmp_path / "s.zarr", workers=0)
    rows = load_manifest(result.manifest)
    assert len(rows) == len(result.rows) and {r["status"] for r in rows} == {"ok", "skipped", "failed"}
    broken = tmp_path / "broken.csv"
    broken.write_text(result.manifest.read_text().replace(",ok,", ",done,", 1))
    with pytest.raises(OctpipeError, match="status='done'"):
        load_manifest(broken)


# --- folders of B-scan images: one volume, or independent B-scans --------------------------------------------

GOODSEA_NORMAL = REAL_DATA.parent / "cohorts" / "Goodsea_heysaw" / "deploy" / "val" / "NORMAL"
BILAL_VOLUME = "BilalHassan90_OCT-Biomarker-Segmentation/OCT Volumes/1/Raw Scans"
KERMANY_NORMAL = ["NORMAL-4872585-1.jpeg", "NORMAL-5156112-1.jpeg", "NORMAL-5171640-1.jpeg", "NORMAL-5193994-1.jpeg",
                  "NORMAL-5246808-1.jpeg", "NORMAL-5246808-2.jpeg", "NORMAL-5324912-1.jpeg", "NORMAL-9053621-1.jpeg"]


@pytest.fixture
def goodsea_normal():
    if not GOODSEA_NORMAL.is_dir():
        pytest.skip(f"cohort folder {GOODSEA_NORMAL} not present")
    return GOODSEA_NORMAL


def _same_size(names, size=(512, 496)):
    return [(n, size) for n in names]


@pytest.mark.parametrize("names", [
    [f"Image {i}.TIFF" for i in range(1, 20)],
    [f"Image {i}.TIFF" for i in (7, 3, 19, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)],  # any order
    [f"bscan_{i:03d}.png" for i in range(5)],
    ["bscan_000.png", "bscan_001.png"],  # octpipe's own writer: zero-padded, two are enough
    ["Image 9.tif", "Image 10.tif", "Image 11.tif"],  # digit count changes
    ["scan_2019_03_b001.png", "scan_2019_03_b002.png", "scan_2019_03_b003.png"],  # constant numbers around it
    ["Image 1.TIFF", "image 2.tiff", "IMAGE 3.Tiff"],  # letter case is not evidence
    [f"b{i}.png" for i in range(1, 21) if i != 10],  # one B-scan dropped out of 20
])
def test_numbered_same_size_images_are_one_volume(names):
    from octpipe.inputs import classify_image_folder

    decision = classify_image_folder(_same_size(names))
    assert decision.kind == "volume", decision.reason
    assert f"{len(names)} images of 512x496" in decision.reason


@pytest.mark.parametrize(("names", "why"), [
    (KERMANY_NORMAL, "differ in 2 numbers"),  # patient id and visit vary
    (["NORMAL-4872585-1.jpeg", "NORMAL-5156112-1.jpeg", "NORMAL-5171640-1.jpeg"], "not a consecutive"),
    (["CNV-6294785-1.jpeg", "CNV-6294785-2.jpeg"], "only 2 numbered"),  # two visits of one patient
    (["left.png", "right.png", "centre.png"], "more than a number"),
    (["a.png", "b.png"], "more than a number"),
    (["scan.png", "scan.jpg"], "more than a number"),
    (["b1.png", "b2.png", "b3.jpg"], "more than a number"),  # another extension
    (["b1.png", "b01.png", "b2.png"], "repeat"),
    (["b1.png", "b2.png", "b3.png", "b7.png", "b8.png"], "3 of 8 missing"),
    (["only.png"], "a single image"),
])
def test_other_image_folders_are_independent_bscans(names, why):
    from octpipe.inputs import classify_image_folder

    kind, reason = classify_image_folder(_same_size(names))
    assert kind == "bscans"
    assert why in reason


def test_sizes_decide_before_names():
    from octpipe.inputs import classify_image_folder

    names = [f"Image {i}.tif" for i in range(1, 6)]
    mixed = [(n, (768, 496) if i % 2 else (512, 496)) for i, n in enumerate(names)]
    assert classify_image_folder(mixed) == ("bscans", "image sizes differ (WxH: 512x496 (3), 768x496 (2))")
    assert classify_image_folder([(n, (512, 496, 1)) for n in names]).kind == "volume"  # one page each: fine
    assert "holds 3 pages" in classify_image_folder([(names[0], (512, 496, 3)), *_same_size(names[1:])]).reason
    assert "cannot be read" in classify_image_folder([(names[0], None), *_same_size(names[1:])]).reason
    assert classify_image_folder([]).kind == "bscans"


def _phantom_u8(seed, n=3):
    ph = small_phantom(seed, shape=(n, 248, 256))
    return np.round(linear_to_display(ph.data) * 255).astype(np.uint8)


def test_discovery_of_image_folders_follows_the_names(tmp_path):
    from PIL import Image

    from octpipe.io.writers.images import write_bscan_folder

    written = write_bscan_folder(tmp_path / "octpipe_png", _phantom_u8(0, n=4))
    loose = tmp_path / "loose"
    loose.mkdir()
    u8 = _phantom_u8(1)
    for name, bscan in zip(("left.png", "right.png", "centre.png"), u8, strict=True):  # same size, no sequence
        Image.fromarray(bscan).save(loose / name)
    inputs, rows = discover_inputs([tmp_path])
    got = sorted((os.path.relpath(i.path, tmp_path), i.format, i.images) for i in inputs)
    assert got == [("loose/centre.png", "image", "bscan"), ("loose/left.png", "image", "bscan"),
                   ("loose/right.png", "image", "bscan"), ("octpipe_png", "bscan-folder", "volume")]
    assert rows == []
    by_rel = {os.path.relpath(i.path, tmp_path): i for i in inputs}
    assert "4 images of 256x248 numbered 0..3 (bscan_<n>.png)" == by_rel[written.name].images_reason
    # the override, both ways
    forced, _ = discover_inputs([tmp_path], images="bscans")
    assert sorted(i.format for i in forced) == ["image"] * 7
    forced, _ = discover_inputs([loose], images="volume")
    assert [(i.format, i.images, i.rel) for i in forced] == [("bscan-folder", "volume", "loose")]
    assert "--images volume (auto: names differ in more than a number" in forced[0].images_reason
    with pytest.raises(ValueError, match="images must be one of auto, volume, bscans"):
        discover_inputs([loose], images="folder")


def test_independent_bscans_of_a_public_dataset_become_one_volume_each(goodsea_normal, tmp_path):
    result = ingest([goodsea_normal], tmp_path / "s.zarr", workers=0)
    assert result.counts == {"ok": 8, "skipped": 0, "failed": 0}
    assert sorted(r["path"] for r in result.rows) == [f"NORMAL/{n}" for n in KERMANY_NORMAL]
    assert {(r["format"], r["images"], r["shape"]) for r in result.rows} == {("image", "bscan", "1x496x512")}
    assert len(volume_ids(tmp_path / "s.zarr")) == 8
    _, attrs = read_volume_group(tmp_path / "s.zarr", result.rows[0]["volume_id"])
    assert attrs["images"] == "bscan" and "differ in 2 numbers" in attrs["images_reason"]


def test_numbered_real_folder_is_one_volume_in_number_order(real_data, tmp_path):
    from PIL import Image

    folder = real_data / BILAL_VOLUME
    store = tmp_path / "s.zarr"
    result = ingest([folder], store, workers=0)
    assert result.counts["ok"] == 1 and len(result.rows) == 1, result.rows
    (row,) = result.rows
    assert (row["path"], row["format"], row["images"], row["shape"]) == ("Raw Scans", "bscan-folder", "volume",
                                                                         "19x512x496")
    arrays, attrs = read_volume_group(store, row["volume_id"])
    assert attrs["images"] == "volume" and attrs["images_reason"].startswith("19 images of 496x512 numbered 1..19")
    # B-scan k of the store is "Image k+1" (natural order, not Image 1, 10, 11, ...): normalised, columns averaged
    raw = np.stack([np.asarray(Image.open(folder / f"Image {k}.TIFF").convert("L"), np.float64)
                    for k in range(1, 20)])
    assert attrs["column_factor"] == 2
    norm = (raw - raw.min()) / (raw.max() - raw.min()) * 2 - 1
    expected = norm.reshape(19, 512, 248, 2).mean(axis=-1)
    stored = arrays["image"].astype(np.float64)
    differs = np.array([[np.median(np.abs(stored[k] - expected[j])) for j in range(19)] for k in range(19)])
    assert list(differs.argmin(axis=1)) == list(range(19))
    assert np.all(np.diag(differs) < 1e-4)  # the same pixels, up to a few that preprocessing changed


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_images_option_overrides_the_decision(goodsea_normal, tmp_path, capsys):
    from PIL import Image

    from octpipe.io.writers.images import write_bscan_folder
    from octpipe.manifest import load_manifest

    numbered = write_bscan_folder(tmp_path / "in" / "scan_png", _phantom_u8(2))
    store = tmp_path / "a.zarr"
    assert main(["--no-progress", "ingest", str(numbered), "-o", str(store), "--workers", "0",
                 "--images", "bscans"]) == 0
    rows = load_manifest(tmp_path / "a-manifest.csv")
    assert [(r["path"], r["format"], r["images"], r["shape"]) for r in rows] == [
        (f"scan_png/bscan_00{k}.png", "image", "bscan", "1x248x256") for k in range(3)]
    assert len(volume_ids(store)) == 3
    # and the same folder by default: one volume
    assert main(["--no-progress", "ingest", str(numbered), "-o", str(tmp_path / "b.zarr"), "--workers", "0"]) == 0
    rows = load_manifest(tmp_path / "b-manifest.csv")
    assert [(r["format"], r["images"], r["shape"]) for r in rows] == [("bscan-folder", "volume", "3x248x256")]
    # --images volume on the independent Kermany B-scans (all 512x496 in this folder): one volume of 8
    assert main(["--no-progress", "ingest", str(goodsea_normal), "-o", str(tmp_path / "c.zarr"), "--workers", "0",
                 "--images", "volume"]) == 0
    rows = load_manifest(tmp_path / "c-manifest.csv")
    assert [(r["path"], r["format"], r["images"], r["shape"]) for r in rows] == [
        ("NORMAL", "bscan-folder", "volume", "8x496x512")]
    # --images volume where sizes differ: one failed row naming the folder and why, exit 1
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    u8 = _phantom_u8(3)
    for k, bscan in enumerate(u8, start=1):
        Image.fromarray(bscan if k != 2 else bscan[:, :200]).save(mixed / f"Image {k}.png")
    capsys.readouterr()
    assert main(["--no-progress", "ingest", str(mixed), "-o", str(tmp_path / "d.zarr"), "--workers", "0",
                 "--images", "volume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["failed: mixed: --images volume: cannot stack 3 images as one volume: image sizes differ "
                   "(WxH: 256x248 (2), 200x248 (1))"]
    rows = load_manifest(tmp_path / "d-manifest.csv")
    assert [(r["path"], r["format"], r["images"], r["status"]) for r in rows] == [
        ("mixed", "bscan-folder", "volume", "failed")]
    assert volume_ids(tmp_path / "d.zarr") == []
    assert main(["ingest", str(mixed), "-o", str(tmp_path / "e.zarr"), "--images", "stack"]) == 2
    assert not (tmp_path / "e.zarr").exists()


def test_old_manifest_without_images_column_still_loads(inputs, tmp_path):
    import csv

    from octpipe.errors import OctpipeError
    from octpipe.manifest import load_manifest

    result = ingest([inputs], tmp_path / "s.zarr", workers=0)
    current = load_manifest(result.manifest)
    old = tmp_path / "old.csv"
    old_columns = [c for c in current[0] if c != "images"]
    with open(old, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(current)
    rows = load_manifest(old)
    assert len(rows) == len(current) and all(r["images"] == "" for r in rows)
    assert list(rows[0]) == list(current[0])
    assert [r["volume_id"] for r in rows] == [r["volume_id"] for r in current]
    # a wrong value in the new column is refused
    bad = tmp_path / "bad.csv"
    bad.write_text(result.manifest.read_text().replace(",heyex-vol,,", ",heyex-vol,stack,", 1))
    with pytest.raises(OctpipeError, match="images='stack' not one of"):
        load_manifest(bad)
    # a column set that matches no version is refused
    other = tmp_path / "other.csv"
    other.write_text(old.read_text().replace("laterality,", "", 1))
    with pytest.raises(OctpipeError, match="differ from"):
        load_manifest(other)


@pytest.mark.parametrize("workers", [0, 1])
def test_spacing_option_reaches_store_and_manifest(tmp_path, workers):
    from octpipe.manifest import load_manifest

    src = tmp_path / "in"
    src.mkdir()
    _vol(src / "a.vol", 1)  # file spacing: SMALL_SPACING (0.24, 0.00774, 0.0226)
    store = tmp_path / "s.zarr"
    result = ingest([src], store, workers=workers, spacing=(None, 0.0039, 0.0113))
    assert result.counts["ok"] == 1, result.rows
    (row,) = load_manifest(result.manifest)
    assert (row["spacing_mm"], row["spacing_source"], row["images"]) == ("0.24;0.0039;0.0113", "user", "")
    arrays, attrs = read_volume_group(store, row["volume_id"])
    assert attrs["spacing_source"] == "user" and attrs["file_spacing_source"] == "file"
    assert attrs["source_spacing_mm"] == pytest.approx([0.24, 0.0039, 0.0113])
    assert attrs["file_spacing_mm"] == pytest.approx([0.24, 0.00774, 0.0226])
    # the user's lateral spacing drives the column downsampling: 0.0113 mm -> factor 2 to reach 0.0226
    assert attrs["column_factor"] == 2 and arrays["image"].shape == (3, 248, 128)
    assert attrs["spacing_mm"] == pytest.approx([0.24, 0.0039, 0.0226])


def test_hashed_paths_keep_image_names_out_of_the_folder_decision(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    (src / "seq").mkdir(parents=True)
    (src / "loose").mkdir()
    u8 = _phantom_u8(4)
    for k, bscan in enumerate(u8, start=1):
        Image.fromarray(bscan).save(src / "seq" / f"Doe_Jane_{k}.png")
    Image.fromarray(u8[0]).save(src / "loose" / "Roe_Rick_19450317.png")
    Image.fromarray(u8[1]).save(src / "loose" / "Poe_Edgar_19370519.png")
    plain = ingest([src], tmp_path / "plain.zarr", workers=0, keep_paths=True)
    reasons = {read_volume_group(tmp_path / "plain.zarr", r["volume_id"])[1]["images_reason"] for r in plain.rows}
    assert "3 images of 256x248 numbered 1..3 (Doe_Jane_<n>.png)" in reasons  # names quoted with --keep-paths
    result = ingest([src], tmp_path / "hashed.zarr", workers=0, keep_paths=False)
    assert result.counts["ok"] == 3
    assert sorted(r["images"] for r in result.rows) == ["bscan", "bscan", "volume"]
    written = [p for p in (tmp_path / "hashed.zarr").rglob("*") if p.is_file()]  # not the manifest beside it
    assert b"Roe_Rick" in result.manifest.read_bytes()  # which alone maps ids to the paths given
    for path in written:
        data = path.read_bytes()
        # compressed pixel chunks are random bytes: a 3-letter name matches them by chance
        chunk = path.is_relative_to(tmp_path / "hashed.zarr") and "c" in path.relative_to(tmp_path).parts[:-1]
        for name in (b"Doe", b"Jane", b"Roe", b"Rick", b"Poe", b"Edgar", b"19450317"):
            if chunk and len(name) < 6:
                continue
            assert name not in data, (name, path)
    reasons = {read_volume_group(tmp_path / "hashed.zarr", r["volume_id"])[1]["images_reason"] for r in result.rows}
    assert reasons == {"3 images of 256x248 numbered 1..3", "names differ in more than a number"}


def test_annotation_sidecars_are_not_reported_as_unsupported_files(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ph = small_phantom(5, lesions="irf", shape=(3, 248, 256))
    write_heyex_vol(src / "a.vol", ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                    layers={"ILM": ph.ilm, "BM": ph.bm})
    np.savez_compressed(src / "a_truth.npz", lesion_mask=ph.lesion_mask)
    (src / "notes.txt").write_text("not OCT")
    result = ingest([src], tmp_path / "s.zarr", workers=0)
    reasons = {str(r["path"]).rsplit("/", 1)[-1]: r["error"] for r in result.rows}
    assert reasons["a_truth.npz"] == "annotation sidecar (read with its volume)"
    assert reasons["notes.txt"].startswith("not a supported OCT format")
    assert result.counts["ok"] == 1


def test_real_files_give_the_documented_flattened_height(tmp_path):
    """README: ``flat`` is (z, 128, x') for every device and spacing (a fixed 3.87 µm grid)."""
    src = REAL_DATA / "halirutan_spectralis-raw-data" / "test-data"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    store = tmp_path / "real.zarr"
    result = ingest([src], store, workers=0)
    assert result.counts["ok"] >= 4
    for vid in volume_ids(store):
        arrays, attrs = read_volume_group(store, vid)
        assert arrays["flat"].shape[1] == 128 and attrs["flatten"]["height"] == 128
