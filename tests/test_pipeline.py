"""octpipe ingest: discovery, bad inputs, resumability, Dask, privacy."""

import os
import shutil
import struct

import numpy as np
import pydicom
import pytest

from octpipe.cli import main
from octpipe.io.dicom import write_dicom_opt
from octpipe.io.heyex_e2e import write_heyex_e2e_minimal
from octpipe.io.heyex_vol import write_heyex_vol
from octpipe.pipeline import discover_inputs, ingest
from octpipe.preprocess.intensity import linear_to_display
from octpipe.store import complete_volumes, read_volume_group, volume_ids
from tests.conftest import small_phantom

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
    # the manifest is in the store and beside it
    text = (store / "manifest.csv").read_text()
    assert text == result.manifest.read_text()
    assert result.manifest == tmp_path / "s-manifest.csv"


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
            by_src.setdefault(attrs["source"], []).append(arrays)
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
        for secret in SECRETS:
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
