import csv
import json
from pathlib import Path

from octpipe.cli import main
from octpipe.demo import run_demo
from tests.conftest import SMALL_SPACING


def test_demo_runs_every_stage_on_phantoms(tmp_path):
    lines = []
    summary = run_demo(tmp_path, n=2, seed=1, echo=lines.append, shape=(3, 248, 256), spacing_mm=SMALL_SPACING,
                       workers=0)
    assert summary["failures"] == []
    assert len(lines) == 6 and lines[0].startswith("[1/6] phantoms")
    with open(tmp_path / "readback.csv") as fh:
        rows = list(csv.DictReader(fh))
    # 2 phantoms x 4 formats, each read back by octpipe with the phantom's geometry
    assert len(rows) == 8 and all(r["ok"] == "1" for r in rows)
    assert {r["format"] for r in rows} == {"vol", "dicom", "nifti", "png"}
    assert all(r["shape"] == "3x248x256" for r in rows)
    truth = json.loads((tmp_path / "phantoms" / "phantom-0001_truth.json").read_text())
    assert truth["diseased"] is True
    assert len(summary["stages"]["figures"]) == 2
    # the ingest stage wrote one volume per phantom file, skipping the truth sidecars
    assert summary["stages"]["ingest"]["ok"] == 8 and summary["stages"]["ingest"]["failed"] == 0
    assert (tmp_path / "store.zarr" / "manifest.csv").exists()
    patches = summary["stages"]["patches"]
    assert patches["train"]["n"] > 0 and patches["test"]["labels"][1] > 0
    assert all((tmp_path / "figures" / f"phantom-000{k}.png").stat().st_size > 10_000 for k in range(2))
    # the bundled model mapped a healthy (.vol) and a diseased (DICOM) phantom, with reports and an index
    export = summary["stages"]["export"]
    assert {r["truth"] for r in export["ranked"]} == {"healthy", "fluid"}
    assert all(Path(r["report"]).is_file() for r in export["ranked"])
    assert (tmp_path / "export" / "index.html").is_file()
    dicom_volume = next(r for r in export["ranked"] if r["format"] == "dicom")["volume_id"]
    assert (tmp_path / "export" / dicom_volume / "dicom" / "anomaly-map-pm.dcm").is_file()
    # the demo is its run file: every one of its steps ran, each as a stage of the summary
    assert summary["run_file"].endswith("pipelines/demo.yaml")
    assert set(summary["stages"]) >= {"phantoms", "readback", "ingest", "patches", "figures", "export"}


def test_demo_command_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["demo", "-o", str(tmp_path / "x")]) == 1
    assert "exists" in capsys.readouterr().err


def test_demo_overwrite_never_removes_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("keep")
    assert main(["demo", "-o", str(mine), "--overwrite"]) == 1
    assert "not a folder octpipe demo wrote" in capsys.readouterr().err
    assert (mine / "chapter1.tex").read_text() == "keep"


def test_demo_help_names_the_export_stage(capsys):
    assert main(["demo", "--help"]) == 0
    assert "anomaly export" in capsys.readouterr().out


def test_the_demo_runs_the_steps_of_its_run_file(tmp_path):
    from octpipe.cli.run import check_steps, load_run_file
    from octpipe.demo import BUNDLED_MODEL, DEMO_RUN_FILE, demo_steps

    _, in_file = load_run_file(DEMO_RUN_FILE)
    steps = demo_steps(tmp_path, n=2, seed=3, shape=(3, 248, 256), workers=0)
    assert [c for c, _ in steps] == [c for c, _ in in_file]
    assert "demo-run" not in repr(steps)  # the run file's folder is the demo's output folder
    phantom = dict(steps)["phantom"]
    assert phantom["out"] == str(tmp_path / "phantoms") and phantom["n"] == 2 and phantom["shape"] == "3,248,256"
    export = dict(steps)["export"]
    assert export["model"] == str(BUNDLED_MODEL) and export["source"] == str(tmp_path / "store.zarr")
    assert all(o.get("workers") == 0 for c, o in steps if c in ("ingest", "patches", "export"))
    lines = check_steps(steps, DEMO_RUN_FILE.name)  # the same checks as octpipe run
    assert [argv[0] for argv in lines] == [c for c, _ in in_file]
