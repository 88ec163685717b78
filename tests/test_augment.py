"""Augmentation and test-time augmentation, under whichever Keras backend this process runs.

The suite runs these under TensorFlow (the default); tests/test_backends.py runs this file again
under JAX, so the same ops are checked on both.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import pytest
from keras import ops

# Keras 3 dropped ImageDataGenerator from its public API; the seed's class lives on, unchanged, here.
from keras.src.legacy.preprocessing.image import ImageDataGenerator

from ensemble.augment import RandomAffine, compose_matrices, random_matrices, shift_matrices, transform_images
from ensemble.config import AugmentConfig, ModelConfig
from ensemble.model import build_model
from ensemble.train import TTA_SHIFTS, predict_logits

# ImageDataGenerator.apply_transform's parameters: degrees, pixels (tx along columns), zoom factors.
SEED_TRANSFORMS = {
    "rotation": {"theta": 10.0},
    "zoom": {"zx": 1.1, "zy": 0.9},
    "shift": {"tx": 1.4, "ty": -1.2},
    "shear": {"shear": 5.0},
    "combined": {"theta": -8.0, "zx": 0.92, "zy": 1.07, "tx": -1.1, "ty": 0.9, "shear": -4.0},
}


def matrices_for(params: dict[str, float], count: int) -> object:
    """Our matrices for ImageDataGenerator's parameters, one per image."""
    full = {"theta": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0, "tx": 0.0, "ty": 0.0} | params

    def column(value: float) -> object:
        return ops.full((count,), value, "float32")

    return compose_matrices(
        rotation=column(math.radians(full["theta"])),
        shear=column(math.radians(full["shear"])),
        zoom_x=column(full["zx"]),
        zoom_y=column(full["zy"]),
        shift_x=column(full["tx"]),
        shift_y=column(full["ty"]),
        image_size=28,
    )


@pytest.mark.parametrize("name", SEED_TRANSFORMS)
def test_transform_matches_the_seeds_image_data_generator(sample, name: str) -> None:
    images = sample[0][:16].astype(np.float32)
    params = SEED_TRANSFORMS[name]
    # The seed's generator with our fill (MNIST's black background) and its default bilinear interpolation.
    seed = ImageDataGenerator(fill_mode="constant", cval=0.0)
    expected = np.stack([seed.apply_transform(image, params) for image in images])
    ours = ops.convert_to_numpy(transform_images(ops.convert_to_tensor(images), matrices_for(params, len(images))))
    assert np.abs(expected - images).max() > 50  # the transform really moves ink
    # Same bilinear resampling, so the same pixels up to float32 rounding (on a 0..255 scale).
    np.testing.assert_allclose(ours, expected, atol=0.01)


def test_zero_ranges_give_identity_matrices_and_unchanged_images(sample) -> None:
    zero = AugmentConfig(rotation=0, zoom=0, width_shift=0, height_shift=0, shear=0)
    matrices = random_matrices(4, zero, strength=1.0, image_size=28, seed=keras.random.SeedGenerator(0))
    np.testing.assert_allclose(ops.convert_to_numpy(matrices), np.tile([1, 0, 0, 0, 1, 0, 0, 0], (4, 1)), atol=1e-6)
    images = sample[0][:4].astype(np.float32)
    np.testing.assert_allclose(ops.convert_to_numpy(transform_images(images, matrices)), images, atol=1e-3)


def test_transform_moves_pixels_the_way_the_matrix_says() -> None:
    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 10, 12, 0] = 200.0  # row 10, column 12
    moved = ops.convert_to_numpy(transform_images(image, shift_matrices(1, dx=-3, dy=2)))
    assert moved[0, 12, 9, 0] == 200.0 and moved.sum() == 200.0  # 3 left, 2 down
    # Reading from outside the image gives background (0).
    far = ops.convert_to_numpy(transform_images(image, shift_matrices(1, dx=40, dy=0)))
    assert far.sum() == 0.0


def test_random_matrices_stay_within_the_seed_ranges() -> None:
    matrices = ops.convert_to_numpy(
        random_matrices(2000, AugmentConfig(), strength=1.0, image_size=28, seed=keras.random.SeedGenerator(1))
    )
    angle = np.degrees(np.arctan2(matrices[:, 3], matrices[:, 0]))
    assert 8.0 < np.abs(angle).max() <= 10.0 + 1e-3  # rotation up to 10 degrees, and it uses the range
    assert np.all(np.hypot(matrices[:, 0], matrices[:, 3]) <= 1.1 + 1e-5)  # zoom up to 10%
    half = ops.convert_to_numpy(
        random_matrices(2000, AugmentConfig(), strength=0.5, image_size=28, seed=keras.random.SeedGenerator(1))
    )
    assert np.abs(np.degrees(np.arctan2(half[:, 3], half[:, 0]))).max() <= 5.0 + 1e-3  # strength scales it


def test_layer_augments_in_training_only_and_survives_saving(sample, tmp_path) -> None:
    images = sample[0][:64].astype(np.float32)
    layer = RandomAffine(dataclasses.asdict(AugmentConfig()), strength=1.0, seed=3)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer(images, training=False)), images)
    first = ops.convert_to_numpy(layer(images, training=True))
    second = ops.convert_to_numpy(layer(images, training=True))
    changed = np.abs(first - images).reshape(64, -1).max(axis=1) > 0
    assert changed.mean() > 0.95 and not np.array_equal(first, second)  # a new draw every call
    ink = first.reshape(64, -1).sum(axis=1) / images.reshape(64, -1).sum(axis=1)
    assert np.all((ink > 0.7) & (ink < 1.3))  # small transforms: the digit stays in the frame

    model = build_model(ModelConfig(width=0.125), layer)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    restored = loaded.get_layer(layer.name)
    assert isinstance(restored, RandomAffine) and restored.get_config() == layer.get_config()
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_test_time_augmentation_averages_shifted_views(sample) -> None:
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(width=0.125))
    images = sample[0][:40]
    plain = predict_logits([model], images)[0]
    assert plain.dtype == np.float32 and plain.shape == (40, 10)
    np.testing.assert_allclose(plain, model.predict(images.astype(np.float32), verbose=0), atol=1e-5)
    # Integer shifts are exact: each view is the image rolled by one pixel, with a black edge.
    views = []
    for dx, dy in TTA_SHIFTS[:3]:
        rolled = np.roll(images.astype(np.float32), (dy, dx), axis=(1, 2))
        if dx:
            rolled[:, :, 0 if dx > 0 else -1] = 0
        views.append(model.predict(rolled, verbose=0))
    np.testing.assert_allclose(predict_logits([model], images, views=3)[0], np.mean(views, axis=0), atol=1e-4)
    assert predict_logits([model, model], images[:0], views=3).shape == (2, 0, 10)
