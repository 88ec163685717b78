"""The resource plan of a run, pure arithmetic on the cluster's nodes (resources.* in the config): no Ray here.

- `member_resources`: what one member asks for (`gpus_per_member: auto` is a GPU where the cluster has one).
- `group_size` and `split_evenly`: which members train together in one worker (resources.members_per_worker).
- `MemberGroup`, `group_resources` and `plan_groups`: each group of members, and what its worker asks for.
- `check_fits`: a group that no node holds waits for the cluster's autoscaler, or stops the run at once.
- `parallel_groups`: how many groups train at once.

`Nodes` is what ensemble/launch.py reads of a live cluster; tests/test_resources.py plans cluster shapes without one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from ensemble.config import ConfigError, ResourcesConfig
from ensemble.plan import MemberSpec


@dataclasses.dataclass(frozen=True)
class Nodes:
    """The nodes a cluster has, as Ray resource dicts, and whether it adds nodes for what waits: True, False, or
    None where the run cannot know (a cluster it joined; resources.autoscaling)."""

    alive: list[dict[str, float]]
    grows: bool | None = False

    @property
    def total(self) -> dict[str, float]:
        """The resources of the alive nodes together."""
        keys = {key for node in self.alive for key in node}
        return {key: sum(node.get(key, 0.0) for node in self.alive) for key in keys}

    def largest(self, key: str) -> float:
        return max((node.get(key, 0.0) for node in self.alive), default=0.0)


def member_resources(config: ResourcesConfig, cluster: dict[str, float]) -> dict[str, float]:
    """Ray resources of one member; `gpus_per_member: auto` means 1 GPU if the cluster has any."""
    gpus = config.gpus_per_member
    if gpus == "auto":
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    return {"CPU": config.cpus_per_member, "GPU": gpus}


def group_size(config: ResourcesConfig, members: int, nodes: Nodes) -> int:
    """How many members train together in one worker (resources.members_per_worker).

    `auto`: the members that share a device. With GPUs, members are spread evenly over the cluster's GPUs
    (gpus_per_member auto), or as many share a GPU as its fraction allows (gpus_per_member 0.25: 4), or
    none does (1 or more). On CPUs, members are spread evenly over the nodes, each group on one node's CPUs.
    """
    if config.members_per_worker != "auto":
        return min(members, int(config.members_per_worker))
    gpus = config.gpus_per_member
    if gpus == "auto":
        devices = math.floor(nodes.total.get("GPU", 0))
        if devices:
            return math.ceil(members / devices)
        gpus = 0.0
    if gpus >= 1:
        return 1
    if gpus > 0:
        return min(members, math.floor(1 / gpus + 1e-9))
    devices = len([node for node in nodes.alive if node.get("CPU", 0) >= config.cpus_per_member]) or 1
    return math.ceil(members / devices)


def group_resources(config: ResourcesConfig, size: int, nodes: Nodes) -> dict[str, float]:
    """What the worker of a group of `size` members asks for: each member's CPUs, as many as one node has at
    most, and one device: its members' share of a GPU, a whole GPU at most (a group trains on one device)."""
    member = member_resources(config, nodes.total)
    cpus = max(member["CPU"], min(size * member["CPU"], nodes.largest("CPU")))
    gpus = member["GPU"] if member["GPU"] >= 1 else min(1.0, size * member["GPU"])
    return {"CPU": cpus, "GPU": gpus}


def split_evenly(specs: list[MemberSpec], size: int) -> list[list[MemberSpec]]:
    """Members in order, in groups of at most `size`, as even as can be: 10 in groups of at most 4 make 4, 3, 3."""
    count = math.ceil(len(specs) / size)
    small, larger = divmod(len(specs), count)
    sizes = [small + 1] * larger + [small] * (count - larger)
    starts = itertools.accumulate(sizes[:-1], initial=0)
    return [specs[start : start + length] for start, length in zip(starts, sizes, strict=True)]


@dataclasses.dataclass(frozen=True)
class MemberGroup:
    """Members that train together: in one worker, on one device, in one compiled program (ensemble/train.py).

    Its name names its Ray Train run (members/<name>/); `resources` is what its worker asks for."""

    name: str
    members: list[MemberSpec]
    resources: dict[str, float]


def plan_groups(members: list[list[MemberSpec]], config: ResourcesConfig, nodes: Nodes) -> list[MemberGroup]:
    """Each list of members as a named group, with what its worker asks for."""
    return [
        MemberGroup(
            f"group-{index:02d}" + (f"-round-{group[0].round}" if group[0].round else ""),
            group,
            group_resources(config, len(group), nodes),
        )
        for index, group in enumerate(members)
    ]


def check_fits(resources: dict[str, float], nodes: Nodes, what: str) -> str | None:
    """Whether some node holds `resources` (one worker's), where Ray would otherwise wait for such a node in
    silence: None if one does; else, on a cluster that may add one, the line that says the worker waits for it;
    else a ConfigError, at once. `what` names who asks (a member, a group of 3 members)."""
    if any(all(node.get(key, 0.0) >= amount for key, amount in resources.items()) for node in nodes.alive):
        return None
    shapes = sorted((node.get("CPU", 0.0), node.get("GPU", 0.0)) for node in nodes.alive)
    needs = (
        f"{what} needs {resources['CPU']:g} CPU and {resources['GPU']:g} GPU on one node, but no node of this "
        f"cluster has that (its nodes: {'; '.join(f'{cpus:g} CPU, {gpus:g} GPU' for cpus, gpus in shapes)})"
    )
    if nodes.grows:
        return f"{needs}: it waits for the cluster's autoscaler to add one (resources.autoscaling is true)"
    if nodes.grows is None:
        return (
            f"{needs}: it waits for the cluster's autoscaler to add one, for resources.wait_seconds with nothing "
            "running (resources.autoscaling=true: for as long as it takes; false: stop at once)"
        )
    if resources["GPU"] > nodes.largest("GPU"):
        largest = nodes.largest("GPU")
        change = (
            "set resources.gpus_per_member to 0 or auto"
            if largest == 0
            else f"lower resources.gpus_per_member (a node has {largest:g} GPU at most)"
        )
    else:
        change = f"lower resources.cpus_per_member (a node has {nodes.largest('CPU'):g} CPU at most)"
    raise ConfigError(f"{needs}; {change}")


def parallel_groups(config: ResourcesConfig, resources: dict[str, float], cluster: dict[str, float], count: int) -> int:
    """How many of `count` groups train at once: the config's cap on members, else as many as the cluster holds."""
    if config.max_parallel_members is not None:
        return config.max_parallel_members
    fits = [math.floor(cluster.get(name, 0) / amount + 1e-9) for name, amount in resources.items() if amount > 0]
    return max(1, min([count, *fits]))
