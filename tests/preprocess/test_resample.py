import numpy as np
import pytest

from octpipe.preprocess.resample import (
    downsample_boundaries,
    downsample_columns,
    downsample_labels,
    lateral_factor,
    source_columns,
    upsample_columns,
)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_area_average_and_dtype(dtype):
    x = np.arange(2 * 3 * 6, dtype=dtype).reshape(2, 3, 6)
    out = downsample_columns(x, 2)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3)
    np.testing.assert_allclose(out, x.astype(np.float64).reshape(2, 3, 3, 2).mean(-1))


def test_512_to_256_keeps_the_mean_and_odd_widths_keep_the_last_columns():
    rng = np.random.default_rng(0)
    x = rng.random((2, 10, 512)).astype(np.float32)
    out = downsample_columns(x, 2)
    assert out.shape == (2, 10, 256)
    assert out.mean() == pytest.approx(x.mean(), rel=1e-6)
    odd = downsample_columns(np.array([[1.0, 3.0, 5.0, 7.0, 9.0]]), 2)
    assert odd.tolist() == [[2.0, 6.0, 9.0]]


def test_invalid_pixels_are_left_out_and_input_is_not_mutated():
    x = np.array([[1.0, 100.0, 3.0, 5.0]])
    invalid = np.array([[False, True, False, False]])
    before = x.copy()
    assert downsample_columns(x, 2, invalid=invalid).tolist() == [[1.0, 4.0]]
    all_bad = downsample_columns(x, 2, invalid=np.ones_like(invalid))
    assert np.isnan(all_bad).all()
    np.testing.assert_array_equal(x, before)


def test_boundaries_and_labels_use_the_matching_operators():
    rows = np.array([[10.0, 12.0, np.nan, 20.0]])
    assert downsample_boundaries(rows, 2).tolist() == [[11.0, 20.0]]
    mask = np.array([[0, 3, 0, 0, 1, 1]], dtype=np.uint8)
    out = downsample_labels(mask, 2)
    assert out.tolist() == [[3, 0, 1]] and out.dtype == np.uint8


def test_factor_from_target_spacing():
    assert lateral_factor(0.0113, target_spacing_mm=0.0226) == 2
    assert lateral_factor(0.0057, target_spacing_mm=0.0226) == 4
    assert lateral_factor(0.03, target_spacing_mm=0.0226) == 1
    assert lateral_factor(0.01, factor=3) == 3
    with pytest.raises(ValueError):
        lateral_factor(0.01, factor=0)
    with pytest.raises(ValueError):
        lateral_factor(0.01)


def test_upsample_inverts_on_linear_profiles():
    x = np.linspace(0, 1, 512)[None, :] * np.ones((3, 1))
    down = downsample_columns(x, 2)
    up = upsample_columns(down, 2, 512)
    # linear data is reproduced exactly between the outer block centres
    np.testing.assert_allclose(up[:, 1:-1], x[:, 1:-1], atol=1e-6)
    assert source_columns(3, 2, 5).tolist() == [0.5, 2.5, 4.0]
