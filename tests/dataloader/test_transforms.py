import numpy as np
import pytest

from ccs_fast.dataloader.transforms import (IMAGENET_MEAN, IMAGENET_STD, crop_resize,
                                            invert_flow_x, normalize_flow, normalize_rgb,
                                            stack_flow)


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)


def test_crop_resize_shape_and_identity(image):
    out = crop_resize(image, (0, 0, 40, 32), 16, False)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(crop_resize(image, (5, 3, 20, 20), 20, False), image[3:23, 5:25])
    grey = crop_resize(image[..., 0], (5, 3, 20, 24), 12, False)
    assert grey.shape == (12, 12)


def test_flip_mirrors_the_resized_crop(image):
    crop = (4, 2, 28, 25)
    plain = crop_resize(image, crop, 17, False)
    flipped = crop_resize(image, crop, 17, True)
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    assert flipped.flags.c_contiguous


def test_invert_flow_x():
    fx = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    out = invert_flow_x(fx)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[255, 254, 127, 0]])


def test_normalisation_values():
    rgb = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    out = normalize_rgb(rgb)
    assert out.dtype == np.float32 and out.shape == (1, 2, 3)
    np.testing.assert_allclose(out[0, 0], -IMAGENET_MEAN / IMAGENET_STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], (1 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0], [-2.117904, -2.035714, -1.804444], atol=1e-5)
    flow = normalize_flow(np.array([0, 128, 255], dtype=np.uint8))
    assert flow.dtype == np.float32
    np.testing.assert_allclose(flow, [-1.0, 0.0, 127 / 128])


def test_stack_flow_interleaves_x_and_y():
    fx = [np.full((4, 5), 10 * l, np.uint8) for l in range(3)]
    fy = [np.full((4, 5), 10 * l + 1, np.uint8) for l in range(3)]
    out = stack_flow(fx, fy)
    assert out.shape == (4, 5, 6)
    np.testing.assert_array_equal(out[0, 0], [0, 1, 10, 11, 20, 21])
    with pytest.raises(ValueError):
        stack_flow(fx, fy[:2])
