from __future__ import annotations

import numpy as np
import tensorflow as tf

from ensemble.augment import affine_matrices, augment_batch, transform_images
from ensemble.config import AugmentConfig, Config
from ensemble.member import training_dataset


def test_strength_zero_is_the_identity_and_keeps_labels(sample) -> None:
    images, labels = sample[0][:130], sample[1][:130]
    batches = list(training_dataset(images, labels, Config(), strength=0.0, seed=1))
    seen_images = np.concatenate([x.numpy() for x, _ in batches])
    seen_labels = np.concatenate([y.numpy() for _, y in batches])
    assert seen_images.dtype == np.float32 and len(seen_images) == 130
    # Shuffled, but every image is unchanged and still paired with its own label.
    order = [int(np.flatnonzero((images.reshape(130, -1) == x.reshape(-1)).all(axis=1))[0]) for x in seen_images]
    np.testing.assert_array_equal(seen_images, images[order].astype(np.float32))
    np.testing.assert_array_equal(seen_labels, labels[order])


def test_zero_ranges_give_identity_matrices() -> None:
    zero = AugmentConfig(rotation=0, zoom=0, width_shift=0, height_shift=0, shear=0)
    matrices = affine_matrices(4, zero, strength=1.0, image_size=28).numpy()
    np.testing.assert_allclose(matrices, np.tile([1, 0, 0, 0, 1, 0, 0, 0], (4, 1)), atol=1e-6)


def test_transform_moves_pixels_the_way_the_matrix_says() -> None:
    image = np.zeros((1, 28, 28, 1), np.float32)
    image[0, 10, 12, 0] = 200.0  # row 10, column 12
    # Output pixel (x, y) reads input (x + 3, y - 2): the content moves 3 left and 2 down.
    matrix = tf.constant([[1, 0, 3, 0, 1, -2, 0, 0]], tf.float32)
    moved = transform_images(tf.constant(image), matrix).numpy()
    assert moved[0, 12, 9, 0] == 200.0 and moved.sum() == 200.0
    # Reading from outside the image gives background (0).
    far = transform_images(tf.constant(image), tf.constant([[1, 0, 40, 0, 1, 0, 0, 0]], tf.float32)).numpy()
    assert far.sum() == 0.0


def test_augmentation_changes_images_within_the_seed_ranges(sample) -> None:
    tf.random.set_seed(0)
    images = tf.constant(sample[0][:256].astype(np.float32))
    augmented = augment_batch(images, AugmentConfig(), strength=1.0).numpy()
    assert augmented.shape == images.shape
    changed = np.abs(augmented - images.numpy()).reshape(256, -1).max(axis=1) > 0
    assert changed.mean() > 0.95
    # Small transforms: the digit's ink stays (mostly) in the frame.
    ratio = augmented.reshape(256, -1).sum(axis=1) / images.numpy().reshape(256, -1).sum(axis=1)
    assert np.all((ratio > 0.7) & (ratio < 1.3))
    # The shift is bounded by 0.05 * 28 = 1.4 pixels, rotation by 10 degrees, zoom by 10%.
    matrices = affine_matrices(1000, AugmentConfig(), strength=1.0, image_size=28).numpy()
    angle = np.degrees(np.arctan2(matrices[:, 3], matrices[:, 0]))
    assert np.abs(angle).max() <= 10.0 + 1e-3 and np.abs(angle).max() > 8.0
    assert np.all(np.hypot(matrices[:, 0], matrices[:, 3]) <= 1.1 + 1e-5)
