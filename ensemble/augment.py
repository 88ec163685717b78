"""Batched random affine augmentation, inside the model: one matrix per image, one resampling per batch.

The seed augmented with Keras' ImageDataGenerator (rotation, zoom, shifts, shear), one image at a time
on the CPU. Here the same four transforms, with the same ranges and the same composition, make one
matrix per image, and the whole batch is resampled at once by `transform_images`, written in
backend-neutral `keras.ops`. `RandomAffine` is a training-only layer at the model's input, so the
augmentation runs inside the compiled training step, on the device that trains (TensorFlow or JAX).

Conventions, as in ImageDataGenerator: each matrix maps an *output* pixel (x = column, y = row, in
pixel indices) to the *input* location it is read from, so a zoom factor above 1 shows more of the
image (zooms out); the matrix is Rotation @ Shift @ Shear @ Zoom about the image's centre, (size - 1) / 2 in pixel
indices; sampling is bilinear; pixels read from outside the image are 0
(MNIST's background; ImageDataGenerator's default fill is "nearest", the same on MNIST's empty
borders). With all ranges 0 the matrix is the identity and images pass through unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from ensemble.config import AugmentConfig


# Every function below takes and returns one row per image: [a0, a1, a2, b0, b1, b2, 0, 0]; output (x, y) reads
# input (a0 x + a1 y + a2, b0 x + b1 y + b2), the layout of keras.ops.image.affine_transform and TensorFlow's
# ImageProjectiveTransformV3.
def compose_matrices(
    rotation: Any, shear: Any, zoom_x: Any, zoom_y: Any, shift_x: Any, shift_y: Any, image_size: int
) -> Any:
    """(N, 8) output->input matrices from per-image parameters (radians, zoom factors, pixels).

    ImageDataGenerator.apply_transform's {theta, shear, zx, zy, tx, ty} in radians where it takes degrees;
    its tx moves along x (columns) and ty along y (rows).
    """
    cos_r, sin_r = ops.cos(rotation), ops.sin(rotation)
    # Linear part: Rotation @ Shear @ Zoom.
    a0 = cos_r * zoom_x
    a1 = (-cos_r * ops.sin(shear) - sin_r * ops.cos(shear)) * zoom_y
    b0 = sin_r * zoom_x
    b1 = (-sin_r * ops.sin(shear) + cos_r * ops.cos(shear)) * zoom_y
    # About the centre c, with the shift rotated as the composition Rotation @ Shift does it:
    # x_in = L (x_out - c) + c + R shift.
    centre = (image_size - 1) / 2
    a2 = centre - (a0 + a1) * centre + cos_r * shift_x - sin_r * shift_y
    b2 = centre - (b0 + b1) * centre + sin_r * shift_x + cos_r * shift_y
    zeros = ops.zeros_like(a0)
    return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def random_matrices(
    batch_size: Any, ranges: AugmentConfig, strength: float, image_size: int, seed: keras.random.SeedGenerator
) -> Any:
    """Random (N, 8) matrices, each parameter uniform in its range times `strength`, as ImageDataGenerator draws."""

    def uniform(limit: float) -> Any:
        return keras.random.uniform((batch_size,), -limit, limit, seed=seed)

    return compose_matrices(
        rotation=uniform(math.radians(ranges.rotation * strength)),
        shear=uniform(math.radians(ranges.shear * strength)),
        zoom_x=1.0 + uniform(ranges.zoom * strength),
        zoom_y=1.0 + uniform(ranges.zoom * strength),
        shift_x=uniform(ranges.width_shift * strength) * image_size,
        shift_y=uniform(ranges.height_shift * strength) * image_size,
        image_size=image_size,
    )


def shift_matrices(batch_size: Any, dx: Any, dy: Any) -> Any:
    """(N, 8) matrices that move every image's content by (dx, dy) pixels (numbers or scalar tensors): right
    and down when positive."""
    one, zero = ops.ones(()), ops.zeros(())
    dx, dy = ops.cast(dx, "float32"), ops.cast(dy, "float32")
    row = ops.stack([one, zero, -dx, zero, one, -dy, zero, zero])
    return ops.tile(row[None, :], (batch_size, 1))


def transform_images(images: Any, matrices: Any) -> Any:
    """Resample a float batch (N, H, W, 1) through one output->input matrix per image: bilinear, zero fill.

    Written with four gathers rather than keras.ops.image.affine_transform, whose TensorFlow kernel has
    no XLA lowering (train.jit_compile: true would fail) and which runs 3x slower than this under JAX.
    """
    height, width = images.shape[1], images.shape[2]
    batch = ops.shape(images)[0]
    ys, xs = ops.meshgrid(ops.arange(height, dtype="float32"), ops.arange(width, dtype="float32"), indexing="ij")

    def column(index: int) -> Any:
        return ops.reshape(matrices[:, index], (-1, 1, 1))

    x = column(0) * xs + column(1) * ys + column(2)
    y = column(3) * xs + column(4) * ys + column(5)
    # A one-pixel zero border: any read outside the image, clipped onto the border, is background.
    padded = ops.reshape(ops.pad(images[..., 0], [[0, 0], [1, 1], [1, 1]]), (-1,))
    x = ops.clip(x, -1.0, width) + 1.0
    y = ops.clip(y, -1.0, height) + 1.0
    x0, y0 = ops.floor(x), ops.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = ops.cast(x0, "int32"), ops.cast(y0, "int32")
    x1, y1 = ops.minimum(x0 + 1, width + 1), ops.minimum(y0 + 1, height + 1)
    offset = ops.reshape(ops.arange(batch, dtype="int32") * ((height + 2) * (width + 2)), (-1, 1, 1))

    def pixel(row: Any, col: Any) -> Any:
        return ops.take(padded, offset + row * (width + 2) + col)

    top = pixel(y0, x0) * (1 - fx) + pixel(y0, x1) * fx
    bottom = pixel(y1, x0) * (1 - fx) + pixel(y1, x1) * fx
    return (top * (1 - fy) + bottom * fy)[..., None]


@keras.saving.register_keras_serializable(package="digit_ensemble")
class RandomAffine(keras.layers.Layer):
    """Training-only random affine augmentation of raw pixel batches (N, H, W, 1); the identity otherwise.

    Works in float32 whatever the dtype policy (pixels stay exact 0..255 values); its random state is a
    Keras SeedGenerator, so it is saved with the model and advances inside compiled steps on every backend.
    """

    def __init__(self, ranges: dict[str, float], strength: float, seed: int | None = None, **kwargs: Any):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.ranges = dict(ranges)
        self.strength = float(strength)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool | None = None) -> Any:
        images = ops.cast(images, "float32")
        if not training or self.strength == 0:
            return images
        matrices = random_matrices(
            ops.shape(images)[0], AugmentConfig(**self.ranges), self.strength, images.shape[1], self.seed_generator
        )
        return transform_images(images, matrices)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"ranges": self.ranges, "strength": self.strength, "seed": self.seed}
