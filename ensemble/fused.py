"""K members' training step and forward pass, each compiled once for the whole group.

Every image a group uses (the members' pool, the holdout, the test images) lives on the device in one
uint8 array, and a step takes each member's batch as indices into it: no image crosses from the host
while the group trains, and each member still draws its own batches from its own split. The members'
models stay separate Keras models, each with its own optimizer, BatchNorm statistics and random
state; what is fused is their work: the K members' steps are unrolled in one compiled program, which
XLA (or TensorFlow's graph executor) schedules as a whole.

- JAX: the step is a pure function of the members' variables through Keras' stateless API
  (`stateless_call`, `optimizer.stateless_apply`), jit-compiled with those variables donated. The
  variables live in this object while an epoch trains and are written back to the Keras models at
  its end (`train_epoch` does both), so the models are always current between epochs.
- TensorFlow: Keras' TensorFlow optimizer has no stateless apply, so one `tf.function` updates the
  members' variables in place, each member under its own GradientTape.

A compiled step is made once for each set of members that trains together; a member that stops
early leaves the set, and the rest get a step without it. The image and label arrays are arguments
of every compiled program, never closed over: JAX embeds a closed-over array in the program as a
constant (some 55 MB for Kaggle's train and test images), which makes every compile slower. Each
program's first call, where it is traced and compiled, is timed into `FusedSteps.compiles`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from ensemble.augment import shift_matrices, transform_images

# Called about once a second during an epoch with the steps done and each member's [loss sum, correct].
StepProgress = Callable[[int, np.ndarray], None]
PROGRESS_SECONDS = 1.0  # how often the running metrics are fetched from the device (each fetch waits for it)


class FusedSteps:
    """The compiled steps of K Keras models (compiled, optimizers built) over one device-resident image array."""

    def __init__(self, models: Sequence[keras.Model], images: np.ndarray, labels: np.ndarray):
        self.models = list(models)
        self.images = ops.convert_to_tensor(images)  # uint8 (N, 28, 28, 1): on the device from here on
        self.labels = ops.convert_to_tensor(labels.astype(np.int32))
        self._train_steps: dict[tuple[int, ...], Any] = {}
        self._forwards: dict[tuple[int, ...], Any] = {}
        # One entry per compiled program: {"program": "train step" or "forward", "members", "seconds"}.
        self.compiles: list[dict[str, Any]] = []

    @property
    def compile_seconds(self) -> float:
        """Seconds spent so far in the first calls of this group's programs (tracing and compiling)."""
        return sum(entry["seconds"] for entry in self.compiles)

    def train_epoch(
        self, members: tuple[int, ...], batches: np.ndarray, on_progress: StepProgress | None = None
    ) -> np.ndarray:
        """Train `members` (indices into the models) on `batches` (members, steps, batch) of image indices.

        Returns each member's [loss sum, correct count] over the epoch, as float64 (members, 2).
        """
        step = self._train_steps.get(members)
        if step is None:
            step = self._train_steps[members] = self._timed(self._compile_train_step(members), "train step", members)
        batches = ops.convert_to_tensor(batches.astype(np.int32))
        totals = ops.zeros((len(members), 2))
        last_report = time.monotonic()
        self._begin(members)
        for index in range(batches.shape[1]):
            totals = totals + step(self.images, self.labels, batches[:, index])
            if on_progress is not None and time.monotonic() - last_report >= PROGRESS_SECONDS:
                on_progress(index + 1, np.asarray(ops.convert_to_numpy(totals), np.float64))
                last_report = time.monotonic()
        self._end(members)
        return np.asarray(ops.convert_to_numpy(totals), np.float64)

    def logits(self, members: tuple[int, ...], indices: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> Any:
        """float32 logits (members, n, classes) of each member on its own images (indices: members, n), shifted
        by `shift` pixels (test-time augmentation views); inference mode, from the models' current weights."""
        forward = self._forwards.get(members)
        if forward is None:
            forward = self._forwards[members] = self._timed(self._compile_forward(members), "forward", members)
        indices, shift = ops.convert_to_tensor(indices.astype(np.int32)), ops.convert_to_tensor(shift, "float32")
        return ops.convert_to_numpy(forward(self.images, indices, shift))

    def _timed(self, program: Callable[..., Any], name: str, members: tuple[int, ...]) -> Callable[..., Any]:
        """`program`, with the seconds of its first call at each shape of its arguments (where it is traced and
        compiled for that shape) added to `compiles`.

        Under JAX that call returns once the program is compiled and its work dispatched, before the work is
        done; under TensorFlow it includes that one call's work.
        """
        shapes_seen = set()

        def call(*args: Any) -> Any:
            shapes = tuple(tuple(ops.shape(arg)) for arg in args)
            if shapes in shapes_seen:
                return program(*args)
            shapes_seen.add(shapes)
            started = time.perf_counter()
            result = program(*args)
            self.compiles.append({"program": name, "members": len(members), "seconds": time.perf_counter() - started})
            return result

        return call

    # Per backend: programs taking (images, labels, batches) and (images, indices, shift) -----------------

    def _compile_train_step(self, members: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _compile_forward(self, members: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _begin(self, members: tuple[int, ...]) -> None:
        """Before an epoch's steps (JAX: take the members' variables into the compiled step's state)."""

    def _end(self, members: tuple[int, ...]) -> None:
        """After an epoch's steps (JAX: write that state back into the Keras variables)."""


def shifted_images(images: Any, indices: Any, shift: Any) -> Any:
    """The images at `indices`, as float32, moved by `shift` (dx, dy) pixels: a test-time augmentation view."""
    batch = ops.cast(ops.take(images, indices, axis=0), "float32")
    return transform_images(batch, shift_matrices(ops.shape(batch)[0], shift[0], shift[1]))


def _member_loss(model: keras.Model, labels: Any, logits: Any, losses: Sequence[Any]) -> Any:
    """The compiled loss, plus the layers' own (L2) losses."""
    loss = model.loss(labels, logits)
    return loss + ops.sum(ops.stack(losses)) if losses else loss


def _totals(labels: Any, logits: Any, loss: Any) -> Any:
    """[loss sum, correct count] of one member's batch."""
    correct = ops.sum(ops.cast(ops.argmax(logits, axis=-1) == labels, "float32"))
    return ops.stack([loss * ops.cast(ops.shape(labels)[0], "float32"), correct])


def jax_member_step(model: keras.Model, state: tuple, images: Any, labels: Any, indices: Any) -> tuple[tuple, Any]:
    """One member's training step under JAX, as a pure function: (trainable, non-trainable, optimizer
    variables) and a batch of image indices in, the new variables and the batch's [loss sum, correct] out.

    `model` supplies the computation alone (its layers, loss and optimizer), so one model can stand for many
    members whose variables are stacked (benchmarks/groups.py vmaps and maps it over members).
    """
    import jax

    trainable, non_trainable, optimizer_variables = state
    x = ops.take(images, indices, axis=0)
    y = ops.take(labels, indices, axis=0)

    def scaled_loss(trainable: list, non_trainable: list) -> tuple[Any, tuple]:
        logits, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        loss = _member_loss(model, y, logits, losses)
        # Mixed float16 scales the loss (LossScaleOptimizer); its scale is one of the optimizer's variables.
        mapping = list(zip(model.optimizer.variables, optimizer_variables, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            scaled = model.optimizer.scale_loss(loss)
        return scaled, (loss, logits, non_trainable)

    (_, (loss, logits, non_trainable)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(trainable, non_trainable)
    trainable, optimizer_variables = model.optimizer.stateless_apply(optimizer_variables, grads, trainable)
    return (trainable, non_trainable, optimizer_variables), _totals(y, logits, loss)


def jax_variables(model: keras.Model) -> tuple[list, list, list]:
    """A model's (trainable, non-trainable, optimizer) variables, the state jax_member_step takes."""
    return model.trainable_variables, model.non_trainable_variables, model.optimizer.variables


class _JaxSteps(FusedSteps):
    def __init__(self, models: Sequence[keras.Model], images: np.ndarray, labels: np.ndarray):
        super().__init__(models, images, labels)
        self._state: dict[int, tuple[list, list, list]] = {}

    def _begin(self, members: tuple[int, ...]) -> None:
        for index in members:
            groups = jax_variables(self.models[index])
            self._state[index] = tuple([variable.value for variable in group] for group in groups)

    def _end(self, members: tuple[int, ...]) -> None:
        for index in members:
            for group, values in zip(jax_variables(self.models[index]), self._state.pop(index), strict=True):
                for variable, value in zip(group, values, strict=True):
                    variable.assign(value)

    def _compile_train_step(self, members: tuple[int, ...]) -> Any:
        import jax

        def step(states: list, images: Any, labels: Any, batches: Any) -> tuple[list, Any]:
            results = [
                jax_member_step(self.models[index], state, images, labels, batches[position])
                for position, (index, state) in enumerate(zip(members, states, strict=True))
            ]
            return [state for state, _ in results], ops.stack([totals for _, totals in results])

        compiled = jax.jit(step, donate_argnums=0)  # the old variables' buffers hold the new ones

        def run(images: Any, labels: Any, batches: Any) -> Any:
            states, totals = compiled([self._state[index] for index in members], images, labels, batches)
            self._state.update(zip(members, states, strict=True))
            return totals

        return run

    def _compile_forward(self, members: tuple[int, ...]) -> Any:
        import jax

        @jax.jit
        def forward(variables: list, images: Any, indices: Any, shift: Any) -> Any:
            outputs = []
            for position, (index, (trainable, non_trainable)) in enumerate(zip(members, variables, strict=True)):
                logits, _ = self.models[index].stateless_call(
                    trainable, non_trainable, shifted_images(images, indices[position], shift), training=False
                )
                outputs.append(ops.cast(logits, "float32"))
            return ops.stack(outputs)

        def run(images: Any, indices: Any, shift: Any) -> Any:
            variables = [
                (
                    [v.value for v in self.models[i].trainable_variables],
                    [v.value for v in self.models[i].non_trainable_variables],
                )
                for i in members
            ]
            return forward(variables, images, indices, shift)

        return run


class _TensorflowSteps(FusedSteps):
    def _compile_train_step(self, members: tuple[int, ...]) -> Any:
        import tensorflow as tf

        def member_step(model: keras.Model, images: Any, labels: Any, indices: Any) -> Any:
            x = ops.take(images, indices, axis=0)
            y = ops.take(labels, indices, axis=0)
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = _member_loss(model, y, logits, model.losses)
                scaled = model.optimizer.scale_loss(loss)
            model.optimizer.apply(tape.gradient(scaled, model.trainable_variables), model.trainable_variables)
            return _totals(y, logits, loss)

        def step(images: Any, labels: Any, batches: Any) -> Any:
            return ops.stack([member_step(self.models[i], images, labels, batches[p]) for p, i in enumerate(members)])

        return tf.function(step, jit_compile=all(self.models[i].jit_compile for i in members))

    def _compile_forward(self, members: tuple[int, ...]) -> Any:
        import tensorflow as tf

        def forward(images: Any, indices: Any, shift: Any) -> Any:
            return ops.stack(
                [
                    ops.cast(self.models[i](shifted_images(images, indices[p], shift), training=False), "float32")
                    for p, i in enumerate(members)
                ]
            )

        return tf.function(forward, jit_compile=all(self.models[i].jit_compile for i in members))


def fused_steps(models: Sequence[keras.Model], images: np.ndarray, labels: np.ndarray) -> FusedSteps:
    """The group's compiled steps for the Keras backend of this process."""
    backend = keras.backend.backend()
    if backend == "jax":
        return _JaxSteps(models, images, labels)
    if backend == "tensorflow":
        return _TensorflowSteps(models, images, labels)
    raise ValueError(f"members train under JAX or TensorFlow, not Keras' {backend!r} backend")
