"""Member groups: K members trained together in one compiled step, against the same K one after another.

Candidates, on the same K members (all at augmentation strength 1) and the same batches:
- one after another (the baseline): each member alone, in its own one-member step of the package's trainer;
- fused: the K members' steps unrolled in one FusedGroup.train_epoch call (ensemble/fused.py), as a group trains;
- vmapped (JAX only): one member's stateless step, jax.vmap-ed over the K members' stacked variables, jitted.
They run in alternating rounds; each row gives the aggregate img/s of K members, and on a known GPU the share of
its bf16 peak that rate reaches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from benchmarks import harness
from benchmarks.harness import Row
from ensemble.config import Config
from ensemble.fused import FusedGroup, fused_group


def vmapped_trainer(fused: FusedGroup, models: list[keras.Model], batches: np.ndarray) -> Callable[[], None]:
    """JAX: the members' steps as one batched step, over `batches` (members, steps, batch).

    The step is the package's own for one member (ensemble.fused's, on the first model as a template), vmapped
    over the members' variables stacked along a new first axis: trainable, non-trainable (with the
    augmentation's random state, so each member draws its own) and the optimizer's.
    """
    import jax
    import jax.numpy as jnp

    template = models[0]

    def variables(model: keras.Model) -> tuple[list, list, list]:
        groups = model.trainable_variables, model.non_trainable_variables, model.optimizer.variables
        return tuple([variable.value for variable in group] for group in groups)

    state = [jax.tree.map(lambda *values: jnp.stack(values), *(variables(model) for model in models))]
    step = jax.jit(jax.vmap(lambda state, indices: fused._member_step(template, state, indices)), donate_argnums=0)
    indices = jnp.asarray(batches, jnp.int32)

    def train() -> None:
        totals: Any = 0
        for index in range(indices.shape[1]):
            state[0], step_totals = step(state[0], indices[:, index])
            totals = totals + step_totals
        np.asarray(totals)  # waits for the last step, as train_epoch does

    return train


def group_rows(
    images: np.ndarray,
    labels: np.ndarray,
    config: Config,
    counts: tuple[int, ...],
    steps: int,
    rounds: int,
    device: str,
    gpu: str | None = None,
) -> list[Row]:
    batch, largest = config.train.batch_size, max(counts)
    harness.log(f"member groups of {', '.join(map(str, counts))}: {rounds} rounds of {steps} steps each")
    members = harness.new_members(config, harness.pool_data(images, labels), harness.specs(*[1.0] * largest))
    models = [member.model for member in members]
    fused = fused_group(models, images, labels)
    batches = harness.random_batches(largest, steps, batch, len(images))
    kinds = {"fused": "fused in one step"}
    candidates = {f"alone {i}": lambda i=i: fused.train_epoch((i,), batches[i : i + 1]) for i in range(largest)}
    candidates |= {f"fused {k}": lambda k=k: fused.train_epoch(tuple(range(k)), batches[:k]) for k in counts}
    if keras.backend.backend() == "jax":
        kinds["vmapped"] = "vmapped (jax.vmap of one member's step)"
        candidates |= {f"vmapped {k}": vmapped_trainer(fused, models[:k], batches[:k]) for k in counts}
    seconds = harness.alternate(candidates, rounds)
    flops = harness.TRAINING_FLOPS_PER_FORWARD * harness.forward_flops(models[0])  # per image
    peak = harness.peak_tflops(gpu, "mixed_bfloat16")
    rows = []
    for k in counts:
        # One after another: the first k members' own steps, timed in the same rounds, end to end.
        sequential = [sum(seconds[f"alone {i}"][r] for i in range(k)) for r in range(rounds)]
        rates = {"one after another": harness.median_rate(k * steps * batch, sequential)}
        rates |= {kind: harness.median_rate(k * steps * batch, seconds[f"{kind} {k}"]) for kind in kinds}
        fastest = max(rates, key=rates.__getitem__)
        where = f"{steps} steps each, width {config.model.width:g}, median of {rounds} rounds; fastest: {fastest}"
        for kind, description in kinds.items():
            share = f"; {100 * rates[kind] * flops / (peak * 1e12):.1f}% of the bf16 peak" if peak else ""
            note = f"baseline: the same {k} one after another, each in its own one-member step; {where}{share}"
            extra = {"rates": rates, "fastest": fastest, "round_seconds": seconds[f"{kind} {k}"]}
            name = f"member groups of {k}: {description}, aggregate"
            rows.append(Row(name, "img/s", device, rates["one after another"], rates[kind], note, extra))
    return rows
