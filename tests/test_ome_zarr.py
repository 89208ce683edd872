"""Stored volumes are OME-Zarr (NGFF 0.5) images; stores written before that still read."""

import json

import numpy as np
import pytest
import zarr

from octpipe.io.writers.heyex_vol import write_heyex_vol
from octpipe.ome import AXES, display_scale, multiscales_metadata
from octpipe.pipeline import ingest
from octpipe.store import complete_volumes, read_volume_attrs, read_volume_group, volume_ids, write_volume
from octpipe.testing.phantom_files import write_phantom_files
from tests.conftest import older_store_copy, small_phantom

NO_VALIDATOR = "ome-zarr-models (the NGFF validator, a dev dependency) is not installed: pip install -e . --group dev"


def _image_model():
    pytest.importorskip("ome_zarr_models", reason=NO_VALIDATOR)
    from ome_zarr_models.v05 import Image

    return Image


def _validate(group_path):
    """Validate a volume group with ome-zarr-models, twice: the way readers do (only the
    arrays the metadata names) and on the whole group, extra arrays included."""
    image_model = _image_model()
    from pydantic_zarr.v3 import GroupSpec

    group = zarr.open_group(str(group_path), mode="r")
    declared = image_model.from_zarr(group)
    whole = image_model.model_validate(GroupSpec.from_zarr(group).model_dump())
    return declared, whole


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One healthy phantom (.vol with vendor layers) and one with lesions (mask sidecar), ingested."""
    base = tmp_path_factory.mktemp("ome")
    src = base / "src"
    src.mkdir()
    ph = small_phantom(1, shape=(3, 248, 256))
    write_heyex_vol(src / "a.vol", ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality,
                    layers={"ILM": ph.ilm, "BM": ph.bm})
    sick = small_phantom(2, "srf", shape=(3, 248, 256))
    write_phantom_files(type(sick)(**{**sick.__dict__, "name": "sick"}), src, formats=["vol"])
    path = base / "s.zarr"
    result = ingest([src], path, workers=0)
    assert result.counts["ok"] == 2 and result.counts["failed"] == 0, result.rows
    return path


def _with_mask(store):
    return next(v for v in volume_ids(store) if "mask" in read_volume_group(store, v)[0])


def test_every_stored_volume_validates_as_an_ngff_05_image(store):
    for vid in volume_ids(store):
        declared, whole = _validate(store / "volumes" / vid)
        assert declared.ome_zarr_version == "0.5"
        assert [d.path for d in declared.datasets[0]] == ["image"]
        assert set(declared.members) == {"image"}  # a reader looks only at what the metadata names
    # the other arrays of a volume sit beside the image and the validator accepts them
    _, whole = _validate(store / "volumes" / _with_mask(store))
    assert set(whole.members) == {"image", "layers", "flat", "flatmap", "mask"}


def test_scale_is_the_stored_spacing_in_mm_and_zarr_opens_the_declared_array(store):
    for vid in volume_ids(store):
        attrs = read_volume_attrs(store, vid)
        (ms,) = attrs["ome"]["multiscales"]
        assert attrs["ome"]["version"] == "0.5" and ms["name"] == vid
        assert ms["axes"] == [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")]
        (ds,) = ms["datasets"]
        assert ds["coordinateTransformations"] == [{"type": "scale", "scale": attrs["spacing_mm"]}]
        # spacing_mm is the stored image's: the source's with the columns downsampled
        dz, dy, dx = attrs["source_spacing_mm"]
        assert attrs["spacing_mm"] == pytest.approx([dz, dy, dx * attrs["column_factor"]])
        image = zarr.open_group(str(store / "volumes" / vid), mode="r")[ds["path"]]
        assert image.shape == tuple(attrs["shape"]) and image.ndim == len(ms["axes"])
        assert image.dtype == np.float32 and image.metadata.dimension_names == AXES


def test_ome_zarr_py_reads_the_volume_with_its_scale(store):
    pytest.importorskip("ome_zarr", reason="ome-zarr (ome-zarr-py, napari-ome-zarr's reading library) not installed")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    vid = volume_ids(store)[0]
    attrs = read_volume_attrs(store, vid)
    loc = parse_url(str(store / "volumes" / vid))
    assert loc is not None and loc.version == "0.5"
    (node,) = [n for n in Reader(loc)() if any(isinstance(s, Multiscales) for s in n.specs)]
    assert [tuple(d.shape) for d in node.data] == [tuple(attrs["shape"])]
    assert node.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": attrs["spacing_mm"]}]]


def test_metadata_is_written_before_the_rename(tmp_path, monkeypatch):
    import octpipe.edge as edge_mod

    (tmp_path / "volumes").mkdir()
    seen = []
    real_rename = edge_mod.os.rename

    def rename(src, dst):
        seen.append(json.loads((src / "zarr.json").read_text())["attributes"])
        real_rename(src, dst)

    monkeypatch.setattr(edge_mod.os, "rename", rename)
    image = np.zeros((2, 8, 8), np.float32)
    assert write_volume(tmp_path, "v1", {"image": image}, {"spacing_mm": [0.1, 0.004, 0.02]})
    assert seen[0]["status"] == "complete" and seen[0]["ome"]["multiscales"][0]["datasets"][0]["path"] == "image"


def test_every_extra_array_and_no_spacing(tmp_path):
    """All arrays a volume can hold validate; without spacing_mm the image is declared in pixels."""
    (tmp_path / "volumes").mkdir()
    z, y, x = 2, 16, 8
    arrays = {"image": np.zeros((z, y, x), np.float32), "layers": np.zeros((2, z, x), np.float32),
              "flat": np.zeros((z, 8, x), np.float32), "flatmap": np.ones((2, z, x), np.float32),
              "mask": np.zeros((z, y, x), np.uint8), "valid": np.ones((z, y, x), np.uint8)}
    write_volume(tmp_path, "with", arrays, {"spacing_mm": [0.0, 0.004, 0.02]})  # one position: z spacing 0
    write_volume(tmp_path, "without", {"image": arrays["image"]}, {"source": "benchmark"})
    _, whole = _validate(tmp_path / "volumes" / "with")
    assert set(whole.members) == set(arrays)
    scale = whole.ome_attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale
    assert list(scale) == [0.004, 0.004, 0.02]
    assert read_volume_attrs(tmp_path, "with")["spacing_mm"] == [0.0, 0.004, 0.02]  # the truth is kept
    declared, _ = _validate(tmp_path / "volumes" / "without")
    axes = declared.ome_attributes.multiscales[0].axes
    assert [a.unit for a in axes] == [None, None, None]
    # a group without a 3-D image gets no OME metadata
    write_volume(tmp_path, "no-image", {"layers": arrays["layers"]}, {})
    assert "ome" not in read_volume_attrs(tmp_path, "no-image")


def test_display_scale_and_metadata_arguments():
    assert display_scale([0.12, 0.00387, 0.0113]) == ([0.12, 0.00387, 0.0113], True)
    assert display_scale([float("nan"), 0.00387, 0.0113]) == ([0.00387, 0.00387, 0.0113], True)
    assert display_scale([0, 0, 0]) == ([1.0, 1.0, 1.0], False)
    with pytest.raises(ValueError, match="3 numbers"):
        display_scale([0.1, 0.2])
    with pytest.raises(ValueError, match="3 numbers"):
        display_scale("abc")
    with pytest.raises(ValueError, match="relative"):
        multiscales_metadata([0.1, 0.1, 0.1], dataset_path="/image")
    ome = multiscales_metadata([0.1, 0.004, 0.02], dataset_path="image")
    assert "name" not in ome["multiscales"][0]
    json.dumps(ome)


def _make_old_style(store, tmp_path):
    """A copy of ``store`` as octpipe wrote it before OME-Zarr: no ``ome``, no dimension_names."""
    return older_store_copy(store, tmp_path / "old.zarr",
                            lambda attrs: {k: v for k, v in attrs.items() if k != "ome"})


def test_stores_without_ome_attributes_still_read(store, tmp_path):
    from octpipe.patches import write_patch_split
    from octpipe.store import read_prepared

    old = _make_old_style(store, tmp_path)
    vids = volume_ids(old)
    assert vids == volume_ids(store) and complete_volumes(old) == complete_volumes(store)
    for vid in vids:
        attrs = read_volume_attrs(old, vid)
        assert "ome" not in attrs and attrs["status"] == "complete"
        arrays, _ = read_volume_group(old, vid)
        new_arrays, _ = read_volume_group(store, vid)
        assert set(arrays) == set(new_arrays)
        np.testing.assert_array_equal(arrays["image"], new_arrays["image"])
        assert read_prepared(old, vid).image.shape == tuple(attrs["shape"])
    # a rerun skips the old volumes as complete; a new input lands beside them with OME metadata
    src = store.parent / "src"
    assert ingest([src], old, workers=0).counts["ok"] == 0
    more = tmp_path / "more"
    more.mkdir()
    ph = small_phantom(3, shape=(3, 248, 256))
    write_heyex_vol(more / "c.vol", ph.data, spacing_mm=ph.spacing_mm, laterality=ph.laterality)
    assert ingest([more], old, workers=0).counts["ok"] == 1
    mixed = volume_ids(old)
    (new,) = set(mixed) - set(vids)
    assert "ome" in read_volume_attrs(old, new)
    split = write_patch_split(old, "test", stride=64, workers=0)
    assert split.n_volumes == 3 and split.n_patches > 0
    try:
        from ome_zarr_models.v05 import Image
    except ImportError:
        return
    # the validator, when present, says an old volume is not NGFF (that is all it lacks)
    with pytest.raises(ValueError, match="'ome' key"):
        Image.from_zarr(zarr.open_group(str(old / "volumes" / vids[0]), mode="r"))
    _validate(old / "volumes" / new)
