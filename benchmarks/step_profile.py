"""Where one training step's time goes (JAX): a member's step timed part by part.

Each part is a jitted function called once per batch, back to back (as a group dispatches its steps), and
waited for at the end: augmentation alone; the forward pass; forward and backward; the full step with the
optimizer (the package's own for one member, ensemble/fused.py); and that step for the same model with
BatchNorm and ReLU taken out. The parts are differences of their medians. Around them: the package's step
as a group trains it (FusedSteps.train_epoch, the baseline of every row: the ratio is a part's share), an
empty jitted call (dispatch: a part shorter than that shows the dispatch instead) and one batch of images
copied from the host (what the seed's pipeline pays each step; the package sends index arrays, once an
epoch). On a noisy CPU a small difference can come out negative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras import ops

from benchmarks import harness
from benchmarks.harness import Row
from ensemble.config import Config
from ensemble.fused import fused_steps, jax_member_step, jax_variables
from ensemble.model import compile_model


def without_batchnorm_relu(model: keras.Model, config: Config) -> keras.Model:
    """The same chain of layers without its BatchNormalization and ReLU layers, compiled alike.

    The other layers are the model's own, shared (their values are copied before anything is timed): cloning
    would serialize the model's configs, which imports TensorFlow wherever it is installed.
    """
    inputs = x = keras.Input(model.input_shape[1:])
    for layer in model.layers[1:]:  # after the input layer, each feeds the next
        if not isinstance(layer, keras.layers.BatchNormalization | keras.layers.ReLU):
            x = layer(x)
    bare = keras.Model(inputs, x)
    compile_model(bare, config.train)
    bare.optimizer.build(bare.trainable_variables)
    return bare


def values(variables: list[keras.Variable]) -> list[Any]:
    """Copies: the package's step donates the variables' own buffers to its next state."""
    return [jnp.array(variable.value) for variable in variables]


def per_batch(part: Callable[..., Any], carry: Any, batches: list[Any], *args: Any) -> Callable[[], None]:
    """`part(carry, batch indices, *args) -> carry`, jitted, called on each batch in turn, then waited for."""
    compiled = jax.jit(part)

    def run() -> None:
        state = carry
        for rows in batches:
            state = compiled(state, rows, *args)
        jax.block_until_ready(state)

    return run


def profile_rows(
    images: np.ndarray, labels: np.ndarray, config: Config, steps: int, rounds: int, device: str
) -> list[Row]:
    batch = config.train.batch_size
    harness.log(f"step profile: {rounds} rounds of {steps} steps per part")
    [member] = harness.new_members(config, harness.pool_data(images, labels), harness.specs(1.0))
    model = member.model
    bare = without_batchnorm_relu(model, config)
    group = fused_steps([model], images, labels)
    batches = harness.random_batches(1, steps, batch, len(images))
    indices = [jnp.asarray(rows, jnp.int32) for rows in batches[0]]  # on the device before the clock starts
    trainable, non_trainable = values(model.trainable_variables), values(model.non_trainable_variables)
    augment = model.get_layer("augment")

    # The images and labels are arguments of every part, as of the package's programs: never closed-over constants.
    data = (group.images, group.labels)

    def loss(trainable: list, non_trainable: list, rows: Any, images: Any, labels: Any) -> tuple[Any, list]:
        x, y = ops.take(images, rows, axis=0), ops.take(labels, rows, axis=0)
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return model.loss(y, logits), non_trainable

    def augmentation(carry: tuple, rows: Any, images: Any, labels: Any) -> tuple:
        augmented, random_state = augment.stateless_call([], carry[1], ops.take(images, rows, axis=0), training=True)
        return augmented, random_state

    def forward(carry: tuple, rows: Any, images: Any, labels: Any, trainable: list) -> tuple:
        value, non_trainable = loss(trainable, carry[0], rows, images, labels)
        return non_trainable, value

    def forward_backward(carry: tuple, rows: Any, images: Any, labels: Any, trainable: list) -> tuple:
        (_, non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(trainable, carry[0], rows, images, labels)
        return non_trainable, grads

    def step(model: keras.Model) -> Callable[[], None]:
        state = tuple(map(values, jax_variables(model)))

        def part(state: tuple, rows: Any, images: Any, labels: Any) -> tuple:
            return jax_member_step(model, state, images, labels, rows)[0]

        return per_batch(part, state, indices, *data)

    host_batch = images[:batch]
    empty, scalar = jax.jit(lambda x: x + 1), jnp.zeros(())
    parts = {
        "package": lambda: group.train_epoch((0,), batches),
        "augmentation": per_batch(
            augmentation, (jnp.zeros(host_batch.shape), values(augment.non_trainable_variables)), indices, *data
        ),
        "forward": per_batch(forward, (non_trainable, jnp.zeros(())), indices, *data, trainable),
        "forward and backward": per_batch(
            forward_backward, (non_trainable, [jnp.zeros_like(v) for v in trainable]), indices, *data, trainable
        ),
        "step": step(model),
        "bare step": step(bare),
        "empty call": lambda: [empty(scalar).block_until_ready() for _ in range(steps)],
        "host to device": lambda: [jax.device_put(host_batch).block_until_ready() for _ in range(steps)],
    }
    seconds = harness.alternate(parts, rounds)
    ms = {name: 1e3 * float(np.median(times)) / steps for name, times in seconds.items()}
    batchnorm_relu = ms["step"] - ms["bare step"]
    convolutions_and_dense = ms["forward and backward"] - ms["augmentation"] - batchnorm_relu
    shares = {
        "augmentation (gather and RandomAffine)": ms["augmentation"],
        "forward pass (convolutions, dense, BatchNorm, ReLU, loss)": ms["forward"] - ms["augmentation"],
        "backward pass": ms["forward and backward"] - ms["forward"],
        "optimizer (Adam)": ms["step"] - ms["forward and backward"],
        "BatchNorm and ReLU, forward and backward": batchnorm_relu,
        "convolutions and dense, forward and backward": convolutions_and_dense,
        "the whole step, jitted alone": ms["step"],
        "host work of the package's loop, per step": ms["package"] - ms["step"],
        "dispatch: an empty jitted call, waited for": ms["empty call"],
        f"host to device: one batch of {batch} images": ms["host to device"],
    }
    note = (
        f"baseline: the package's step (FusedSteps.train_epoch, one member); width {config.model.width:g}, batch "
        f"{batch}, median of {rounds} rounds of {steps} steps; ratio: share of the step"
    )
    return [Row(f"step profile: {name}", "ms", device, ms["package"], value, note) for name, value in shares.items()]
