"""The store owns the prepared volume's layout: write_prepared / read_prepared, one volume id, old stores."""

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from octpipe.io import read_volume
from octpipe.pipeline import ingest
from octpipe.preprocess.prepare import PreparedVolume, PreprocessConfig, prepare_volume
from octpipe.privacy import volume_id
from octpipe.store import (
    open_store,
    read_prepared,
    read_volume_attrs,
    read_volume_group,
    store_salt,
    volume_ids,
    write_prepared,
)
from octpipe.testing.phantom_files import write_phantom_files
from tests.conftest import older_store_copy, small_phantom

#: The volume attributes ingest wrote when the store first held prepared volumes (commit c74db13),
#: before ``ome``, ``file_spacing_mm``, ``file_spacing_source``, ``images`` and ``images_reason``.
FIRST_KEYS = {"source", "sha256", "series", "format", "reader", "source_shape", "shape", "source_spacing_mm",
              "spacing_mm", "spacing_source", "laterality", "scan_pattern", "vendor", "bscan_order",
              "source_intensity", "label", "annotated", "column_factor", "flatten", "display_range", "qc",
              "preprocess", "octpipe_version", "status"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A phantom with lesions written as a .vol file with its mask sidecar."""
    src = tmp_path_factory.mktemp("store-src")
    ph = small_phantom(4, "srf", shape=(3, 248, 256))
    write_phantom_files(type(ph)(**{**ph.__dict__, "name": "Doe_John"}), src, formats=["vol"])
    (path,) = [p for p in src.iterdir() if p.suffix == ".vol"]
    return path


@pytest.fixture(scope="module")
def prepared(source):
    from octpipe.inputs import annotation_sidecar

    with np.load(annotation_sidecar(source)) as data:
        mask = data["lesion_mask"]
    return replace(prepare_volume(read_volume(source), mask=mask), source_path=source)


def _assert_same(a: PreparedVolume, b: PreparedVolume, *, skip=("info", "source_path")) -> None:
    for f in fields(PreparedVolume):
        if f.name in skip:
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert (x is None) == (y is None), f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def test_write_prepared_read_prepared_round_trip(prepared, tmp_path):
    store = tmp_path / "s.zarr"
    open_store(store)
    vol = replace(prepared, volume_id=volume_id("ab" * 32, 0, salt=store_salt(store)),
                  info={**prepared.info, "source": "file-123.vol", "label": 1}, notes=("a remark",))
    assert vol.mask is not None and vol.preprocess == json.loads(json.dumps(PreprocessConfig().to_dict()))
    assert write_prepared(store, vol)
    assert not write_prepared(store, vol)  # complete: kept
    back = read_prepared(store, vol.volume_id)
    _assert_same(vol, back)
    assert back.source_path is None  # in memory only
    assert back.info["source"] == "file-123.vol" and back.info["label"] == 1
    assert back.info["format"] == vol.info["format"] and back.info["sha256"] == vol.info["sha256"]
    # the on-disk keys are the layout's (unchanged), and the raw path is nowhere in the group
    attrs = read_volume_attrs(store, vol.volume_id)
    assert attrs["column_factor"] == vol.factor and attrs["flatten"] == {"height": vol.height, "bm_row": vol.bm_row}
    assert attrs["source_spacing_mm"] == list(vol.spacing_mm)
    assert attrs["spacing_mm"] == pytest.approx([*vol.spacing_mm[:2], vol.spacing_mm[2] * vol.factor])
    assert attrs["source_shape"] == list(vol.source_shape) and attrs["shape"] == list(vol.image.shape)
    assert attrs["preprocessing_notes"] == ["a remark"] and attrs["annotated"] is True
    assert "source_path" not in attrs
    text = "".join(p.read_text(errors="ignore") for p in Path(store).rglob("zarr.json"))
    assert str(prepared.source_path) not in text and "Doe_John" not in text


def test_write_prepared_needs_an_id_and_info_cannot_override_the_fields(prepared, tmp_path):
    store = tmp_path / "s.zarr"
    open_store(store)
    with pytest.raises(ValueError, match="volume_id"):
        write_prepared(store, replace(prepared, volume_id=""))
    vol = replace(prepared, volume_id="v0123456789abcdef",
                  info={"column_factor": 99, "laterality": "XX", "source_path": "/x/Doe_John.vol", "vendor": "y"})
    write_prepared(store, vol)
    attrs = read_volume_attrs(store, vol.volume_id)
    assert attrs["column_factor"] == vol.factor and attrs["laterality"] == vol.laterality
    assert "source_path" not in attrs and attrs["vendor"] == "y"


def test_read_prepared_refuses_a_volume_without_preprocessing(tmp_path):
    from octpipe.errors import OctpipeError
    from octpipe.store import write_volume

    open_store(tmp_path / "s.zarr")
    write_volume(tmp_path / "s.zarr", "v1", {"image": np.zeros((2, 8, 8), np.float32)}, {"sha256": "x"})
    with pytest.raises(OctpipeError, match="ingest it with preprocessing"):
        read_prepared(tmp_path / "s.zarr", "v1")
    with pytest.raises(OctpipeError, match="no volume"):
        read_prepared(tmp_path / "s.zarr", "v2")


def test_one_volume_id_for_reader_file_export_and_store(source, tmp_path):
    """The reader, the file export and the store name a volume with the same function."""
    from octpipe.export.run import file_volume_input
    from octpipe.io._common import file_sha256

    sha = file_sha256(source)
    vol = read_volume(source)
    assert vol.volume_id == volume_id(sha, 0)
    assert file_volume_input(source).volume_id == volume_id(sha, 0)
    store = tmp_path / "s.zarr"
    ingest([source.parent], store, workers=0)
    (vid,) = volume_ids(store)
    assert vid == volume_id(sha, 0, salt=store_salt(store)) != volume_id(sha, 0)
    assert read_prepared(store, vid).volume_id == vid


def _make_first_layout(store: Path, tmp_path: Path) -> Path:
    """A copy of ``store`` with only the attributes the first preprocessing stores had."""

    def first(attrs: dict) -> dict:
        attrs = {k: v for k, v in attrs.items() if k in FIRST_KEYS}
        attrs["preprocess"]["flatten"].pop("axial_spacing_um")  # added to FlattenConfig later
        return attrs

    return older_store_copy(store, tmp_path / "old.zarr", first)


def test_stores_of_the_first_layout_still_read_as_prepared_volumes(source, tmp_path):
    store = tmp_path / "s.zarr"
    ingest([source.parent], store, workers=0)
    old = _make_first_layout(store, tmp_path)
    (vid,) = volume_ids(old)
    attrs = read_volume_attrs(old, vid)
    assert set(attrs) == FIRST_KEYS
    new, back = read_prepared(store, vid), read_prepared(old, vid)
    _assert_same(new, back, skip=("info", "source_path", "preprocess"))
    assert back.mask is not None and back.info["label"] == 1 and back.info["format"] == "heyex-vol"
    assert "images" not in back.info and "ome" not in back.info
    # the older preprocessing record still resolves (missing settings take the defaults)
    assert PreprocessConfig.from_dict(back.preprocess) == PreprocessConfig.from_dict(new.preprocess)
    arrays, _ = read_volume_group(old, vid)
    np.testing.assert_array_equal(arrays["flat"], back.flat)
