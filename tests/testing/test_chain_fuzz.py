"""The whole chain on mutated real B-scans: a result or a one-line error, never a traceback, hang or blow-up.

The mutations and the harness are in :mod:`octpipe.testing.chain_fuzz`; the large run is
``benchmarks/chain_fuzz.py``. Here: the mutations really mutate (and never change their
input), the written files hold the mutated pixels, the harness really detects a
traceback, a hang, a crash and memory growth, and a fixed sample of cases (every
mutation kind, every command) runs clean. Real data from ``../shared/data``; the chain
tests skip without it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from octpipe.testing import chain_fuzz as cf
from tests.conftest import REAL_DATA

DATA = REAL_DATA.parent


@pytest.fixture(scope="module")
def sources() -> list[cf.ChainSource]:
    found = cf.chain_sources(DATA)
    if not REAL_DATA.is_dir() or not found:
        pytest.skip(f"real data folder {REAL_DATA} not present")
    return found


def _speckle(shape=(60, 80), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.gamma(2.0, 20.0, size=shape)
    img[25:40] += 120.0  # a bright band, so the image is not symmetric
    return np.clip(img, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the mutations


MUTATION_CHECKS = {
    # kind: (params, check(input, output) -> bool)
    "crop_rows": ({"start": 10, "n_rows": 3}, lambda a, b: b.shape == (3, a.shape[1])),
    "crop_cols": ({"start": 70, "n_cols": 20}, lambda a, b: b.shape == (a.shape[0], 10)),
    "rotate_90": ({"k": 1}, lambda a, b: b.shape == a.shape[::-1] and np.array_equal(b[:, 0], a[0, ::-1])),
    "rotate_small": ({"angle_deg": 8.0, "fill": 255},
                     lambda a, b: b.shape[0] > a.shape[0] and b[0, 0] == 255 and b[-1, -1] == 255),
    "pad_border": ({"top": 5, "bottom": 0, "left": 0, "right": 7, "value": 0},
                   lambda a, b: b.shape == (65, 87) and not b[:5].any() and not b[:, -7:].any()
                   and np.array_equal(b[5:, :80], a)),
    "saturate": ({"gain": 6.0}, lambda a, b: (b == 255).mean() > (a == 255).mean() + 0.2),
    "jpeg_heavy": ({"quality": 3}, lambda a, b: b.shape == a.shape and np.abs(b.astype(int) - a).mean() > 3),
    "flip_vertical": ({}, lambda a, b: np.array_equal(b, a[::-1]) and not np.array_equal(b, a)),
    "narrow_16bit": ({"low": 1000, "span": 10},
                     lambda a, b: b.dtype == np.uint16 and b.min() >= 1000 and b.max() <= 1010 and b.max() > b.min()),
    "constant": ({"value": 128}, lambda a, b: b.shape == a.shape and (b == 128).all()),
    "tiny": ({"size": 3}, lambda a, b: b.shape == (3, 3)),
    "huge_aspect": ({"height": 2, "width": 3000}, lambda a, b: b.shape == (2, 3000)),
    "rgb_unequal": ({"variant": "tint"},
                    lambda a, b: b.shape == (*a.shape, 3) and not np.array_equal(b[..., 0], b[..., 2])),
    "one_row": ({"row": 30}, lambda a, b: b.shape == (1, a.shape[1]) and np.array_equal(b[0], a[30])),
}


@pytest.mark.parametrize("kind", sorted(MUTATION_CHECKS))
def test_image_mutation_mutates_and_leaves_input_alone(kind):
    img = _speckle()
    before = img.copy()
    params, check = MUTATION_CHECKS[kind]
    out = cf.MUTATIONS[kind](img, **params)
    assert np.array_equal(img, before), "the mutation changed its input"
    assert out is not img
    assert out.shape != img.shape or not np.array_equal(out, img), "nothing was mutated"
    assert check(img, out), (kind, out.shape, out.dtype)


def test_blank_frame_and_non_finite_mutations():
    frames = [_speckle(seed=k) for k in range(4)]
    copies = [f.copy() for f in frames]
    out = cf.blank_frame(frames, index=2, value=255)
    assert all(np.array_equal(f, c) for f, c in zip(frames, copies, strict=True))
    assert (out[2] == 255).all() and all(np.array_equal(out[k], frames[k]) for k in (0, 1, 3))
    vol = np.stack(frames).astype(np.float32) / 255
    for pattern in ("rows", "cols", "scatter", "frame", "all"):
        got = cf.insert_non_finite(vol, pattern=pattern, value=float("nan"), start=0.4, size=0.05, seed=1)
        assert np.isfinite(vol).all()
        n_bad = int(np.isnan(got).sum())
        assert 0 < n_bad, pattern
        assert (n_bad == vol.size) == (pattern == "all"), pattern
        assert np.array_equal(got[np.isfinite(got)], vol[np.isfinite(got)])
    assert np.isposinf(cf.insert_non_finite(vol[0], pattern="rows", value=float("inf"), start=0.0, size=0.1)).any()


def test_cases_are_reproducible_and_cover_every_kind(sources):
    a = list(cf.chain_cases(3, len(cf.MUTATIONS), sources))
    b = list(cf.chain_cases(3, len(cf.MUTATIONS), sources))
    assert a == b
    assert {c["mutation"] for c in a} == set(cf.MUTATIONS)
    assert a != list(cf.chain_cases(4, len(cf.MUTATIONS), sources))
    with pytest.raises(ValueError, match="unknown mutations"):
        list(cf.chain_cases(0, 1, sources, mutations=["melt"]))


def test_real_cases_mutate_their_source(sources):
    """Every case's pixels differ from its (shrunk) source B-scan, and the written file holds them."""
    from PIL import Image

    for case in cf.chain_cases(5, 2 * len(cf.MUTATIONS), sources, reduce_px=160):
        base = cf._base_frames(case)
        pixels = cf.case_pixels(case)
        assert len(pixels) == case["n_frames"]
        if case["mutation"] == "nan_inf":
            assert not all(np.isfinite(p).all() for p in pixels), case
            continue
        same = all(p.shape == b.shape and np.array_equal(p.astype(np.float64), np.round(b)) for p, b in
                   zip(pixels, base, strict=True))
        assert not same, f"case {case['id']} ({case['mutation']}) did not change its source"
        if case["format"] in ("png", "png16", "bmp", "tif", "tif16"):
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path, _ = cf.write_case(case, tmp)
                if case["format"].startswith("tif"):
                    import tifffile

                    back = tifffile.imread(path)
                else:
                    with Image.open(path) as img:
                        back = np.asarray(img)
                assert np.array_equal(back, pixels[0]), case


def test_written_volumes_hold_blank_frame_and_non_finite_values(tmp_path, sources):
    import nibabel as nib
    from PIL import Image

    cases = list(cf.chain_cases(0, 4 * len(cf.MUTATIONS), sources, reduce_px=160))
    blank = next(c for c in cases if c["mutation"] == "blank_frame")
    folder, _ = cf.write_case(blank, tmp_path / "blank")
    files = sorted(folder.glob("bscan_*.png"))
    assert len(files) == blank["n_frames"] >= 2
    values = [np.asarray(Image.open(f)) for f in files]
    k = blank["params"]["index"]
    assert (values[k] == blank["params"]["value"]).all()
    assert all(v.std() > 0 for i, v in enumerate(values) if i != k)
    for c in [c for c in cases if c["mutation"] == "nan_inf"][:3]:
        path, _ = cf.write_case(c, tmp_path / f"nan{c['id']}")
        data = np.asarray(nib.load(path).dataobj)
        assert data.dtype == np.float32 and not np.isfinite(data).all()


# --------------------------------------------------------------------------- the harness


def _print_traceback(argv):
    import traceback

    try:
        raise KeyError("boom")
    except KeyError:
        traceback.print_exc()
    return 1


def _unexpected(argv):
    import sys

    print("error: unexpected KeyError: 'x' (an octpipe bug: run with -v for the traceback)", file=sys.stderr)
    return 1


def _one_line(argv):
    import sys

    print("error: scan.png: not a B-scan", file=sys.stderr)
    return 1


def _silent(argv):
    return 1


def _sleep(argv):
    time.sleep(60)
    return 0


def _abort(argv):
    os.abort()


def _hog(argv):
    block = np.ones(int(argv[0]) << 17, dtype=np.float64)  # argv[0] MiB, touched
    time.sleep(float(argv[1]) if len(argv) > 1 else 0.0)
    return int(block[0]) - 1


def _raise(argv):
    raise SystemError("escaped")


@pytest.mark.parametrize(("entry", "argv", "outcome"), [
    ("_one_line", [], "error"),
    ("_print_traceback", [], "traceback"),
    ("_unexpected", [], "traceback"),
    ("_raise", [], "traceback"),
    ("_silent", [], "bad_exit"),
    ("_abort", [], "crash"),
    ("_hog", ["1"], "ok"),
])
def test_harness_classifies(entry, argv, outcome):
    raw = cf._run_child(argv, timeout_s=60, kill_bytes=1 << 40, entry=f"{__name__}:{entry}")
    assert cf._classify(raw)[0] == outcome, raw


def test_harness_detects_hang_and_memory():
    t0 = time.perf_counter()
    raw = cf._run_child([], timeout_s=2, kill_bytes=1 << 40, entry=f"{__name__}:_sleep")
    assert cf._classify(raw)[0] == "hang" and time.perf_counter() - t0 < 20
    small = cf._run_child(["8"], timeout_s=60, kill_bytes=1 << 40, entry=f"{__name__}:_hog")
    big = cf._run_child(["200"], timeout_s=60, kill_bytes=1 << 40, entry=f"{__name__}:_hog")
    assert big["peak_growth_bytes"] >= 200 << 20 > small["peak_growth_bytes"]
    raw = cf._run_child(["400", "30"], timeout_s=60, kill_bytes=100 << 20, entry=f"{__name__}:_hog")
    assert cf._classify(raw)[0] == "memory"


# --------------------------------------------------------------------------- the chain


def _run_cases(cases, tmp_path, *, export_every, reduce_note=""):
    def one(case):
        work = tmp_path / f"case{case['id']}"
        out = [cf.run_case(case, work, "layers"), cf.run_case(case, work, "ingest")]
        if out[-1]["outcome"] == "ok":
            out.append(cf.run_case(case, work, "patches"))
        if case["id"] % export_every == 0:
            out.append(cf.run_case(case, work, "export"))
        return out

    with ThreadPoolExecutor(max_workers=2) as pool:
        return [r for rs in pool.map(one, cases) for r in rs]


def _assert_clean(results):
    bad = [r for r in results if r["outcome"] in cf.BAD_OUTCOMES]
    lines = [f"{r['outcome']}: octpipe {' '.join(r['argv'])}  [{r['mutation']} {r['params']} {r['format']} "
             f"{r['shape']} <- {r['source']}]: {r['stderr_line']}" for r in bad]
    assert not bad, f"{len(bad)} of {len(results)} runs broke the contract:\n" + "\n".join(lines)


def test_chain_on_unmutated_real_bscan_is_ok(tmp_path, sources):
    """Control: an intact real B-scan (zero padding) goes through all four commands with exit 0."""
    src = next(s for s in sources if "Spectralis_1" in s.name)
    case = next(cf.chain_cases(0, 1, [src], mutations=["pad_border"], reduce_px=256, full_size_fraction=0.0))
    case["params"] = {"top": 0, "bottom": 0, "left": 0, "right": 0, "value": 0}
    case["format"], case["quality"] = "png", None
    for command in cf.COMMANDS:
        r = cf.run_case(case, tmp_path, command)
        assert r["outcome"] == "ok", r
        assert r["peak_memory_bytes"] is not None and 0 < r["peak_memory_bytes"] < r["budget_bytes"]
    assert isinstance(r["qc_flags"], list)


def test_chain_fuzz_fast_sample(tmp_path, sources):
    """20 cases (every mutation kind, shrunk to 160 px): layers, ingest, patches after it, export on 5."""
    cases = list(cf.chain_cases(11, 20, sources, reduce_px=160, full_size_fraction=0.0, big_volume_every=0))
    results = _run_cases(cases, tmp_path, export_every=4)
    assert {r["mutation"] for r in results} == set(cf.MUTATIONS)
    ran = {r["command"] for r in results if r["outcome"] != "not_run"}
    assert ran == set(cf.COMMANDS), ran
    assert any(r["outcome"] == "ok" for r in results) and any(r["outcome"] == "error" for r in results)
    _assert_clean(results)


@pytest.mark.slow
def test_chain_fuzz_large_sample(tmp_path, sources):
    """160 cases at the benchmark's size: every command, export on every fourth."""
    cases = list(cf.chain_cases(2024, 160, sources))
    results = _run_cases(cases, tmp_path, export_every=4)
    assert {r["command"] for r in results if r["outcome"] != "not_run"} == set(cf.COMMANDS)
    _assert_clean(results)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["layers", "ingest", "export"])
def test_device_size_volume_stays_in_memory_budget(tmp_path, sources, command):
    """A folder of 49 full-size B-scans (one blank): the peak stays within twice the input plus the allowance."""
    src = next(s for s in sources if "Spectralis_1" in s.name)
    case = next(cf.chain_cases(0, 1, [src], mutations=["blank_frame"], big_volume_every=1))
    assert case["n_frames"] == cf.BIG_VOLUME_FRAMES and case["reduce"] == 1
    r = cf.run_case(case, tmp_path, command)
    assert r["outcome"] in ("ok", "error"), (
        f"{r['outcome']}: octpipe {' '.join(r['argv'])}: peak growth {r['peak_memory_bytes']} bytes, budget "
        f"{r['budget_bytes']} (input {r['input_bytes']}): {r['stderr_line']}")
