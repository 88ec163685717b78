"""The backend-sensitive tests, again under each Keras backend this process does not run.

Keras picks its backend once per process (KERAS_BACKEND, read on first import), so the other
backend gets a pytest process of its own. The quickstart runs under each backend in
tests/test_end_to_end.py; members' workers get their backend from the run's config, not from here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import keras
import pytest

from .conftest import REPO

FIRST_STEP = "test_a_group_takes_the_same_first_step_as_each_member_alone"
ONE_FORWARD = "test_every_set_larger_than_a_chunk_shares_one_forward_program_with_no_images_inside"
OTHER_BACKENDS = [name for name in ("tensorflow", "jax") if name != keras.backend.backend()]


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_augmentation_test_time_augmentation_and_a_group_step_under(backend: str) -> None:
    # The group's first step against each member's alone: the fused step of that backend (the other group
    # tests train for epochs, which JAX compiles slowly on a CPU).
    tests = ["tests/test_augment.py", f"tests/test_groups.py::{FIRST_STEP}", f"tests/test_groups.py::{ONE_FORWARD}"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-n", "0"],
        cwd=REPO,
        env=os.environ | {"KERAS_BACKEND": backend},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ passed(, \d+ warnings?)? in [\d.]+s( \(.*\))? ?=*", summary), summary
