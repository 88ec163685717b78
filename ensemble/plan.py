"""Who each ensemble member is: its seeds and augmentation strength, derived from the config alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ensemble.config import EnsembleConfig


@dataclass(frozen=True)
class MemberSpec:
    index: int
    seed: int  # weights, shuffling and augmentation draws
    split_seed: int  # its train/validation split of the pool
    strength: float  # scale on every augmentation range
    round: int = 0  # ensemble.pseudo_label: 0, then each round trains the members again on more images

    @property
    def name(self) -> str:
        return f"member-{self.index:02d}" + (f"-round-{self.round}" if self.round else "")


def plan_members(config: EnsembleConfig) -> list[MemberSpec]:
    """Independent seeds for every member from one base seed; strengths spread evenly over [min, max]."""
    children = np.random.SeedSequence(config.seed).spawn(config.members)
    if config.members == 1:
        strengths = [(config.strength_min + config.strength_max) / 2]
    else:
        strengths = np.linspace(config.strength_min, config.strength_max, config.members).tolist()
    specs = []
    for index, (child, strength) in enumerate(zip(children, strengths, strict=True)):
        seed, split_seed = (int(value) for value in child.generate_state(2) % 2**31)
        specs.append(MemberSpec(index, seed, split_seed, round(float(strength), 6)))
    return specs
