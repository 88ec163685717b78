"""Batched random affine augmentation: one matrix per image, one resampling per batch.

The seed augmented with Keras' ImageDataGenerator (rotation, zoom, shifts, shear), one image
at a time on the CPU. Here the same four transforms, with the same ranges, are composed into a
single matrix per image and applied to the whole batch by one ImageProjectiveTransformV3 op.

Conventions, as in ImageDataGenerator: each matrix maps an *output* pixel to the *input*
location it is read from (so a zoom factor above 1 shows more of the image, i.e. zooms out);
the transform is centred on the image centre; sampling is bilinear; pixels read from outside
the image are 0 (background). With all ranges 0 the matrix is the identity and images pass
through unchanged.
"""

from __future__ import annotations

import math

import tensorflow as tf

from ensemble.config import AugmentConfig


def affine_matrices(
    batch_size: tf.Tensor | int,
    ranges: AugmentConfig,
    strength: float,
    image_size: int,
) -> tf.Tensor:
    """Random output->input transforms as ImageProjectiveTransformV3 rows [a0 a1 a2 b0 b1 b2 0 0].

    Drawn from TensorFlow's global random state, which the member's seed fixes.
    """

    def uniform(limit: float) -> tf.Tensor:
        return tf.random.uniform([batch_size], -limit, limit)

    rotation = uniform(math.radians(ranges.rotation * strength))
    shear = uniform(math.radians(ranges.shear * strength))
    zoom_x = 1.0 + uniform(ranges.zoom * strength)
    zoom_y = 1.0 + uniform(ranges.zoom * strength)
    shift_x = uniform(ranges.width_shift * strength) * image_size
    shift_y = uniform(ranges.height_shift * strength) * image_size

    # M = Rotation @ Shear @ Zoom, as ImageDataGenerator composes them.
    cos_r, sin_r = tf.cos(rotation), tf.sin(rotation)
    a0 = cos_r * zoom_x
    a1 = (-sin_r * tf.cos(shear) + cos_r * -tf.sin(shear)) * zoom_y
    b0 = sin_r * zoom_x
    b1 = (-sin_r * tf.sin(shear) + cos_r * tf.cos(shear)) * zoom_y
    # Keep the centre fixed (x_in = M (x_out - c) + c), then shift.
    centre = (image_size - 1) / 2.0
    a2 = centre - a0 * centre - a1 * centre + shift_x
    b2 = centre - b0 * centre - b1 * centre + shift_y
    zeros = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def transform_images(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
    """Resample a float batch (N, H, W, C) through one output->input matrix per image."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=matrices,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def augment_batch(images: tf.Tensor, ranges: AugmentConfig, strength: float) -> tf.Tensor:
    """A randomly transformed copy of a float batch (N, H, W, C), `strength` scaling every range."""
    if strength == 0:
        return images
    matrices = affine_matrices(tf.shape(images)[0], ranges, strength, images.shape[1])
    return transform_images(images, matrices)
