"""The cluster definitions in cluster/: valid for the Ray and KubeRay they target, and wired to this project.

Offline: the launcher configs go through the checks `ray up` makes before it contacts a cloud (Ray's JSON
schema, after merging the provider's defaults), and the entrypoints through this project's own CLI parser
and config loader.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

# Private, but it is what `ray up` runs first; it only reads Ray's bundled defaults.yaml files.
from ray.autoscaler._private.util import prepare_config, validate_config

from ensemble.config import Config, load_config
from ensemble.run import parse_args

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = {"aws-gpu.yaml": "aws", "gcp-gpu.yaml": "gcp"}
# Where the launcher configs bind-mount the shared file system inside the Ray containers.
LAUNCHER_SHARED_DIR = "/mnt/shared"
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def image_ray_minor(image: str) -> str:
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+)\.\d+(-py\d+)?(-gpu)?", image)
    assert match, f"{image} is not a rayproject/ray:X.Y.Z[-pyNN][-gpu] image"
    return match.group(1)


def gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in config["available_node_types"].items() if spec["resources"].get("GPU", 0)}


def entrypoint_config(command: str) -> tuple[Any, Config]:
    """Parse a `python -m ensemble.run ...` command the way ensemble.run's main() does."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "ensemble.run"]
    args = parse_args(argv[3:])
    overrides = [*args.set, {"data": {"source": "kaggle", "dir": args.data_dir}}, {"output_dir": args.output_dir}]
    return args, load_config(REPO / args.config, overrides)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_validation(name: str) -> None:
    config = load(name)
    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(config))


BREAKAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown top-level key": lambda config: config.update(bogus_key=True),
    "no provider": lambda config: config.pop("provider"),
    "node type without node_config": lambda config: next(iter(gpu_worker_types(config).values())).pop("node_config"),
    # Fractional GPUs belong in resources.gpus_per_member; a node declares whole ones.
    "fractional GPU count": lambda config: next(iter(gpu_worker_types(config).values()))["resources"].update(GPU=0.5),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_ray_validation_rejects_a_broken_copy(name: str, breakage: str) -> None:
    config = copy.deepcopy(load(name))
    BREAKAGES[breakage](config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_runs_members_on_autoscaled_gpu_workers(name: str) -> None:
    config = prepare_config(load(name))
    assert config["provider"]["type"] == LAUNCHER_CONFIGS[name]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and not head["resources"].get("GPU")  # no member lands on the head
    workers = gpu_worker_types(config)
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["min_workers"] == 0 and 1 <= worker["max_workers"] <= config["max_workers"]
    reference = load_config(REPO / "configs" / "reference.yaml", ["data.dir=unused"])
    assert worker["resources"]["CPU"] >= reference.resources.cpus_per_member


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_installs_the_project(name: str) -> None:
    config = prepare_config(load(name))  # merges setup_commands into the head's and the workers' lists
    assert config["file_mounts"] == {"~/digit-ensemble": "."}
    assert 'pip install -e "$HOME/digit-ensemble"' in config["head_setup_commands"]
    assert 'pip install -e "$HOME/digit-ensemble[gpu]"' in config["worker_setup_commands"]
    assert "gpu" in importlib.metadata.metadata("digit-ensemble").get_all("Provides-Extra")


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_containers_match_installed_ray_and_see_shared_storage(name: str) -> None:
    docker = load(name)["docker"]
    assert image_ray_minor(docker["head_image"]) == image_ray_minor(docker["worker_image"]) == RAY_MINOR
    assert docker["worker_image"].endswith("-gpu")
    assert f"-v {LAUNCHER_SHARED_DIR}:{LAUNCHER_SHARED_DIR}" in docker["run_options"]


def test_gcp_gpu_workers_attach_a_gpu() -> None:
    (worker,) = gpu_worker_types(load("gcp-gpu.yaml")).values()
    node = worker["node_config"]
    assert [gpu["acceleratorCount"] for gpu in node["guestAccelerators"]] == [worker["resources"]["GPU"]]
    assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"  # GCE refuses GPU VMs that live-migrate


def test_aws_nodes_use_a_current_deep_learning_ami() -> None:
    # Without ImageId Ray falls back to a CUDA 11 Deep Learning AMI, too old for TensorFlow 2.21's CUDA 12.
    for node_type in load("aws-gpu.yaml")["available_node_types"].values():
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/")


def test_readme_job_command_writes_to_the_launchers_shared_storage() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), re.DOTALL)
    (block,) = [block for block in blocks if "ray job submit" in block]
    argv = shlex.split(block.replace("\\\n", " "))
    args, config = entrypoint_config(shlex.join(argv[argv.index("--") + 1 :]))
    assert PurePosixPath(args.output_dir).is_relative_to(LAUNCHER_SHARED_DIR)
    for name in LAUNCHER_CONFIGS:
        (worker,) = gpu_worker_types(load(name)).values()
        assert config.resources.max_parallel_members == worker["max_workers"]  # one member per GPU node


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load("kuberay-rayjob.yaml")


def pod_specs(rayjob: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return cluster["headGroupSpec"]["template"]["spec"], [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]


def claim_mounted_at(pod: dict[str, Any], path: str) -> str:
    """The PersistentVolumeClaim that holds `path` in every container of the pod (the deepest mount wins)."""
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
    found = set()
    for container in pod["containers"]:
        mounts = [m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
        assert mounts, f"{container['name']} mounts nothing at {path}"
        found.add(claims[max(mounts, key=lambda m: len(m["mountPath"]))["name"]])
    (claim,) = found
    return claim


def test_rayjob_kind_and_lifecycle(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_workers_request_gpus(rayjob: dict[str, Any]) -> None:
    _, entry = entrypoint_config(rayjob["spec"]["entrypoint"])
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = 0
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1  # Kubernetes schedules GPUs by their limit
        assert float(limits["cpu"]) >= entry.resources.cpus_per_member
        gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
    # The entrypoint fixes what "auto" would size from GPUs that may not have joined yet.
    assert entry.resources.gpus_per_member == 1
    assert entry.resources.max_parallel_members == gpus


def test_rayjob_pods_share_the_output_and_the_head_reads_the_data(rayjob: dict[str, Any]) -> None:
    args, _ = entrypoint_config(rayjob["spec"]["entrypoint"])
    assert args.output_dir == "/shared/runs/reference" and args.data_dir == "/data/digit-recognizer"
    head, workers = pod_specs(rayjob)
    assert workers
    claim = load("kuberay-shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    name = claim["metadata"]["name"]
    assert {claim_mounted_at(pod, args.output_dir) for pod in [head, *workers]} == {name}
    assert claim_mounted_at(head, args.data_dir) == name  # only the driver, on the head, reads the CSVs


def test_rayjob_images_match_installed_ray(rayjob: dict[str, Any]) -> None:
    head, workers = pod_specs(rayjob)
    assert ".".join(rayjob["spec"]["rayClusterSpec"]["rayVersion"].split(".")[:2]) == RAY_MINOR
    assert {image_ray_minor(c["image"]) for pod in [head, *workers] for c in pod["containers"]} == {RAY_MINOR}
    assert all(c["image"].endswith("-gpu") for pod in workers for c in pod["containers"])


def test_rayjob_runtime_env_ships_and_installs_the_project(rayjob: dict[str, Any]) -> None:
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")  # a pod cannot upload a local directory: it must be a URI
    assert env["pip"] == [f"digit-ensemble[gpu] @ {env['working_dir']}"]
