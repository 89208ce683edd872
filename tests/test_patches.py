import numpy as np
import pytest

from octpipe.patches import extract_patches, grid_starts, patch_grid, patch_labels, random_starts, volume_patch_index


def test_grid_is_flush_with_the_border():
    assert grid_starts(128, 64, 32).tolist() == [0, 32, 64]
    assert grid_starts(256, 64, 32).tolist() == [0, 32, 64, 96, 128, 160, 192]
    assert grid_starts(100, 64, 32).tolist() == [0, 32, 36]
    assert grid_starts(64, 64, 32).tolist() == [0]
    with pytest.raises(ValueError, match="larger than the image"):
        grid_starts(50, 64, 32)
    with pytest.raises(ValueError, match="stride"):
        grid_starts(100, 64, 0)


def test_grid_covers_every_pixel_in_nd():
    shape, patch, stride = (7, 100, 90), (3, 64, 64), (2, 32, 32)
    starts = patch_grid(shape, patch, stride)
    covered = np.zeros(shape, bool)
    for s in starts:
        covered[tuple(slice(a, a + p) for a, p in zip(s, patch, strict=True))] = True
    assert covered.all()
    assert (starts + np.array(patch) <= np.array(shape)).all()


def test_random_starts_stay_inside_and_are_seeded():
    a = random_starts(np.random.default_rng(1), (128, 256), (64, 64), 500)
    b = random_starts(np.random.default_rng(1), (128, 256), (64, 64), 500)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a[:, 0].max() <= 64 and a[:, 1].max() <= 192
    assert len(np.unique(a[:, 1])) > 100  # spread out


def test_extract_patches_keeps_locations():
    vol = np.arange(2 * 6 * 8).reshape(2, 6, 8)
    idx = np.array([[0, 0, 0], [1, 2, 5]])
    out = extract_patches(vol, idx, (3, 3))
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[1], vol[1, 2:5, 5:8])
    with pytest.raises(ValueError, match="outside"):
        extract_patches(vol, np.array([[0, 4, 0]]), (3, 3))


def test_labels_any_lesion_pixel():
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[1, 3, 3] = 2
    assert patch_labels(masks, 3, -1).tolist() == [0, 1, 0]
    assert patch_labels(None, 2, 0).tolist() == [0, 0]
    assert patch_labels(None, 2, -1).tolist() == [-1, -1]


def test_volume_patch_index_per_split():
    rng = np.random.default_rng(0)
    train = volume_patch_index("train", (3, 128, 256), patch=64, stride=32, k=10, rng=rng)
    assert train.shape == (30, 3) and set(train[:, 0]) == {0, 1, 2}
    test = volume_patch_index("test", (3, 128, 256), patch=64, stride=32, k=10, rng=rng)
    assert test.shape == (3 * 3 * 7, 3)
    with pytest.raises(ValueError):
        volume_patch_index("val", (3, 128, 256), patch=64, stride=32, k=10, rng=rng)


# --- patch datasets in the store ------------------------------------------------------

import zarr  # noqa: E402

from octpipe.errors import OctpipeError  # noqa: E402
from octpipe.patches import write_patch_split  # noqa: E402
from octpipe.pipeline import ingest  # noqa: E402
from octpipe.store import open_patch_split, read_volume_attrs, volume_ids  # noqa: E402
from octpipe.testing.phantom_files import write_phantom_files  # noqa: E402
from tests.conftest import small_phantom  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two healthy and one diseased small phantom (with truth sidecars), ingested."""
    src = tmp_path_factory.mktemp("src")
    for seed, lesions in ((1, ""), (2, ""), (3, "srf,irf:3")):
        ph = small_phantom(seed, lesions, shape=(3, 496, 256), spacing_mm=(0.24, 0.00387, 0.0113))
        ph = type(ph)(**{**ph.__dict__, "name": f"p{seed}"})
        write_phantom_files(ph, src, formats=["vol"])
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    result = ingest([src], path, workers=0)
    assert result.counts == {"ok": 3, "skipped": 6, "failed": 0}, result.rows  # 6 truth sidecars
    return path


def test_ingest_stores_the_paper_preprocessing(store):
    labels = sorted(read_volume_attrs(store, v)["label"] for v in volume_ids(store))
    assert labels == [0, 0, 1]
    vid = volume_ids(store)[0]
    g = zarr.open_group(str(store / "volumes" / vid), mode="r")
    assert g["image"].shape == (3, 496, 128)  # 256 columns halved
    assert g["flat"].shape == (3, 128, 128)  # 495 µm area at 3.87 µm
    assert g["flatmap"].shape == (2, 3, 128) and g["layers"].shape == (2, 3, 128)
    assert g["mask"].shape == (3, 496, 128)
    attrs = dict(g.attrs)
    assert attrs["column_factor"] == 2 and attrs["flatten"] == {"height": 128, "bm_row": 112}
    assert attrs["spacing_mm"][2] == pytest.approx(0.0226)


def test_train_and_test_splits(store):
    train = write_patch_split(store, "train", k=8, seed=3, workers=0, overwrite=True)
    assert train.n_volumes == 2 and train.n_patches == 2 * 3 * 8  # healthy volumes only
    assert train.label_counts == {-1: 0, 0: 48, 1: 0}
    test = write_patch_split(store, "test", stride=32, workers=0, overwrite=True)
    # grid over the 128 x 128 flattened area: 3 x 3 positions per B-scan
    assert test.n_volumes == 3 and test.n_patches == 3 * 3 * 9
    g = zarr.open_group(str(store / "patches" / "test"), mode="r")
    assert g["x"].dtype == np.float16 and g["x"].shape == (81, 64, 64)
    assert g["index"].shape == (81, 4) and g["mask"].shape == (81, 64, 64)
    label = g["label"][...]
    assert label.sum() > 0 and (label == 0).sum() > 0
    # label 1 exactly where the patch's mask has a lesion pixel
    np.testing.assert_array_equal(label, (g["mask"][...].reshape(81, -1) > 0).any(1))
    # the patch is the flattened image at its index
    vol_number, z, r, c = g["index"][40]
    vid = g.attrs["volumes"][vol_number]
    flat = zarr.open_group(str(store / "volumes" / vid), mode="r")["flat"][z, r:r + 64, c:c + 64]
    np.testing.assert_array_equal(g["x"][40], flat.astype(np.float16))


def test_patches_are_reproducible_and_dask_equals_serial(store):
    a = write_patch_split(store, "train", k=8, seed=5, workers=0, overwrite=True)
    xa = zarr.open_group(str(a.path), mode="r")["x"][...]
    b = write_patch_split(store, "train", k=8, seed=5, workers=2, overwrite=True)
    gb = zarr.open_group(str(b.path), mode="r")
    np.testing.assert_array_equal(xa, gb["x"][...])
    c = write_patch_split(store, "train", k=8, seed=6, workers=0, overwrite=True)
    assert not np.array_equal(xa, zarr.open_group(str(c.path), mode="r")["x"][...])


def test_patch_errors(store, tmp_path):
    write_patch_split(store, "test", workers=0, overwrite=True)  # whatever ran before (tests run in any order)
    with pytest.raises(OctpipeError, match="exists"):
        write_patch_split(store, "test", workers=0)
    with pytest.raises(OctpipeError, match="larger than the flattened area"):
        write_patch_split(store, "test", patch=256, workers=0, overwrite=True)
    with pytest.raises(OctpipeError, match="split must be"):
        write_patch_split(store, "val", workers=0)
    with pytest.raises(OctpipeError, match="no octpipe store"):
        write_patch_split(tmp_path / "none.zarr", "test", workers=0)
    with pytest.raises(OctpipeError, match="k must be >= 1"):
        write_patch_split(store, "train", k=0, workers=0, name="train-k0")
    assert not (store / "patches" / "train-k0").exists()


def test_the_patch_stream_reads_every_patch(store):
    """The one patch stream (what training reads): random access, a whole epoch, two processes."""
    from octpipe.models.data import BatchStream, PatchSource
    from octpipe.models.fanogan.runtime import Dist

    write_patch_split(store, "test", workers=0, overwrite=True)
    source = PatchSource(store, "test")
    x = source.read(np.array([5]))
    assert x.shape == (1, 64, 64) and x.dtype == np.float32 and source.index[5].shape == (4,)
    stored = open_patch_split(store, "test")
    np.testing.assert_array_equal(x[0], stored["x"][5].astype(np.float32))
    np.testing.assert_array_equal(source.index, stored["index"][...])
    # two processes (ranks) take disjoint halves of each global batch: one epoch sees every patch
    # once, but the last incomplete global batch
    batch = 4
    ranks = [BatchStream(source, np.arange(source.n), batch_size=batch, d=Dist(r, 2), seed=1, stream=1,
                         hflip=False, window=2) for r in range(2)]
    order, _ = ranks[0]._epoch_order(0)
    seen = []
    for _ in range(source.n // (2 * batch)):
        for r in ranks:
            seen.append(r.next()[:, 0])
    seen = np.concatenate(seen)
    assert len(seen) == source.n - source.n % (2 * batch) and all(r.state()["epoch"] == 0 for r in ranks)
    np.testing.assert_array_equal(seen, source.read(order[:len(seen)]))
    assert sorted(order.tolist()) == list(range(source.n))


def test_patches_command(store, capsys):
    from octpipe.cli import main

    assert main(["patches", str(store), "--split", "test", "--workers", "0", "--overwrite"]) == 0
    assert "patches test: 81 patches from 3 volumes" in capsys.readouterr().out
    assert main(["patches", str(store), "--split", "nope"]) == 2
    assert main(["patches", str(store), "--split", "train", "--k", "0"]) == 2  # a usage error, one line


def test_train_split_is_stored_in_random_order_across_volumes(store):
    """The train split is one seeded permutation of the volume-order split (same patches, rows)."""
    ordered = write_patch_split(store, "train", name="train-ordered", k=8, seed=5, workers=0, shuffle=False,
                                overwrite=True)
    shuffled = write_patch_split(store, "train", k=8, seed=5, workers=0, overwrite=True)
    go = zarr.open_group(str(ordered.path), mode="r")
    gs = zarr.open_group(str(shuffled.path), mode="r")
    assert gs.attrs["order"] == "random" and go.attrs["order"] == "volume"
    io, is_ = go["index"][...], gs["index"][...]
    assert (np.diff(io[:, 0]) >= 0).all()  # old layout: one volume after another
    assert not (np.diff(is_[:, 0]) >= 0).all()  # new: volumes interleaved
    # same rows, permuted together: every (index, patch, label) triple is kept; random starts
    # are drawn with replacement, so one position can occur twice (the store's salt varies)
    rows_o: dict[tuple, list[int]] = {}
    for i, r in enumerate(io.tolist()):
        rows_o.setdefault(tuple(r), []).append(i)
    perm = np.array([rows_o[tuple(r)].pop(0) for r in is_.tolist()])
    assert sorted(perm.tolist()) == list(range(len(io)))
    np.testing.assert_array_equal(gs["x"][...], go["x"][...][perm])
    np.testing.assert_array_equal(gs["label"][...], go["label"][...][perm])
    # reproducible, and bounded-memory blocks give the same permutation as one block
    from octpipe.patches import shuffle_rows

    small = shuffle_rows(go, store / ".staging" / "blocks-test", seed=5, block_bytes=3 * 64 * 64 * 2)
    np.testing.assert_array_equal(small["x"][...], gs["x"][...])
    np.testing.assert_array_equal(small["index"][...], is_)


def test_named_split_for_held_out_grids(store):
    vids = volume_ids(store)
    res = write_patch_split(store, "test", name="calib", volume_ids=vids[:1], workers=0, overwrite=True)
    g = zarr.open_group(str(store / "patches" / "calib"), mode="r")
    assert res.path.name == "calib" and g.attrs["split"] == "calib" and g.attrs["sampling"] == "test"
    assert g.attrs["volumes"] == vids[:1] and res.n_patches == 3 * 9
    assert g.attrs["order"] == "volume"  # grids keep volume order for export/evaluation
    with pytest.raises(OctpipeError, match="split name"):
        write_patch_split(store, "test", name="../x", workers=0)


def test_stores_mixing_annotated_and_unannotated_volumes_cut_in_any_order(store, tmp_path):
    """The first volume (in id order) without a mask, a later one with: masks of zeros, no error."""
    import shutil

    vids = volume_ids(store)
    for first_without in (True, False):
        copy = tmp_path / f"mixed-{first_without}.zarr"
        shutil.copytree(store, copy)
        shutil.rmtree(copy / "patches", ignore_errors=True)
        target = vids[0] if first_without else vids[-1]
        shutil.rmtree(copy / "volumes" / target / "mask")
        res = write_patch_split(copy, "test", stride=32, workers=0, chunk=4)  # small chunks: flushed rows too
        g = zarr.open_group(str(res.path), mode="r")
        assert g["mask"].shape == g["x"].shape
        number = g.attrs["volumes"].index(target)
        rows = g["index"][:, 0] == number
        assert rows.sum() == 27 and not g["mask"][...][rows].any()
