from __future__ import annotations

from pathlib import Path

import pytest

from ensemble.config import ConfigError, load_config

from .conftest import REPO


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        config = load_config(path, ["data.dir=kaggle-data"])  # --data-dir sets this for the Kaggle configs
        assert config.output_dir == f"runs/{path.stem}"


def test_kaggle_source_needs_a_directory() -> None:
    assert "config key 'data.dir' is required" in message(REPO / "configs" / "reference.yaml", [])


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text("train:\n  max_epochs: 4\nensemble:\n  members: 2\n")
    config = load_config(path, ["train.max_epochs=7", "model.width=0.5", "resources.gpus_per_member=1"])
    assert config.train.max_epochs == 7 and config.ensemble.members == 2
    assert config.model.width == 0.5 and config.resources.gpus_per_member == 1.0
    assert config.train.batch_size == 64  # untouched keys keep the reference defaults


def message(path: Path | None, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_unknown_key_in_file_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  max_epoch: 4\n")
    assert message(path, []) == f"{path}: unknown config key 'train.max_epoch' (did you mean 'train.max_epochs'?)"


def test_unknown_section() -> None:
    assert "unknown config key 'trainer'" in message(None, ["trainer.max_epochs=3"])


def test_mistyped_value() -> None:
    assert "config key 'train.batch_size' expects <class 'int'>, got 'big'" in message(None, ["train.batch_size=big"])


def test_out_of_range_value() -> None:
    assert "config key 'data.holdout_fraction' must be in [0, 1)" in message(None, ["data.holdout_fraction=1.5"])


def test_override_needs_a_value() -> None:
    assert "expected KEY=VALUE" in message(None, ["train.max_epochs"])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    assert "config file not found" in message(tmp_path / "nope.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert "not valid YAML" in message(bad, [])


def test_an_override_whose_value_is_not_yaml_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.schedule=[cosine"])
    assert str(caught.value).startswith("--set 'train.schedule=[cosine': the value is not valid YAML (")


def test_xla_off_is_refused_where_it_would_be_ignored() -> None:
    """Under JAX the package's training step is always XLA-compiled: jit_compile false would change nothing."""
    with pytest.raises(ConfigError, match=r"^config key 'train.jit_compile' must not be false under train.backend jax"):
        load_config(None, ["train.backend=jax", "train.jit_compile=false"])
    assert load_config(None, ["train.jit_compile=false"]).train.jit_compile is False


def test_folds_replace_the_validation_fraction_said_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'data.folds' gives each member its fold to validate on: set "):
        load_config(None, ["data.folds=5"])  # val_fraction's default, 0.2, is still set
    with pytest.raises(ConfigError, match=r"^config key 'data.folds' must be 0 \(off\) or at least 2$"):
        load_config(None, ["data.folds=1", "data.val_fraction=0"])
    # Folds validate: no fixed epoch budget is needed to stop early on them.
    assert load_config(None, ["data.folds=5", "data.val_fraction=0", "train.patience=2"]).data.folds == 5
