"""Member groups (ensemble/train.py, ensemble/fused.py): members trained together stay the members they would be alone.

In-process, on real digits, under this process's Keras backend (tests/test_backends.py reruns this file
under the other one). Through Ray: tests/test_end_to_end.py (a group of three) and tests/test_fault_tolerance.py
(a group's worker killed mid-run).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from ensemble import train
from ensemble.config import Config, load_config
from ensemble.data import EnsembleData, prepare
from ensemble.plan import plan_members
from ensemble.rundir import write_checkpoint
from ensemble.train import GroupTrainer, Member, epoch_batches, new_member
from ensemble.worker import checkpoint_files, restore_members

MEMBERS = 3
WARN_BYTES = "jax_captured_constants_warn_bytes"  # JAX warns of constants this large captured in a program


@pytest.fixture(scope="module")
def setup() -> tuple[Config, EnsembleData]:
    # The quickstart's 3 folds of 1,050 pool digits: each member trains on 700, 10 steps an epoch, so BatchNorm's
    # moving statistics must follow the batches at once (at the quickstart's 0.9 validation sits at chance).
    overrides = ["data.max_train_rows=1200", "train.max_epochs=3", "train.patience=2", f"ensemble.members={MEMBERS}"]
    overrides.append("model.bn_momentum=0.6")
    config = load_config("configs/quickstart.yaml", overrides)
    return config, prepare(config.data)


def fresh(config: Config, data: EnsembleData) -> list[Member]:
    return [new_member(config, spec, data) for spec in plan_members(config.ensemble)]


def test_a_group_takes_the_same_first_step_as_each_member_alone(setup) -> None:
    config, data = setup
    together, alone = fresh(config, data), fresh(config, data)
    group = GroupTrainer(together, config, data)
    batches = np.stack([epoch_batches(member, 0, config.train.batch_size)[:1] for member in together])
    fused = group.fused.train_epoch(tuple(range(MEMBERS)), batches)
    for position, member in enumerate(alone):
        solo = GroupTrainer([member], config, data).fused.train_epoch((0,), batches[position : position + 1])
        # The same loss and the same correct count on the same first batch: same weights, same augmentation draws.
        np.testing.assert_allclose(fused[position], solo[0], rtol=1e-4)
    # Each member drew its own batch (its own split and shuffle), and the members started from different weights.
    assert len({tuple(batch.ravel()) for batch in batches}) == MEMBERS
    assert len({round(loss, 3) for loss, _ in fused}) == MEMBERS


def test_every_set_larger_than_a_chunk_shares_one_forward_program_with_no_images_inside(setup, monkeypatch) -> None:
    """Validation, holdout and test sets of any size over EVAL_BATCH_SIZE: one compiled forward, the same logits.

    Under JAX, the image array is an argument of each program, never a constant captured into it.
    """
    config, data = setup
    monkeypatch.setattr(train, "EVAL_BATCH_SIZE", 64)
    group = GroupTrainer(fresh(config, data)[:2], config, data)
    sizes = (100, 150, 65)
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:
        if keras.backend.backend() == "jax":
            import jax

            # The group's images are some 2 MB: any of them captured would be over this.
            restore.callback(jax.config.update, WARN_BYTES, jax.config.jax_captured_constants_warn_bytes)
            jax.config.update(WARN_BYTES, 500_000)
            warnings.filterwarnings("error", message="A large amount of constants were captured")
        logits = [train.chunked_logits(group.fused, (0, 1), np.tile(np.arange(n), (2, 1))) for n in sizes]
        whole = group.fused.logits((0, 1), np.tile(np.arange(150), (2, 1)))  # one call of 150: no chunks, no padding
        group.fused.train_epoch((0, 1), np.stack([epoch_batches(member, 0, 32)[:1] for member in group.members]))
    # The three chunked sets share the first program; the one call of 150 images needs a second.
    assert [(entry["program"], entry["members"]) for entry in group.fused.compiles] == [
        ("forward", 2),
        ("forward", 2),
        ("train step", 2),
    ]
    assert [len(member_logits[0]) for member_logits in logits] == list(sizes)
    np.testing.assert_allclose(logits[1], whole, rtol=1e-4, atol=1e-4)


def test_a_group_trains_the_members_three_solo_runs_would(setup) -> None:
    config, data = setup
    together = fresh(config, data)
    GroupTrainer(together, config, data).train(lambda trained: None)
    for member, alone in zip(together, fresh(config, data), strict=True):
        GroupTrainer([alone], config, data).train(lambda trained: None)
        assert member.state.epochs == alone.state.epochs and member.state.best_epoch == alone.state.best_epoch
        # Within noise: 350 validation digits, so a few digits at most (the same weights up to float rounding).
        grouped, solo = member.state.history[-1]["val_accuracy"], alone.state.history[-1]["val_accuracy"]
        assert abs(grouped - solo) <= 0.02, (member.spec.name, grouped, solo)
        assert grouped > 0.3  # chance is 0.1; 10 steps an epoch, not yet good


def test_a_member_that_stops_early_keeps_its_best_epoch_while_the_others_train_on(setup, tmp_path: Path) -> None:
    config, data = setup
    members = fresh(config, data)
    stopping = members[1]
    weights: dict[str, list[np.ndarray]] = {}

    def on_epoch(trained: list[Member]) -> None:
        epoch = trained[0].state.epochs
        if epoch == 1:
            weights["best"] = stopping.model.get_weights()
            # As if its validation loss had not improved for patience - 1 epochs: epoch 2 cannot beat it.
            stopping.state.best_loss, stopping.state.wait = 0.0, config.train.patience - 1
        elif epoch == 2:
            weights["stopped"] = stopping.model.get_weights()
        else:
            assert stopping not in trained
            weights["while the others trained"] = stopping.model.get_weights()

    trained = GroupTrainer(members, config, data)
    trained.train(on_epoch)
    assert stopping.state.stopped and stopping.state.epochs == 2 and stopping.state.best_epoch == 1
    assert all(member.state.epochs == 3 for member in members if member is not stopping)
    steps = len(epoch_batches(stopping, 0, config.train.batch_size))
    assert int(stopping.model.optimizer.iterations.numpy()) == 2 * steps  # it left the group's step
    for stopped, later in zip(weights["stopped"], weights["while the others trained"], strict=True):
        np.testing.assert_array_equal(stopped, later)
    # It ends with its best epoch's weights, BatchNorm statistics included.
    for final, best in zip(stopping.model.get_weights(), weights["best"], strict=True):
        np.testing.assert_array_equal(final, best)

    # Saved as a group checkpoint holds them and restored (a crash before the group's final report): no member
    # trains again, the stopped one included, and each predicts with its best weights.
    write_checkpoint(tmp_path, False, {member.spec.name: checkpoint_files(member) for member in members})
    specs = [member.spec for member in members]
    restored, restarted = restore_members(config, specs, data, tmp_path, "checkpoint")
    assert restarted == {}
    group = GroupTrainer(restored, config, data)
    group.train(lambda trained: pytest.fail(f"{trained[0].spec.name} trained again"))
    for final, best in zip(restored[1].model.get_weights(), weights["best"], strict=True):
        np.testing.assert_array_equal(final, best)
    holdout = group.predict("holdout")
    assert holdout.shape == (MEMBERS, len(data.holdout_labels), 10)
    np.testing.assert_allclose(holdout, trained.predict("holdout"), atol=1e-5)
    assert all((logits.argmax(1) == data.holdout_labels).mean() > 0.3 for logits in holdout[[0, 2]])

    # A member whose model file was cut short (a copy interrupted) trains again from scratch, saying which file.
    model_file = tmp_path / "member-01" / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    again, restarted = restore_members(config, specs, data, tmp_path, "checkpoint")
    assert list(restarted) == ["member-01"]
    assert restarted["member-01"].startswith("checkpoint/member-01/model.keras cannot be read (")
    assert [member.state.epochs for member in again] == [member.state.epochs for member in restored[:1]] + [0] + [
        restored[2].state.epochs
    ]
