"""One preprocessing contract: the model bundle records its training store's preprocessing, export applies it.

- training writes ``bundle["preprocess"]`` from the store's volumes, and refuses a store whose
  volumes were preprocessed differently;
- ``export FILE`` prepares the file exactly with the bundle's settings;
- ``export STORE`` refuses a store preprocessed otherwise, unless ``--allow-preprocessing-mismatch``;
- an old bundle without the record loads with a warning and the defaults.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from octpipe.cli import main
from octpipe.errors import ConfigError
from octpipe.models.fanogan.checkpoint import (
    DEFAULT_PREPROCESS_SOURCE,
    load_run,
    preprocessing_differences,
    save_model,
    store_preprocessing,
)
from octpipe.preprocess.prepare import PreprocessConfig, prepare_volume
from tests.conftest import small_phantom

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fanogan-phantom"
GEOMETRY = {"shape": (3, 496, 256), "spacing_mm": (0.24, 0.00387, 0.0113)}
ROBUST = PreprocessConfig(normalize_percentiles=(0.5, 99.5), target_spacing_mm=0.0452)


def _vol_file(folder: Path, seed: int = 1, name: str | None = None) -> Path:
    from octpipe.io.writers.heyex_vol import write_heyex_vol

    ph = small_phantom(seed, "srf", **GEOMETRY)
    return write_heyex_vol(folder / f"{name or f'p{seed}'}.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OD")


def _model_dir(folder: Path, config: PreprocessConfig | None, size: int = 32) -> Path:
    """An untrained, calibrated model saved with (or without) a preprocessing record."""
    from tests.export.test_export import untrained_model

    model = untrained_model(size=size)
    if config is not None:
        model.preprocess = {"config": config.to_dict(), "flatten": None, "source": "store", "n_volumes": 3}
    save_model(model, folder / "model.pt")
    return folder


def _store(root: Path, config: PreprocessConfig | None = None, seeds=(1, 2)) -> Path:
    from octpipe.pipeline import ingest

    for seed in seeds:
        _vol_file(root / "src", seed)
    store = root / "s.zarr"
    ingest([root / "src"], store, workers=0, config=config, label=0)
    return store


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------
def test_bundled_model_records_the_default_preprocessing_of_its_training_store():
    model = load_run(BUNDLED)
    assert model.preprocess_source == "store"
    assert model.preprocess_config() == PreprocessConfig()  # make_data.sh: octpipe ingest without options
    assert model.preprocess["flatten"] == {"height": 128, "bm_row": 112}


def test_bundle_without_a_record_loads_with_a_warning_and_the_defaults(tmp_path, caplog):
    folder = _model_dir(tmp_path, None)
    assert "preprocess" not in torch.load(folder / "model.pt", weights_only=True)
    with caplog.at_level(logging.WARNING, logger="octpipe.models.fanogan.checkpoint"):
        model = load_run(folder)
    assert "records no preprocessing" in caplog.text
    assert model.preprocess is None and model.preprocess_config() == PreprocessConfig()
    assert model.preprocess_source == DEFAULT_PREPROCESS_SOURCE


def test_save_model_round_trips_the_record(tmp_path):
    model = load_run(_model_dir(tmp_path, ROBUST))
    assert model.preprocess_config() == ROBUST
    assert model.preprocess["config"]["normalize_percentiles"] == [0.5, 99.5]


def test_store_preprocessing_reads_the_volumes_and_refuses_a_mixed_store(tmp_path):
    from octpipe.models.fanogan.train import train_gan
    from octpipe.patches import write_patch_split
    from octpipe.pipeline import ingest
    from tests.models.test_fanogan_train import tiny_config

    store = _store(tmp_path, ROBUST, seeds=(1,))
    record = store_preprocessing(store)
    assert PreprocessConfig.from_dict(record["config"]) == ROBUST and record["n_volumes"] == 1
    assert record["flatten"] == {"height": 128, "bm_row": 112}
    _vol_file(tmp_path / "more", 2)
    ingest([tmp_path / "more"], store, workers=0, label=0)  # default preprocessing, same store
    with pytest.raises(ConfigError, match=r"preprocessed differently .*normalize_percentiles"):
        store_preprocessing(store)
    write_patch_split(store, "train", patch=32, k=4, seed=0, workers=0)
    with pytest.raises(ConfigError, match="preprocessed differently"):
        train_gan(store, tmp_path / "run", tiny_config(**{"gan.iterations": 1}))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_preprocessing_differences_name_each_setting():
    diff = preprocessing_differences(ROBUST.to_dict(), PreprocessConfig().to_dict())
    assert diff == ["normalize_percentiles [0.5, 99.5] vs None", "target_spacing_mm 0.0452 vs 0.0226"]
    other = replace(PreprocessConfig(), flatten=replace(PreprocessConfig().flatten, area_height_um=400.0))
    assert preprocessing_differences(other.to_dict(), None) == ["flatten.area_height_um 400 vs 495.4"]
    assert preprocessing_differences(json.loads(json.dumps(ROBUST.to_dict())), ROBUST.to_dict()) == []
    # a record written before flatten.axial_spacing_um existed: octpipe then kept each volume's own axial grid
    old = PreprocessConfig().to_dict()
    del old["flatten"]["axial_spacing_um"]
    assert preprocessing_differences(old, PreprocessConfig().to_dict()) == ["flatten.axial_spacing_um None vs 3.87"]


# --------------------------------------------------------------------------------------------
# export FILE applies the bundle's preprocessing
# --------------------------------------------------------------------------------------------
def test_export_file_prepares_the_input_exactly_with_the_bundles_preprocessing(tmp_path, monkeypatch):
    import octpipe.export.run as run
    from octpipe.io import read_volume

    src = _vol_file(tmp_path)
    model_dir = _model_dir(tmp_path / "model", ROBUST)
    seen = []
    monkeypatch.setattr(run, "export_volume", lambda vol, *a, **k: seen.append(vol) or {})
    assert main(["--no-progress", "export", str(src), "--model", str(model_dir), "-o", str(tmp_path / "x")]) == 0
    (vol,) = seen
    want = prepare_volume(read_volume(src), ROBUST)
    default = prepare_volume(read_volume(src), PreprocessConfig())
    assert vol.factor == want.factor == 4 and default.factor == 2
    np.testing.assert_array_equal(vol.flat, want.flat)
    np.testing.assert_array_equal(vol.image, want.image)
    assert vol.image.shape != default.image.shape
    want_default_cols = prepare_volume(read_volume(src), replace(ROBUST, normalize_percentiles=None))
    assert not np.array_equal(vol.image, want_default_cols.image)  # the robust percentiles were applied too
    assert PreprocessConfig.from_dict(vol.preprocess) == ROBUST


def test_export_file_sidecar_records_the_applied_preprocessing(tmp_path):
    src = _vol_file(tmp_path)
    out = tmp_path / "out"
    args = ["--workers", "0", "--stride", "32", "--precision", "fp32", "--device", "cpu"]
    assert main(["--no-progress", "export", str(src), "--model", str(_model_dir(tmp_path / "m", ROBUST)), "-o",
                 str(out), *args]) == 0
    (sidecar,) = [json.loads(p.read_text()) for p in out.glob("*/anomaly.json")]
    pre = sidecar["preprocessing"]
    assert PreprocessConfig.from_dict(pre["applied"]) == ROBUST == PreprocessConfig.from_dict(pre["model"])
    assert pre["model_source"] == "store" and pre["notes"] == []


# --------------------------------------------------------------------------------------------
# export STORE checks the store's preprocessing
# --------------------------------------------------------------------------------------------
def test_store_export_refuses_other_preprocessing_unless_allowed(tmp_path, capsys):
    store = _store(tmp_path, PreprocessConfig(normalize_percentiles=(0.5, 99.5)))
    out = tmp_path / "out"
    args = ["--workers", "0", "--stride", "32", "--precision", "fp32", "--device", "cpu"]
    code = main(["--no-progress", "export", str(store), "--model", str(BUNDLED), "-o", str(out), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: s.zarr: store preprocessing differs from the model's (2 of 2 volumes): "
                             "normalize_percentiles [0.5, 99.5] vs None;")
    assert "--allow-preprocessing-mismatch" in err[0] and not out.exists()

    code = main(["--no-progress", "export", str(store), "--model", str(BUNDLED), "-o", str(out), *args,
                 "--allow-preprocessing-mismatch"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: 2 volume(s) were preprocessed differently" in captured.err
    sidecars = [json.loads(p.read_text()) for p in out.glob("*/anomaly.json")]
    assert len(sidecars) == 2
    for sidecar in sidecars:
        (note,) = sidecar["preprocessing"]["notes"]
        assert "normalize_percentiles [0.5, 99.5] vs None" in note
        assert sidecar["preprocessing"]["applied"]["normalize_percentiles"] == [0.5, 99.5]


def test_store_export_with_the_models_preprocessing_is_not_refused(tmp_path, capsys):
    store = _store(tmp_path, ROBUST, seeds=(1,))
    out = tmp_path / "out"
    code = main(["--no-progress", "export", str(store), "--model", str(_model_dir(tmp_path / "m", ROBUST)), "-o",
                 str(out), "--workers", "0", "--stride", "32", "--precision", "fp32", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note:" not in captured.err and len(list(out.glob("*/summary.json"))) == 1
