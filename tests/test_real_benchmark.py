"""The real-data benchmark's own logic: the patient split, the image score tables, the pixel tables.

The benchmark itself (``benchmarks/real_benchmark.py``) trains for an hour; these tests check the
parts that decide what its numbers mean, on the real OCTDL file names and on made-up scores.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from octpipe.testing.realdata import shared_data

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_benchmark", REPO / "benchmarks" / "real_benchmark.py")
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)
DATA = shared_data()


def test_octdl_patient_ids_come_from_the_file_name():
    assert rb.octdl_patient(Path("train/NO/no_1153297_2.jpg")) == "1153297"
    assert rb.octdl_patient(Path("val/AMD/amd_6611243_1.JPG")) == "6611243"
    with pytest.raises(ValueError, match="not an OCTDL file name"):
        rb.octdl_patient(Path("Image 1.tif"))


@pytest.mark.skipif(DATA is None, reason="../shared/data not available")
def test_the_split_keeps_every_val_patient_and_image_out_of_training_and_calibration():
    octdl = DATA / rb.OCTDL
    split = rb.split_octdl(octdl)
    assert split == rb.split_octdl(octdl)  # seeded
    train, calib = set(split["train"]), set(split["calib"])
    assert len(calib) == rb.CALIB_PATIENTS and not train & calib
    val_files = list((octdl / "val").rglob("*.jpg"))
    val_ids = {rb.octdl_patient(p) for p in val_files}
    val_digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in val_files}
    used = [f for part in ("train", "calib") for fs in split[part].values() for f in fs]
    assert not (train | calib) & val_ids
    assert not {hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in used} & val_digests
    # the same eye filed under two ids: train/NO/no_5959811_* are byte-identical to val/NO/no_9663705_*
    assert "5959811" in split["excluded"]
    n_files = len(list((octdl / "train" / "NO").glob("*.jpg")))
    assert len(used) + sum(len(v) for v in split["excluded"].values()) == n_files


def _rows(scores_by_class: dict[str, list[float]]) -> tuple[list[dict], dict[str, str]]:
    rows, classes = [], {}
    for cls, values in scores_by_class.items():
        for i, v in enumerate(values):
            vid = f"{cls}{i}"
            classes[vid] = cls
            image = {m: (v if m == "f-AnoGAN" else -v) for m in rb.METHODS + rb.VARIANTS}
            rows.append({"volume_id": vid, "image": image})
    return rows, classes


def test_image_tables_compare_normal_with_each_disease_and_all():
    rows, classes = _rows({"NO": [0.1, 0.2, 0.3], "AMD": [0.5, 0.6], "DME": [0.25, 0.9], "RAO": [0.8]})
    t = rb.image_tables(rows, classes, "NO")
    assert list(t["tables"]) == ["all", "AMD", "DME"]  # one RAO image: no ROC curve of its own
    assert t["n_positive"] == {"all": 5, "AMD": 2, "DME": 2} and t["n_normal"] == 3
    assert t["tables"]["AMD"]["f-AnoGAN"]["auc"] == pytest.approx(1.0)
    assert t["tables"]["DME"]["f-AnoGAN"]["auc"] == pytest.approx(5 / 6)
    assert t["tables"]["all"]["f-AnoGAN"]["auc"] == pytest.approx(14 / 15)
    # a method scored in the wrong direction reads below 0.5, and its inversion is recorded
    assert t["tables"]["AMD"]["AE"]["auc"] == pytest.approx(0.0)
    assert t["tables"]["AMD"]["AE"]["auc_inverted"] == pytest.approx(1.0)


def test_thickness_irregularity():
    flat = np.stack([np.full((1, 50), 100.0), np.full((1, 50), 200.0)])
    assert rb.thickness_irregularity(flat) == pytest.approx(0.0)
    bumpy = flat.copy()
    bumpy[1, 0, 20:30] = 300.0
    bumpy[0, 0, :5] = np.nan
    assert rb.thickness_irregularity(bumpy) > 0.3
    assert np.isnan(rb.thickness_irregularity(np.full((2, 1, 4), np.nan)))


def test_pixel_tables_per_lesion_class_and_vitreous_classes_left_out():
    rng = np.random.default_rng(0)
    mask = np.zeros(4000, np.int16)
    mask[:300] = 1  # intraretinal cyst
    mask[300:600] = 4  # drusen
    mask[600:900] = 8  # vitreous detachment: neither positive nor negative
    perfect = (mask > 0).astype(np.float32) + rng.random(4000).astype(np.float32) * 0.1
    perfect[600:900] = 5.0  # would ruin the AUC if vitreous pixels counted as normal
    maps = {m: perfect for m in rb.PIXEL_METHODS}
    maps["darkness"] = rng.random(4000).astype(np.float32)
    row = {"pixels": {"mask": mask, **maps}, "lesion_pixels_source": 600}
    t = rb.pixel_tables([row, row])
    assert set(t["tables"]) == {"all lesions", "intraretinal_cyst", "retinal_drusen"}
    assert t["tables"]["all lesions"]["n_pixels"] == 1200
    assert t["tables"]["all lesions"]["f-AnoGAN"]["auc"] == pytest.approx(1.0)
    assert t["tables"]["retinal_drusen"]["AE"]["auc"] == pytest.approx(1.0)
    assert abs(t["tables"]["all lesions"]["darkness"]["auc"] - 0.5) < 0.05


def test_reconstruction_scores_match_the_baselines_own_scores():
    from octpipe.models.baselines import AdversarialAutoencoder, Autoencoder, BaselineConfig

    x = np.random.default_rng(1).uniform(-1, 1, (24, 32, 32)).astype(np.float32)
    cfg = BaselineConfig.tiny(iterations=2, latent_dim=16)
    for cls in (Autoencoder, AdversarialAutoencoder):
        model = cls.train(x, cfg)
        a, residual = rb._reconstruction_scores(model, x, batch_size=10, bf16=False)
        ref = model.score(x)
        np.testing.assert_allclose(a, ref["A" if "A" in ref else "A_R"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(residual, model.residual(x), atol=1e-5)
        assert residual.shape == x.shape
