"""The reference CNN (6,101,642 parameters at width 1) and its optimizer, in plain Keras 3."""

from __future__ import annotations

from typing import Any

import keras

from ensemble.config import ModelConfig, TrainConfig
from ensemble.data import IMAGE_SIDE, NUM_CLASSES

CONV_FILTERS = (256, 512, 1024)


def build_model(
    config: ModelConfig, augmentation: keras.layers.Layer | None = None, name: str = "digit_cnn"
) -> keras.Model:
    """Input: raw pixels 0..255, shape (28, 28, 1). Output: float32 logits over the 10 digits.

    `augmentation`, a training-only layer (ensemble.augment.RandomAffine), goes first: it then runs
    inside the compiled training step, on the device that trains, and is the identity at inference.
    """
    regularizer = keras.regularizers.L2(config.l2) if config.l2 else None
    inputs = keras.Input((IMAGE_SIDE, IMAGE_SIDE, 1), name="pixels")
    x = inputs if augmentation is None else augmentation(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    for block, filters in enumerate(CONV_FILTERS):
        x = keras.layers.Conv2D(
            max(1, round(filters * config.width)),
            3,
            padding="same",
            use_bias=False,  # BatchNorm's offset makes a bias redundant
            kernel_regularizer=regularizer,
            name=f"conv{block + 1}",
        )(x)
        x = keras.layers.BatchNormalization(momentum=config.bn_momentum)(x)
        x = keras.layers.ReLU()(x)
        if block < len(CONV_FILTERS) - 1:
            x = keras.layers.MaxPooling2D(2)(x)
    # Dense on a 4-D tensor acts on the channel axis: the same 128 units at each of the 7x7 positions.
    x = keras.layers.Dense(config.dense_units, activation="relu", kernel_regularizer=regularizer)(x)
    x = keras.layers.Dropout(config.dropout)(x)
    x = keras.layers.Flatten()(x)
    # float32 logits whatever the compute precision: the vote averages them.
    outputs = keras.layers.Dense(NUM_CLASSES, kernel_regularizer=regularizer, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="digit_ensemble")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on logits against integer labels smoothed towards uniform (Keras' sparse loss has no
    label_smoothing; its categorical one needs one-hot labels)."""

    def __init__(self, label_smoothing: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true: Any, y_pred: Any) -> Any:
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), NUM_CLASSES)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"label_smoothing": self.label_smoothing}


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int | None = None) -> None:
    """Adam on the configured schedule (the seed's exponential decay by default), cross-entropy on logits.

    The cosine schedule spans max_epochs of `steps_per_epoch` steps, which it then needs.
    """
    if config.schedule == "cosine":
        if not steps_per_epoch:
            raise ValueError("the cosine schedule needs steps_per_epoch")
        warmup = round(config.warmup_epochs * steps_per_epoch)
        decay = steps_per_epoch * config.max_epochs - warmup
        if warmup:  # linearly from 0 up to the peak, then the cosine down from it
            learning_rate = keras.optimizers.schedules.CosineDecay(
                0.0, decay, warmup_target=config.learning_rate, warmup_steps=warmup
            )
        else:
            learning_rate = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay)
    else:
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            config.learning_rate, decay_steps=config.decay_steps, decay_rate=config.decay_rate
        )
    if config.label_smoothing:
        loss = SmoothedSparseCrossentropy(config.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ema = {"use_ema": True, "ema_momentum": config.ema} if config.ema else {}
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, **ema),
        loss=loss,
        # Not read by our training loop (ensemble/fused.py counts its own), but by the benchmarks' model.fit
        # baselines, which train and validate as the seed did.
        metrics=["accuracy"],
        jit_compile=config.jit_compile,
    )
