"""Privacy sweep: identifiers written into DICOM, .vol, E2E and XML inputs appear in no output byte."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pytest

from octpipe.cli import main
from octpipe.testing.privacy import IDENTIFIERS, assert_no_identifiers, find_identifiers
from tests.conftest import small_phantom

ID = IDENTIFIERS


def _days_since_1899(date: str) -> float:
    return float((_dt.date.fromisoformat(date) - _dt.date(1899, 12, 30)).days)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One phantom in four formats, each carrying the identifiers its format has room for (neutral file names)."""
    from octpipe.io.writers.dicom import write_dicom_opt
    from octpipe.io.writers.heyex_vol import write_heyex_vol
    from octpipe.io.writers.heyex_xml import write_heyex_xml
    from octpipe.preprocess.intensity import linear_to_display
    from octpipe.testing.heyex_e2e_files import write_heyex_e2e_minimal

    src = tmp_path_factory.mktemp("privacy") / "src"
    ph = small_phantom(seed=11)
    u8 = np.round(linear_to_display(ph.data) * 255).astype(np.uint8)
    layers = {"ILM": ph.ilm, "BM": ph.bm}
    write_heyex_vol(src / "a.vol", ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality, layers=layers,
                    patient_id=ID["patient_id"],
                    identifying={"DOB": _days_since_1899(ID["birth_date"]), "VisitID": ID["visit_id"],
                                 "ID": ID["device_serial"][:15], "PID": 4417983})
    write_dicom_opt(src / "b.dcm", u8, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                    patient_id=ID["patient_id"],
                    identifying={"PatientName": f"{ID['last_name']}^{ID['first_name']}",
                                 "PatientBirthDate": ID["birth_date"].replace("-", ""),
                                 "DeviceSerialNumber": ID["device_serial"], "InstitutionName": ID["institution"],
                                 "OtherPatientIDs": ID["visit_id"]})
    write_heyex_e2e_minimal(src / "c.E2E", [np.clip(ph.data, 0, 1.9)], lateralities=[ph.laterality],
                            patient_name=f"{ID['first_name']} {ID['last_name']}")
    write_heyex_xml(src / "d_xml", u8, spacing_mm=ph.spacing_mm, laterality=ph.laterality, layers=layers,
                    patient={"LastName": ID["last_name"], "FirstNames": ID["first_name"],
                             "BirthDate": ID["birth_date"], "PatientID": ID["patient_id"]})
    # the inputs really carry the identifiers (else the sweep below proves nothing)
    for name, needle in (("a.vol", ID["patient_id"]), ("b.dcm", ID["device_serial"]),
                         ("b.dcm", ID["birth_date"].replace("-", "")), ("d_xml", ID["last_name"])):
        assert find_identifiers([src / name], [needle]), (name, needle)
    assert find_identifiers([src / "c.E2E"], {"last_name": ID["last_name"], "first_name": ID["first_name"]})
    return src


def test_pipeline_outputs_carry_no_identifiers(inputs, tmp_path, capsys):
    store = tmp_path / "cohort.zarr"
    texts: dict[str, str] = {}

    def run(name: str, *argv: str) -> int:
        code = main(["--no-progress", "-v", *argv])
        out, err = capsys.readouterr()
        texts[f"{name} stdout"], texts[f"{name} stderr"] = out, err
        return code

    assert run("ingest", "ingest", str(inputs), "-o", str(store), "--workers", "0") == 0, texts["ingest stderr"]
    from octpipe.store import complete_volumes

    # .vol, DICOM, E2E and the XML export (whose B-scan PNGs are also picked up as images) were all ingested
    assert len(complete_volumes(store)) >= 4
    assert run("patches", "patches", str(store), "--split", "test", "--workers", "0") == 0
    for name in ("a.vol", "b.dcm", "c.E2E", "d_xml/export.xml"):
        assert run(f"info {name}", "info", str(inputs / name), "--json") == 0
        assert run(f"info-table {name}", "info", str(inputs / name)) == 0
        assert run(f"layers {name}", "layers", str(inputs / name), "-o", str(tmp_path / f"{name[:5]}-layers.npz")) == 0
    outputs = [store, tmp_path / "cohort-manifest.csv", *tmp_path.glob("*-layers.npz")]
    n_files = assert_no_identifiers(outputs, IDENTIFIERS, texts=texts)
    assert n_files > 20  # store arrays and attrs, manifests, logs, layer files


def test_reader_volumes_carry_no_identifiers(inputs):
    """Nothing identifying reaches an OctVolume (meta, provenance, layers) of any of the four readers."""
    from octpipe.io import read_volumes

    for name in ("a.vol", "b.dcm", "c.E2E", "d_xml/export.xml"):
        for vol in read_volumes(inputs / name):
            text = repr(vol.meta) + repr(vol.provenance) + repr(sorted(vol.layers)) + str(vol.volume_id)
            assert not find_identifiers([], IDENTIFIERS, texts={name: text}), name


def test_the_sweep_finds_a_leak(tmp_path):
    """The checker itself: a UTF-16 name, a DICOM-style date and a name in a file name are all found."""
    (tmp_path / "a.bin").write_bytes(b"\0" + f"{ID['last_name']}".encode("utf-16-le") + b"\0")
    (tmp_path / "b.json").write_text('{"dob": "' + ID["birth_date"].replace("-", "") + '"}')
    (tmp_path / f"scan_{ID['patient_id']}.txt").write_text("nothing inside")
    with pytest.raises(AssertionError) as info:
        assert_no_identifiers([tmp_path])
    text = str(info.value)
    assert "utf-16-le" in text and "19370519" in text and "(name)" in text


def test_export_outputs_carry_no_identifiers(inputs, tmp_path, capsys):
    """Maps, NIfTI, DICOM (de-identified source, PM, SEG, SC), PNG, GIF, HTML, CSV and JSON of the export."""
    from tests.export.test_export import save_model_dir

    store = tmp_path / "cohort.zarr"
    assert main(["--no-progress", "ingest", str(inputs), "-o", str(store), "--workers", "0"]) == 0
    model = save_model_dir(tmp_path / "model", size=32)
    out = tmp_path / "exports"
    texts: dict[str, str] = {}
    code = main(["--no-progress", "-v", "export", str(store), "--model", str(model), "-o", str(out),
                 "--stride", "32", "--source-root", str(inputs.parent)])
    texts["store stdout"], texts["store stderr"] = capsys.readouterr()
    assert code == 0, texts["store stderr"]
    code = main(["--no-progress", "-v", "export", str(inputs / "b.dcm"), "--model", str(model), "-o",
                 str(tmp_path / "one"), "--stride", "32"])
    texts["file stdout"], texts["file stderr"] = capsys.readouterr()
    assert code == 0, texts["file stderr"]
    # the DICOM source went the Parametric Map way (its de-identified copy is among the outputs)
    assert list((tmp_path / "one").glob("*/dicom/source-deid.dcm")) and list(out.glob("*/dicom/anomaly-seg.dcm"))
    n_files = assert_no_identifiers([out, tmp_path / "one"], IDENTIFIERS, texts=texts)
    assert n_files > 40


def test_names_in_file_names_stay_out_of_the_store_and_logs_by_default(tmp_path, capsys):
    """A file named after the patient, in a folder named after the patient id: by default only the
    manifest beside the store (which says so on its first line) maps volume ids to those paths."""
    from octpipe.io.writers.heyex_vol import write_heyex_vol
    from octpipe.manifest import load_manifest

    src = tmp_path / f"src_{ID['patient_id']}"
    ph = small_phantom(seed=12)
    name = f"{ID['last_name']}_{ID['first_name']}_{ID['birth_date'].replace('-', '')}.vol"
    write_heyex_vol(src / name, ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                    layers={"ILM": ph.ilm, "BM": ph.bm})
    store = tmp_path / "default.zarr"
    assert main(["--no-progress", "ingest", str(src), "-o", str(store), "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert_no_identifiers([store], IDENTIFIERS, texts={"stdout": out.replace(str(tmp_path), ""), "stderr": err})
    inside = [r for r in load_manifest(store / "manifest.csv") if r["volume_id"]]
    assert len(inside) == 1 and inside[0]["path"].startswith("file-") and inside[0]["path"].endswith(".vol")
    # the readable mapping: only beside the store, announced on its first line
    beside = tmp_path / "default-manifest.csv"
    assert beside.read_text().splitlines()[0].startswith("# octpipe ingest manifest: the only file that maps")
    rows = [r for r in load_manifest(beside) if r["volume_id"]]
    assert rows[0]["path"] == f"{src.name}/{name}" and rows[0]["volume_id"] == inside[0]["volume_id"]
    # an export of the store carries the hashed name, never the file name
    from tests.export.test_export import save_model_dir

    model = save_model_dir(tmp_path / "model", size=32)
    assert main(["--no-progress", "export", str(store), "--model", str(model), "-o", str(tmp_path / "exports"),
                 "--stride", "32", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert_no_identifiers([tmp_path / "exports"], IDENTIFIERS)
    # the same file gives the same hashed name on a rerun, which skips it and keeps the readable path
    assert main(["--no-progress", "ingest", str(src), "-o", str(store), "--workers", "0"]) == 0
    again = [r for r in load_manifest(store / "manifest.csv") if r["volume_id"]]
    assert again[0]["path"] == inside[0]["path"] and again[0]["status"] == "skipped"
    assert [r for r in load_manifest(beside) if r["volume_id"]][0]["path"] == rows[0]["path"]
    # --keep-paths records the relative path, name and all, as asked
    kept = tmp_path / "kept.zarr"
    assert main(["--no-progress", "ingest", str(src), "-o", str(kept), "--workers", "0", "--keep-paths"]) == 0
    assert find_identifiers([kept / "manifest.csv"], {"last_name": ID["last_name"]})
