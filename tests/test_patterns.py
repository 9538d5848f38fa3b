"""Patterns are pixel-exact per protocol §2.1, for greyscale and colour, and never modify their input."""
import numpy as np
import pytest
import torch

from spurious import patterns
from spurious.errors import SpuriousError

SHAPES = [(1, 28, 28), (3, 32, 32)]


def batch(shape, n=4, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", patterns.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_every_pattern_keeps_range_shape_and_input(name, shape):
    x = batch(shape)
    before = x.clone()
    out = patterns.apply(name, x, seed=3)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before), "input must not be modified"
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x), "pattern must change the images"
    assert torch.equal(out, patterns.apply(name, x, seed=3)), "same seed, same result"


@pytest.mark.parametrize("alias,size", [("s1", 1), ("v1", 1), ("s2", 3), ("v3", 3), ("s3", 5), ("v8", 5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_corner_squares_are_white_on_all_channels(alias, size, shape):
    x = torch.zeros((2, *shape))
    out = patterns.apply(alias, x)
    assert torch.all(out[:, :, :size, :size] == 1)
    assert out.sum() == 2 * shape[0] * size * size


def test_core_bar_rows_3_to_24_columns_13_to_15():
    out = patterns.apply("core", torch.zeros(1, 1, 28, 28))[0, 0]
    rows, cols = torch.nonzero(out, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 24, 13, 15)
    assert out.sum() == 22 * 3
    assert torch.equal(patterns.apply("v30", torch.zeros(1, 3, 32, 32)).sum(1)[0], 3 * bar32())


def bar32():
    out = torch.zeros(32, 32)
    out[3:25, 13:16] = 1
    return out


@pytest.mark.parametrize("alias,scale", [("r1", .25), ("v18", .25), ("r2", .5), ("v19", .5), ("r3", 1.), ("v20", 1.)])
@pytest.mark.parametrize("shape", SHAPES)
def test_noise_reproduces_reference_nhwc_draw(alias, scale, shape):
    c, h, w = shape
    x = batch(shape)
    seed = 7
    u = np.random.RandomState(seed).rand(h, w, c)  # the reference's draw, NHWC
    ref_nhwc = np.clip(x.numpy().transpose(0, 2, 3, 1) + scale * u, 0, 1)
    out = patterns.apply(alias, x, seed)
    np.testing.assert_allclose(out.numpy().transpose(0, 2, 3, 1), ref_nhwc, rtol=0, atol=1e-6)


def test_cifar_noise_is_independent_per_channel_and_seed_dependent():
    out = patterns.apply("r3", torch.zeros(1, 3, 32, 32), seed=0)[0]
    assert not torch.equal(out[0], out[1])
    assert not torch.equal(out, patterns.apply("r3", torch.zeros(1, 3, 32, 32), seed=1)[0])


def test_norms_on_black_background_match_spec_bounds():
    zeros = torch.zeros(200, 1, 28, 28)
    assert patterns.l2_change("s1", zeros) == pytest.approx(1.0)
    assert patterns.l2_change("s3", zeros) == pytest.approx(5.0)
    assert patterns.l2_change("r3", zeros, 0) == pytest.approx(16.17, abs=0.4)


def test_keyword_specs_and_aliases_resolve():
    assert patterns.canonical("s3") == "corner_square_5"
    assert patterns.get("square(size=5)") == patterns.get("s3")
    assert patterns.get("noise(scale=1.0)") == patterns.get("r3")
    assert patterns.get("bar()") == patterns.get("core")
    assert patterns.short_name("v20") == "R3" and patterns.short_name("corner_square_5") == "S3"


@pytest.mark.parametrize("bad", ["v99", "square(size=0)", "square(5)", "noise(scale=-1)", "circle(r=2)",
                                 "square(size=", "bar(top=5, bottom=2)"])
def test_bad_pattern_names_raise_one_line(bad):
    with pytest.raises(SpuriousError) as err:
        patterns.get(bad)
    assert "\n" not in str(err.value)


def test_pattern_larger_than_image_raises():
    with pytest.raises(SpuriousError, match="does not fit"):
        patterns.apply("square(size=40)", torch.zeros(1, 1, 28, 28))


def test_apply_at_only_touches_chosen_rows():
    x = torch.zeros(5, 1, 28, 28)
    out = patterns.apply_at("s3", x, [1, 3], seed=0)
    assert out[[1, 3]].sum() == 50 and out[[0, 2, 4]].sum() == 0


def test_user_patterns_from_object_and_png(tmp_path):
    import matplotlib.image as mpimg

    img = np.zeros((28, 28, 4), np.float32)
    img[-4:, -4:] = 1.0  # an opaque white bottom-right square
    path = tmp_path / "logo.png"
    mpimg.imsave(path, img)
    patterns.register_image("test_logo_png", path)
    out = patterns.apply("test_logo_png", torch.zeros(2, 1, 28, 28))
    assert out[:, :, -4:, -4:].min() == 1 and out.sum() == 2 * 16
    assert "test_logo_png" in patterns.names()
    with pytest.raises(SpuriousError, match="duplicate"):
        patterns.register_image("test_logo_png", path)
    with pytest.raises(SpuriousError, match="cannot read"):
        patterns.register_image("missing_png", tmp_path / "missing.png")
