"""Anomaly maps and their export: window merging, geometry, en-face/ETDRS, files, reports, the CLI."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from octpipe.cli import main
from octpipe.export.anomaly import MapSettings, compute_anomaly
from octpipe.export.enface import ETDRS_SECTORS, FovealCentre, enface_projections, etdrs_labels, find_fovea
from octpipe.export.run import SUMMARY_NAME, export_store, export_volume, file_volume_input, write_index
from octpipe.heatmap import (
    WEIGHTINGS,
    WindowMerger,
    retina_mask,
    source_retina,
    to_source_geometry,
    window_index,
    window_weights,
)
from octpipe.models.fanogan.checkpoint import FAnoGANModel, build_networks
from octpipe.models.fanogan.config import FAnoGANConfig
from octpipe.models.fanogan.score import SCORE_NAMES, calibrate
from octpipe.testing.phantom_files import write_phantom_files
from tests.conftest import small_phantom
from tests.models.test_fanogan_train import TINY_YAML, make_patch_store

GEOMETRY = {"shape": (4, 496, 256), "spacing_mm": (0.24, 0.00387, 0.0113)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Flatten(nn.Module):
    def forward(self, x):
        return x.flatten(1)

    def features(self, x):
        return x.flatten(1)


class _Unflatten(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, z):
        return z.view(-1, 1, self.size, self.size)


def identity_model(size: int = 64) -> FAnoGANModel:
    """G(E(x)) = x exactly: a perfect reconstruction, so every residual is zero."""
    cfg = FAnoGANConfig.from_dict({"model": {"image_size": size, "dim": 8, "latent_dim": 16}})
    return FAnoGANModel(_Unflatten(size), _Flatten(), _Flatten(), cfg)


def untrained_model(size: int = 64, seed: int = 0) -> FAnoGANModel:
    torch.manual_seed(seed)
    cfg = FAnoGANConfig.from_dict({"model": {"image_size": size, "dim": 4, "latent_dim": 16}})
    g, d, e = build_networks(cfg)
    rng = np.random.default_rng(seed)
    cal = calibrate({k: rng.gamma(2.0, 0.05, 400) for k in SCORE_NAMES})
    return FAnoGANModel(g.eval(), d.eval(), e.eval(), cfg, calibration=cal)


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-src")
    ph = small_phantom(3, "srf,irf:2", **GEOMETRY)
    files = write_phantom_files(ph, root, formats=["vol"])
    return ph, files["vol"]


@pytest.fixture(scope="module")
def prepared(phantom_file):
    return file_volume_input(phantom_file[1])


# --------------------------------------------------------------------------------------------
# Windows and merging
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "stride"), [((2, 128, 128), 16), ((1, 100, 150), 24), ((1, 64, 64), 16)])
def test_windows_cover_every_pixel_and_end_flush_with_the_border(shape, stride):
    idx = window_index(shape, size=64, stride=stride)
    covered = np.zeros(shape, bool)
    for b, r, c in idx:
        covered[b, r:r + 64, c:c + 64] = True
    assert covered.all()
    assert idx[:, 1].max() == shape[1] - 64 and idx[:, 2].max() == shape[2] - 64
    assert np.all(np.diff(np.unique(idx[:, 2]))[:-1] == stride)


@pytest.mark.parametrize("mode", WEIGHTINGS)
def test_window_weights_are_positive_symmetric_with_peak_one(mode):
    w = window_weights(64, mode)
    assert w.shape == (64, 64) and w.min() > 0 and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)
    if mode != "constant":
        assert w[0, 0] < 0.05 * w[32, 32]


def test_merger_keeps_sum_and_weight_apart_and_divides_at_the_end():
    m = WindowMerger((1, 4, 8), 4, "hann")
    idx = np.array([[0, 0, 0], [0, 0, 4], [0, 0, 2]])
    m.add(idx, np.array([1.0, 3.0, 5.0]))
    w = window_weights(4, "hann")
    out = m.result()
    # column 3 is covered by window 0 (its column 3) and window 2 (its column 1)
    expected = (w[0, 3] * 1.0 + w[0, 1] * 5.0) / (w[0, 3] + w[0, 1])
    assert out[0, 0, 3] == pytest.approx(expected, rel=1e-6)
    assert m.wsum[0, 0, 3] == pytest.approx(w[0, 3] + w[0, 1], rel=1e-6)
    assert np.isnan(WindowMerger((1, 4, 8), 4).result()).all()  # nothing added: no value invented


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("stride", [16, 24])
def test_identity_model_gives_the_input_back_and_a_zero_map(prepared, weighting, stride):
    result = compute_anomaly(prepared, identity_model(),
                             MapSettings(stride=stride, weighting=weighting, precision="fp32"))
    np.testing.assert_allclose(result.reconstruction_flat, prepared.flat, atol=2e-6)
    assert np.all(result.residual == 0) and np.all(result.residual_flat == 0)
    assert np.all(result.window_scores["A"] == 0)
    assert result.residual.shape == tuple(prepared.source_shape)


def test_source_geometry_is_zero_outside_ilm_bm_and_follows_the_retina(prepared):
    ones = np.ones_like(prepared.flat)
    nz, ny, nx = prepared.source_shape
    layers_src, inside = source_retina(prepared.layers, factor=prepared.factor, n_axial=ny, n_ascans=nx)
    src = to_source_geometry(ones, prepared.flatmap, inside, bm_row=prepared.bm_row, factor=prepared.factor)
    assert src.shape == (nz, ny, nx)
    from octpipe.preprocess.resample import upsample_columns

    lay = upsample_columns(prepared.layers, prepared.factor, nx)
    np.testing.assert_array_equal(layers_src, lay)
    np.testing.assert_array_equal(inside, retina_mask(lay[0], lay[1], ny))
    assert np.all(src[~inside] == 0)
    # the flattened area covers the retina: inside ILM..BM the unflattened map is 1 (edges interpolated)
    interior = inside & np.roll(inside, 1, axis=1) & np.roll(inside, -1, axis=1)
    assert np.mean(src[interior] > 0.99) > 0.99


def test_lesion_shows_in_the_map_where_the_reconstruction_misses_it(phantom_file, prepared):
    """A model whose reconstruction is the healthy truth marks exactly the lesion."""
    ph, _ = phantom_file
    # the "healthy reconstruction": the same volume with the lesion pixels replaced by their healthy neighbours
    flat = prepared.flat
    model = identity_model()
    result_clean = compute_anomaly(prepared, model, MapSettings(precision="fp32"))
    bumped = flat.copy()
    b, r, c = 1, prepared.bm_row - 30, 60
    bumped[b, r:r + 8, c:c + 8] = -1.0  # a dark "cyst" the identity model would keep ...
    vol = type(prepared)(**{**prepared.__dict__, "flat": bumped})

    class Healthy(nn.Module):  # ... so reconstruct with the unbumped patch instead
        def forward(self, z):
            return z.view(-1, 1, 64, 64)

    lookup = {bumped_patch.tobytes(): clean for bumped_patch, clean in zip(
        _windows(bumped), _windows(flat), strict=True)}

    class HealthyEncoder(nn.Module):
        def forward(self, x):
            out = [torch.from_numpy(lookup.get(p.numpy().astype(np.float32).tobytes(), p.numpy())).flatten()
                   for p in x[:, 0].contiguous()]
            return torch.stack(out)

    m = FAnoGANModel(Healthy(), _Flatten(), HealthyEncoder(), model.config)
    res = compute_anomaly(vol, m, MapSettings(precision="fp32"))
    # every window covering the cyst misses it by the same amount, so the merged residual is exact
    np.testing.assert_allclose(res.residual_flat[b, r:r + 8, c:c + 8], np.abs(-1.0 - flat[b, r:r + 8, c:c + 8]),
                               atol=1e-6)
    assert res.residual_flat[b, r:r + 8, c:c + 8].mean() > 0.3
    outside = np.ones_like(bumped, bool)
    outside[b, r:r + 8, c:c + 8] = False
    assert np.nanmax(res.residual_flat[outside]) < 1e-6
    assert result_clean.summary["volume_score"] == 0 and res.summary["max_window_score"] > 0


def _windows(flat):
    from octpipe.patches import extract_patches

    idx = window_index(flat.shape, size=64, stride=16)
    return [p.astype(np.float32) for p in extract_patches(flat, idx, (64, 64))]


# --------------------------------------------------------------------------------------------
# En-face and ETDRS
# --------------------------------------------------------------------------------------------
def test_etdrs_nasal_side_flips_with_laterality_and_superior_with_bscan_order():
    spacing = (0.12, 0.004, 0.012)
    centre = FovealCentre(24.0, 255.5, "test")
    od = etdrs_labels((49, 512), spacing, centre, "OD", "inferior_first")
    os_ = etdrs_labels((49, 512), spacing, centre, "OS", "inferior_first")
    n_in = ETDRS_SECTORS.index("IN") + 1
    t_in = ETDRS_SECTORS.index("IT") + 1
    row = 24
    right = 255 + int(1.0 / 0.012)  # 1 mm to the right of the fovea
    assert od[row, right] == n_in and os_[row, right] == t_in
    s_in = ETDRS_SECTORS.index("IS") + 1
    up = 24 + int(1.0 / 0.12)  # higher B-scan index
    assert od[up, 255] == s_in
    flipped = etdrs_labels((49, 512), spacing, centre, "OD", "superior_first")
    assert flipped[up, 255] == ETDRS_SECTORS.index("II") + 1
    assert od[24, 255] == 1 and od[0, 0] == 0  # centre, and outside the 6 mm circle


def test_fovea_is_found_within_100_um_of_the_truth():
    ph = small_phantom(5, "", shape=(25, 496, 512), spacing_mm=(0.24, 0.00387, 0.0113))
    centre = find_fovea(ph.ilm, ph.bm, ph.spacing_mm)
    nz, _, nx = ph.data.shape
    true_b = (nz - 1) / 2 + ph.fovea_mm[0] / ph.spacing_mm[0]
    true_a = (nx - 1) / 2 + ph.fovea_mm[1] / ph.spacing_mm[2]
    assert centre.method == "thickness_minimum"
    assert abs(centre.ascan - true_a) * ph.spacing_mm[2] < 0.1
    assert abs(centre.bscan - true_b) * ph.spacing_mm[0] <= 0.24


def test_enface_projection_is_max_and_mean_inside_the_retina():
    m = np.zeros((2, 5, 3), np.float32)
    inside = np.zeros_like(m, bool)
    inside[:, 1:4] = True
    m[0, 2, 0] = 4.0
    m[0, 0, 0] = 100.0  # outside the retina: ignored
    mx, mean = enface_projections(m, inside)
    assert mx[0, 0] == 4.0 and mean[0, 0] == pytest.approx(4 / 3)
    inside[1, :, 2] = False
    assert np.isnan(enface_projections(m, inside)[0][1, 2])


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def test_export_volume_writes_maps_sidecar_pictures_report_and_summary(tmp_path, prepared):
    summary = export_volume(prepared, untrained_model(), tmp_path, settings=MapSettings(precision="fp32"))
    folder = tmp_path / prepared.volume_id
    nz, ny, nx = prepared.source_shape
    for name in ("anomaly.nii.gz", "source.nii.gz", "window-score.nii.gz"):
        img = nib.load(folder / name)
        assert img.shape == (nx, nz, ny)  # i lateral, j B-scan, k depth
    a, s = nib.load(folder / "anomaly.nii.gz"), nib.load(folder / "source.nii.gz")
    np.testing.assert_array_equal(a.affine, s.affine)
    np.testing.assert_allclose(np.abs(np.diag(a.affine))[:3], [0.0113, 0.24, 0.00387], rtol=1e-6)
    sidecar = json.loads((folder / "anomaly.json").read_text())
    assert sidecar["laterality"] == prepared.laterality and sidecar["bscan_order"] == "inferior_first"
    assert sidecar["spacing_mm"] == pytest.approx([0.24, 0.00387, 0.0113])
    assert sidecar["flattening"]["bm_row"] == prepared.bm_row and sidecar["windows"]["stride"] == 16
    assert sidecar["octpipe_version"] and sidecar["model"]["image_size"] == 64
    assert len(list((folder / "overlays").glob("bscan_*.png"))) == nz
    assert (folder / "anomaly.gif").stat().st_size > 0 and (folder / "enface.png").stat().st_size > 0
    with (folder / "windows.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["n_windows"] and {"A", "A_percentile", "retina_fraction"} <= set(rows[0])
    with (folder / "sectors.csv").open() as f:
        assert [r["sector"] for r in csv.DictReader(f)] == list(ETDRS_SECTORS)
    html = (folder / "report.html").read_text()
    assert "For research use only" in html and "data:image/png;base64," in html and "<script" not in html
    assert 0 <= summary["volume_percentile"] <= 100 and summary["calibrated"]
    assert json.loads((folder / SUMMARY_NAME).read_text())["volume_id"] == prepared.volume_id
    assert not list(tmp_path.glob(".staging-*"))


def test_failed_export_leaves_no_folder_that_looks_done(tmp_path, prepared, monkeypatch):
    import octpipe.export.volume as volume_export

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(volume_export, "write_enface_figure", boom)
    with pytest.raises(OSError):
        export_volume(prepared, untrained_model(), tmp_path, settings=MapSettings(precision="fp32"))
    assert not (tmp_path / prepared.volume_id).exists() and not list(tmp_path.iterdir())


def test_a_background_writer_that_fails_leaves_no_folder_that_looks_done(tmp_path, prepared, monkeypatch):
    """The NIfTI maps are written by a background thread; its error still stops the export."""
    import octpipe.export.volume as volume_export

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(volume_export, "_write_nifti", boom)
    with pytest.raises(OSError, match="disk full"):
        export_volume(prepared, untrained_model(), tmp_path, settings=MapSettings(precision="fp32"))
    assert not (tmp_path / prepared.volume_id).exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-run")
    store = make_patch_store(root)
    run = root / "run"
    assert main(["train", str(store), "-o", str(run), "--config", str(TINY_YAML), "--iterations", "10"]) == 0
    return store, run


def test_store_export_ranks_volumes_resumes_and_the_cli_reports_it(tmp_path, trained):
    store, run = trained
    out = tmp_path / "exp"
    code = main(["export", str(store), "--model", str(run), "-o", str(out), "--stride", "32", "--precision", "fp32"])
    assert code == 0
    with (out / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    scores = [float(r["volume_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    index_html = (out / "index.html").read_text()
    assert all(f'{r["volume_id"]}/report.html' in index_html for r in rows)
    stamp = {r["volume_id"]: (out / r["volume_id"] / SUMMARY_NAME).stat().st_mtime_ns for r in rows}
    again = export_store(store, run, out, settings=MapSettings(stride=32, precision="fp32"))
    assert again.done == [] and sorted(again.skipped) == sorted(stamp)
    assert all((out / v / SUMMARY_NAME).stat().st_mtime_ns == t for v, t in stamp.items())
    one = rows[0]["volume_id"]
    redo = export_store(store, run, out, volume_ids=[one], overwrite=True, settings=MapSettings(stride=32))
    assert redo.done == [one]
    assert main(["export", str(store), "--model", str(run), "-o", str(out), "--volume", "nope"]) == 1
    assert main(["export", str(store), "--model", str(run), "-o", str(out), "--weighting", "box"]) == 2


def test_model_that_does_not_fit_the_volume_is_a_clear_error(prepared):
    from octpipe.errors import OctpipeError

    big = untrained_model(size=256)
    with pytest.raises(OctpipeError, match="smaller than the model's 256x256 patches"):
        compute_anomaly(prepared, big)


def test_index_lists_every_exported_volume(tmp_path, prepared):
    export_volume(prepared, untrained_model(), tmp_path, settings=MapSettings(precision="fp32"), dicom=False)
    csv_path, html_path = write_index(tmp_path)
    assert prepared.volume_id in csv_path.read_text() and prepared.volume_id in html_path.read_text()


@pytest.mark.slow  # kept out of the default run for time (make test-all runs it)
def test_dask_store_export_equals_in_process_export(tmp_path, trained):
    store, run = trained
    settings = MapSettings(stride=32, precision="fp32")
    serial = export_store(store, run, tmp_path / "serial", settings=settings, workers=0)
    parallel = export_store(store, run, tmp_path / "dask", settings=settings, workers=2)
    assert sorted(parallel.done) == sorted(serial.done) and not parallel.failed
    for vid in serial.done:
        a = (tmp_path / "serial" / vid / "windows.csv").read_text()
        b = (tmp_path / "dask" / vid / "windows.csv").read_text()
        assert a == b


def save_model_dir(folder, size: int = 32, seed: int = 0):
    """An untrained model with a calibration, saved as a run folder (``model.pt``) that load_run reads."""
    from octpipe.models.fanogan.checkpoint import save_model

    save_model(untrained_model(size=size, seed=seed), folder / "model.pt")
    return folder


def test_a_second_export_into_the_same_folder_is_refused(tmp_path, trained):
    from octpipe.errors import OctpipeError
    from octpipe.export.run import _out_lock

    store, run = trained
    out = tmp_path / "exp"
    out.mkdir()
    (out / ".staging-abc-123").mkdir()  # left by a killed export
    with _out_lock(out):
        assert not (out / ".staging-abc-123").exists()
        with pytest.raises(OctpipeError, match="another octpipe export"):
            export_store(store, run, out)


def test_fovea_falls_back_to_the_scan_centre_when_no_pit_is_found():
    ilm = np.zeros((21, 201))
    zz, xx = np.meshgrid(np.arange(21), np.arange(201), indexing="ij")
    bm = 100.0 + 0.5 * xx  # thinnest at the left edge, no pit near the centre
    centre = find_fovea(ilm, bm, (0.12, 0.004, 0.012))
    assert centre.method == "scan_centre" and (centre.bscan, centre.ascan) == (10.0, 100.0)


def test_training_records_the_store_preprocessing_in_the_bundle(trained):
    from octpipe.models.fanogan.checkpoint import load_run
    from octpipe.preprocess.prepare import PreprocessConfig
    from octpipe.store import read_volume_attrs, volume_ids

    store, run = trained
    bundle = torch.load(run / "model.pt", weights_only=True)
    attrs = read_volume_attrs(store, volume_ids(store)[0])
    assert bundle["preprocess"]["config"] == attrs["preprocess"]
    assert bundle["preprocess"]["flatten"] == attrs["flatten"] and bundle["preprocess"]["source"] == "store"
    model = load_run(run)
    assert model.preprocess_source == "store" and model.preprocess_config() == PreprocessConfig()
