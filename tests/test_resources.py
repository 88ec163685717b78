"""The resource plan (ensemble/resources.py) on cluster shapes alone, without Ray: which members train together,
what each group's worker asks for, whether some node can hold it, and how many groups train at once."""

from __future__ import annotations

import pytest

from ensemble.config import ConfigError, ResourcesConfig, load_config
from ensemble.plan import plan_members
from ensemble.resources import Nodes, check_fits, group_resources, group_size, parallel_groups, split_evenly

ONE_GPU = [{"CPU": 16, "GPU": 1}]
LAPTOP = [{"CPU": 2}]
# A head without a GPU, as cluster/aws-gpu.yaml starts it (its GPU workers from 0).
HEAD = [{"CPU": 4}]


@pytest.mark.parametrize(
    ("gpus_per_member", "per_worker", "nodes", "sizes"),
    [
        ("auto", "auto", [{"CPU": 16, "GPU": 1}], [10]),  # one GPU: gpu.yaml's 10 members are one group
        ("auto", "auto", [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}], [3, 3, 2, 2]),  # spread over 4 GPUs
        (0.25, "auto", [{"CPU": 16, "GPU": 1}], [4, 3, 3]),  # as many as the GPU fraction lets share one
        (1, "auto", [{"CPU": 16, "GPU": 1}], [1] * 10),  # a whole GPU each: none shares
        ("auto", "auto", [{"CPU": 2}], [10]),  # a CPU node: one group on its cores
        ("auto", "auto", [{"CPU": 2}, {"CPU": 2}], [5, 5]),  # CPU nodes: one group each
        ("auto", 1, [{"CPU": 16, "GPU": 1}], [1] * 10),  # by hand: each member alone
        ("auto", 4, [{"CPU": 16, "GPU": 1}], [4, 3, 3]),
    ],
)
def test_members_per_worker_auto_groups_the_members_that_share_a_device(
    gpus_per_member, per_worker, nodes, sizes
) -> None:
    resources = ResourcesConfig(gpus_per_member=gpus_per_member, members_per_worker=per_worker)
    plan = plan_members(load_config("configs/quickstart.yaml", ["ensemble.members=10"]).ensemble)
    groups = split_evenly(plan, group_size(resources, len(plan), Nodes(nodes)))
    assert [len(group) for group in groups] == sizes
    assert [spec.index for group in groups for spec in group] == list(range(10))


@pytest.mark.parametrize(
    ("resources", "size", "nodes", "asks"),
    [
        (ResourcesConfig(), 10, Nodes(ONE_GPU), {"CPU": 10, "GPU": 1}),  # gpu.yaml: one group, one GPU
        (ResourcesConfig(gpus_per_member=0.25), 4, Nodes(ONE_GPU), {"CPU": 4, "GPU": 1}),  # 4 quarters
        (ResourcesConfig(gpus_per_member=2), 1, Nodes(ONE_GPU), {"CPU": 1, "GPU": 2}),  # more than one GPU
        (ResourcesConfig(), 10, Nodes(LAPTOP), {"CPU": 2, "GPU": 0}),  # the members share a node's cores
        (ResourcesConfig(cpus_per_member=4), 3, Nodes(LAPTOP), {"CPU": 4, "GPU": 0}),  # a member's own ask
    ],
)
def test_a_groups_worker_asks_for_its_members_cpus_a_node_at_most_and_one_device(resources, size, nodes, asks):
    assert group_resources(resources, size, nodes) == asks


def test_a_worker_no_node_holds_waits_where_the_cluster_may_add_one_and_else_stops_in_one_line() -> None:
    assert check_fits({"CPU": 2, "GPU": 0}, Nodes(LAPTOP), "a member") is None
    with pytest.raises(ConfigError) as error:
        check_fits({"CPU": 1, "GPU": 1}, Nodes(LAPTOP), "a member")  # a cluster that adds no nodes
    assert str(error.value) == (
        "a member needs 1 CPU and 1 GPU on one node, but no node of this cluster has that (its nodes: 2 CPU, "
        "0 GPU); set resources.gpus_per_member to 0 or auto"
    )
    with pytest.raises(ConfigError, match=r"\(its nodes: 4 CPU, 0 GPU\); lower resources.cpus_per_member \(a node"):
        check_fits({"CPU": 16, "GPU": 0}, Nodes(HEAD), "a group of 16 members")
    needs = "a group of 8 members needs 8 CPU and 1 GPU on one node, but no node of this cluster has that (its nodes: "
    needs += "4 CPU, 0 GPU): it waits for the cluster's autoscaler to add one"
    assert check_fits({"CPU": 8, "GPU": 1}, Nodes(HEAD, grows=True), "a group of 8 members") == (
        f"{needs} (resources.autoscaling is true)"
    )
    assert check_fits({"CPU": 8, "GPU": 1}, Nodes(HEAD, grows=None), "a group of 8 members") == (
        f"{needs}, for resources.wait_seconds with nothing running (resources.autoscaling=true: for as long as it "
        "takes; false: stop at once)"
    )


@pytest.mark.parametrize(
    ("resources", "asks", "cluster", "count", "at_once"),
    [
        (ResourcesConfig(), {"CPU": 1, "GPU": 0.5}, {"CPU": 16, "GPU": 1}, 5, 2),  # two halves of a GPU
        (ResourcesConfig(), {"CPU": 4, "GPU": 0}, {"CPU": 16}, 10, 4),  # the CPUs bound it
        (ResourcesConfig(), {"CPU": 1, "GPU": 0}, {"CPU": 16}, 3, 3),  # no more than there are groups
        (ResourcesConfig(), {"CPU": 1, "GPU": 1}, {"CPU": 4}, 3, 1),  # on nodes the autoscaler adds: one to start
        (ResourcesConfig(max_parallel_members=1), {"CPU": 1, "GPU": 0}, {"CPU": 16}, 3, 1),  # the config's cap
    ],
)
def test_groups_train_at_once_as_many_as_the_cluster_holds_or_the_config_allows(
    resources, asks, cluster, count, at_once
) -> None:
    assert parallel_groups(resources, asks, cluster, count) == at_once
