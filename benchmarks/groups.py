"""Member groups: K members trained together in one compiled program, against the same work one member at a time.

On the same K members (all at augmentation strength 1) and the same batches, in alternating rounds:
- one after another (every row's baseline): one member's own step, the package's one-member program that a
  member in a worker of its own runs, K times over on the K members' batches: the work of K members trained
  one after another, at the cost of one compile;
- unrolled: the K members' steps unrolled in one FusedSteps.train_epoch call (ensemble/fused.py), as a group
  trains;
- vmapped (JAX only): ensemble.fused.jax_member_step, jax.vmap-ed over the K members' stacked variables
  (trainable, non-trainable with the augmentation's random state, and the optimizer's), jitted;
- mapped (JAX only): the same step under jax.lax.map over the stacked members: one member at a time inside one
  program, which does not grow with K.
`group_rows` yields each K's rows as soon as they are measured, largest K first; `setting_rows` yields the
largest group's at other batch sizes and precisions. Each row gives the aggregate img/s, the seconds its
program and the baseline's took to compile (first call beyond a timed round), and on a known GPU the share of
its bf16 peak that the rate reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import keras
import numpy as np

from benchmarks import harness
from benchmarks.harness import Row
from ensemble.config import Config
from ensemble.fused import FusedSteps, fused_steps, jax_member_step, jax_variables

BASELINE = "one after another"
VARIANTS = {
    "unrolled": "unrolled in one step (the package's)",
    "vmapped": "jax.vmap over the stacked members",
    "mapped": "jax.lax.map over the stacked members",
}


def stacked_trainer(fused: FusedSteps, models: list[keras.Model], batches: np.ndarray, how: str) -> Callable[[], None]:
    """JAX: the members' steps as one program over their stacked variables, on `batches` (members, steps, batch).

    `how` is "vmapped" (jax.vmap: each layer batched over the members) or "mapped" (jax.lax.map: a loop over
    the members inside the program). The first model stands for all: they share their layers' shapes.
    """
    import jax
    import jax.numpy as jnp

    template = models[0]

    def values(model: keras.Model) -> tuple[list, ...]:
        return tuple([variable.value for variable in group] for group in jax_variables(model))

    def one(state: tuple, images: Any, labels: Any, indices: Any) -> tuple[tuple, Any]:
        return jax_member_step(template, state, images, labels, indices)

    def mapped(states: tuple, images: Any, labels: Any, indices: Any) -> tuple[tuple, Any]:
        return jax.lax.map(lambda pair: one(pair[0], images, labels, pair[1]), (states, indices))

    step = jax.vmap(one, in_axes=(0, None, None, 0)) if how == "vmapped" else mapped
    compiled = jax.jit(step, donate_argnums=0)
    state = [jax.tree.map(lambda *member_values: jnp.stack(member_values), *map(values, models))]
    indices = jnp.asarray(batches, jnp.int32)

    def train() -> None:
        totals: Any = 0
        for index in range(indices.shape[1]):
            state[0], step_totals = compiled(state[0], fused.images, fused.labels, indices[:, index])
            totals = totals + step_totals
        np.asarray(totals)  # waits for the last step, as train_epoch does

    return train


def candidates_for(k: int, fused: FusedSteps, batches: np.ndarray) -> dict[str, Callable[[], object]]:
    """The baseline and every variant this backend has, for the first k of the group's members."""
    candidates: dict[str, Callable[[], object]] = {
        BASELINE: lambda: [fused.train_epoch((0,), batches[i : i + 1]) for i in range(k)],
        "unrolled": lambda: fused.train_epoch(tuple(range(k)), batches[:k]),
    }
    if keras.backend.backend() == "jax":
        candidates |= {how: stacked_trainer(fused, fused.models[:k], batches[:k], how) for how in ("vmapped", "mapped")}
    return candidates


def measured_rows(
    label: str, candidates: dict[str, Callable[[], object]], images: int, rounds: int, device: str, peak: float | None
) -> list[Row]:
    """Rows of every variant against the baseline, each candidate training `images` per round; `peak` is the
    images per second at the GPU's bf16 peak (images_per_peak)."""
    first: dict[str, float] = {}
    seconds = harness.alternate(candidates, rounds, first)
    rates = {name: harness.median_rate(images, seconds[name]) for name in candidates}
    compiling = {name: round(harness.first_call_excess(first[name], seconds[name]), 2) for name in candidates}
    fastest = max(rates, key=rates.__getitem__)
    rows = []
    for kind in [name for name in candidates if name != BASELINE]:
        share = f"; {100 * rates[kind] / peak:.1f}% of the bf16 peak" if peak else ""
        note = (
            f"baseline: the same work one member at a time (one member's step); median of {rounds} rounds; compiling "
            f"{compiling[kind]:.1f} s (baseline {compiling[BASELINE]:.1f} s: its program compiles for the first row "
            f"of a group); fastest: {fastest}{share}"
        )
        extra = {"rates": rates, "compile_seconds": compiling, "fastest": fastest, "round_seconds": seconds[kind]}
        rows.append(
            Row(f"{label}: {VARIANTS[kind]}, aggregate", "img/s", device, rates[BASELINE], rates[kind], note, extra)
        )
    return rows


def images_per_peak(model: keras.Model, gpu: str | None) -> float | None:
    """Images per second that would reach the GPU's bf16 peak (None where the peak is unknown)."""
    peak = harness.peak_tflops(gpu, "mixed_bfloat16")
    return peak * 1e12 / (harness.TRAINING_FLOPS_PER_FORWARD * harness.forward_flops(model)) if peak else None


def members_together(
    images: np.ndarray, labels: np.ndarray, config: Config, k: int, steps: int, gpu: str | None
) -> tuple[FusedSteps, np.ndarray, float | None]:
    """k members of `config` (strength 1) in one FusedSteps over the images, random batches (k, steps, batch)
    for them, and the images per second at the GPU's bf16 peak (images_per_peak)."""
    members = harness.new_members(config, harness.pool_data(images, labels), harness.specs(*[1.0] * k))
    fused = fused_steps([member.model for member in members], images, labels)
    batches = harness.random_batches(k, steps, config.train.batch_size, len(images))
    return fused, batches, images_per_peak(fused.models[0], gpu)


def label(config: Config, k: int) -> str:
    train = config.train
    return f"member groups of {k} (batch {train.batch_size}, {train.precision}, width {config.model.width:g})"


def group_rows(
    images: np.ndarray,
    labels: np.ndarray,
    config: Config,
    counts: tuple[int, ...],
    steps: int,
    rounds: int,
    device: str,
    gpu: str | None = None,
) -> Iterator[Row]:
    """Each K of `counts`, largest first, at the config's batch size and precision."""
    harness.log(f"member groups of {', '.join(map(str, counts))}: {rounds} rounds of {steps} steps each")
    fused, batches, peak = members_together(images, labels, config, max(counts), steps, gpu)
    for k in sorted(counts, reverse=True):
        images_per_round = k * steps * config.train.batch_size
        yield from measured_rows(
            label(config, k), candidates_for(k, fused, batches), images_per_round, rounds, device, peak
        )


def setting_rows(
    images: np.ndarray,
    labels: np.ndarray,
    config: Config,
    k: int,
    settings: tuple[tuple[int, str], ...],
    steps: int,
    rounds: int,
    device: str,
    gpu: str | None = None,
) -> Iterator[Row]:
    """The group of k at each (batch size, precision) of `settings`, with about the same images per round."""
    for batch, precision in settings:
        changed = replace(config, train=replace(config.train, batch_size=batch, precision=precision))
        batch_steps = max(1, steps * config.train.batch_size // batch)
        harness.log(f"a group of {k} at batch {batch}, {precision}: {rounds} rounds of {batch_steps} steps")
        fused, batches, peak = members_together(images, labels, changed, k, batch_steps, gpu)
        images_per_round = k * batch_steps * batch
        yield from measured_rows(
            label(changed, k), candidates_for(k, fused, batches), images_per_round, rounds, device, peak
        )
