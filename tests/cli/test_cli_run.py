"""``octpipe run``: declarative runs of named steps, checked before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from octpipe.cli import main

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "fanogan-phantom"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_a_run_file_runs_its_steps_in_order_and_a_rerun_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = _write(tmp_path / "tiny.yaml", f"""
run: tiny
description: one phantom to its anomaly maps
steps:
  - phantom: {{out: ph, n: 1, shape: "3,248,256", formats: vol, healthy-fraction: 0, overwrite: true}}
  - ingest: {{sources: [ph], out: s.zarr, workers: 0}}
  - patches: {{store: s.zarr, split: test, overwrite: true}}
  - export: {{source: s.zarr, model: "{BUNDLED}", out: ex, stride: 64, device: cpu}}
""")
    code, out, err = _run(capsys, "run", str(run))
    assert code == 0, err
    assert "[4/4] octpipe export s.zarr" in out and "run tiny: 4 steps done" in out
    assert (tmp_path / "s.zarr" / "patches" / "test" / "zarr.json").is_file()
    assert len(list((tmp_path / "ex").glob("*/anomaly.nii.gz"))) == 1
    code, out, err = _run(capsys, "run", str(run))  # again: ingest and export skip what is done
    assert code == 0 and "1 skipped" in out, (out, err)


@pytest.mark.parametrize(("steps", "needle"), [
    ("  - ingest: {sources: [ph], out: s.zarr, wrokers: 0}", "unknown key(s) wrokers"),
    ("  - phantom: {out: ph, n: 0}", "step 1 (phantom)"),
    ("  - phantom: {out: ph, n: [1, 2]}", "n takes one value"),
    ("  - phantom: {out: ph, overwrite: maybe}", "overwrite must be true or false"),
    ("  - demo: {out: d}", "'demo' is not a step"),
    ("  - ingest: {sources: {a: 1}, out: s.zarr}", "plain value or a list"),
])
def test_every_step_is_checked_before_any_runs(steps, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = _write(tmp_path / "bad.yaml", "run: bad\nsteps:\n  - phantom: {out: first, n: 1, shape: '2,248,128'}\n"
                 + steps.replace("step 1", "step 2") + "\n")
    code, _, err = _run(capsys, "run", str(run))
    assert code == 2
    assert needle.replace("step 1", "step 2") in " ".join(err)
    assert not (tmp_path / "first").exists()  # the good first step did not run either


def test_the_run_stops_at_the_first_failing_step_with_its_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = _write(tmp_path / "r.yaml", """
run: stops
steps:
  - phantom: {out: ph, n: 1, shape: "2,248,128", formats: vol}
  - export: {source: ph/phantom-0000.vol, model: no-such-model, out: ex}
  - phantom: {out: never, n: 1}
""")
    code, _, err = _run(capsys, "run", str(run))
    assert code == 1
    assert err[-1] == "error: r.yaml: run stops stopped at step 2 (export), exit code 1"
    assert (tmp_path / "ph").is_dir() and not (tmp_path / "never").exists()


def test_files_that_are_not_run_files(tmp_path, capsys):
    for text, needle in (("[1, 2", "not valid YAML"), ("gan: {iterations: 3}", "not a run file"),
                         ("run: x\nsteps: []", "non-empty list"), ("run: x\nsteps: [a]\nextra: 1", "unknown key")):
        code, _, err = _run(capsys, "run", str(_write(tmp_path / "f.yaml", text)))
        assert code == 2 and needle in " ".join(err), (text, err)
    code, _, err = _run(capsys, "run", str(ROOT / "pipelines" / "fanogan.yaml"))  # a training config
    assert code == 2 and "octpipe train --config" in " ".join(err)
    code, _, err = _run(capsys, "run", str(tmp_path / "missing.yaml"))
    assert code == 1 and err == ["error: missing.yaml: no such run file"]


def test_the_bundled_run_files_check(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code, out, err = _run(capsys, "run", "pipelines/demo.yaml", "--dry-run")
    assert code == 0, err
    assert out.count("octpipe ") == 5 and "[5/5] octpipe export demo-run/store.zarr" in out
