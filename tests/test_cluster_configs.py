"""The cluster definitions in cluster/: valid for the Ray and KubeRay they target, wired to this project, and
secured the way their READMEs say.

Offline: the launcher configs go through the checks `ray up` makes before it contacts a cloud (Ray's JSON
schema and the rest of its validation, after merging the provider's defaults), their shell commands through
bash, and the entrypoints through this project's own CLI parser and config loader. The token's env var and file
are the ones Ray's token-authentication docs name; the security group and service account that `ray up`
creates are read from Ray's code.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

# DeveloperAPI: merges Ray's bundled defaults.yaml for the provider, offline. (sdk.bootstrap_config would go on
# to import the provider's cloud SDK, query it for instance types and create IAM roles and security groups.)
from ray.autoscaler.sdk import fillout_defaults

from ensemble.config import Config, command_line_overrides, load_config
from ensemble.run import parse_args

from .conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = {"aws-gpu.yaml": "aws", "gcp-gpu.yaml": "gcp"}
# Where the launcher configs bind-mount the shared file system inside the Ray containers.
LAUNCHER_SHARED_DIR = "/mnt/shared"
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])
RAY_DIR = Path(ray.__file__).parent
# Token mode's env var, and where Ray looks for the token when RAY_AUTH_TOKEN(_PATH) is unset, as documented in
# https://docs.ray.io/en/latest/ray-security/token-auth.html ("How Ray token authentication works", "What token
# does Ray use?").
AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"
TOKEN_FILE = "~/.ray/auth_token"
# Ray's token authentication came in Ray 2.52, KubeRay's authOptions for RayJob in KubeRay 1.5.1.
KUBERAY_MIN_FOR_AUTH = (1, 5, 1)
RAY_MIN_FOR_AUTH = (2, 52, 0)
# The uid and gid of the "ray" user in rayproject/ray images.
RAY_IMAGE_USER = (1000, 100)


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def ray_module_constants(relative: str) -> dict[str, str]:
    """A Ray module's top-level string constants, read without importing it (its cloud SDK is not installed)."""
    values: dict[str, str] = {}

    def value(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return values.get(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = value(node.left), value(node.right)
            return None if left is None or right is None else left + right
        return None

    for statement in ast.parse((RAY_DIR / relative).read_text()).body:
        if isinstance(statement, ast.Assign) and [type(t) for t in statement.targets] == [ast.Name]:
            found = value(statement.value)
            if found is not None:
                values[statement.targets[0].id] = found
    return values


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL)


def remote_blocks(markdown: str) -> list[str]:
    """The bash blocks that reach a cluster elsewhere: not those that start a head on this machine."""
    return [block for block in bash_blocks(markdown) if "ray start --head" not in block.replace("\\\n", " ")]


def bash_commands(block: str) -> Iterator[list[str]]:
    """The commands of a bash block, as argv lists: continuation lines joined, comments dropped."""
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            yield argv


def readme_section(markdown: str, heading: str) -> str:
    start = markdown.index(heading + "\n")
    following = re.search(r"^## ", markdown[start + len(heading) :], re.MULTILINE)
    return markdown[start : start + len(heading) + following.start()] if following else markdown[start:]


def all_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from all_strings(key)
            yield from all_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_strings(item)


def ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def prepare_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config `ray up` works from, before it contacts the cloud: what Ray's (private) prepare_config does for
    a cloud provider. Ray's defaults merged in, then the shared setup commands prepended to the head's and the
    workers', the Docker images checked, and each node type's worker bounds filled in."""
    prepared = fillout_defaults(config)
    for node in ("head", "worker"):
        prepared[f"{node}_setup_commands"] = prepared["setup_commands"] + prepared[f"{node}_setup_commands"]
    if "docker" in prepared:
        docker = prepared["docker"]
        image = docker.get("image")
        images = image or (docker.get("head_image", image) and docker.get("worker_image", image))
        assert bool(docker.get("container_name")) == bool(images), "Must provide a container & image name"
    for name, node_type in prepared["available_node_types"].items():
        node_type.setdefault("min_workers", 0)
        node_type.setdefault("max_workers", 0 if name == prepared["head_node_type"] else prepared["max_workers"])
    return prepared


def validate_config(config: dict[str, Any]) -> None:
    """The checks of Ray's (private) validate_config, which `ray up` runs on the prepared config."""
    jsonschema.validate(config, ray_schema())
    assert "cluster_synced_files" in config, "defaults from an older Ray than the installed one"
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert sum(node_type.get("min_workers", 0) for node_type in node_types.values()) <= config["max_workers"]


def with_head_node_ip(commands: list[str], head_ip: str) -> list[str]:
    """The commands as the autoscaler runs them on a node (Ray's private util.with_head_node_ip)."""
    return [f"export RAY_HEAD_IP={head_ip}; {command}" for command in commands]


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
    overrides = command_line_overrides(args.set, args.data_dir)
    if args.output_dir:
        overrides.append({"output_dir": args.output_dir})
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
    assert config["file_mounts"]["~/digit-ensemble"] == "."
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


def test_aws_nodes_use_one_plain_deep_learning_ami() -> None:
    # Without ImageId Ray falls back to a CUDA 11 Deep Learning AMI, too old for TensorFlow 2.21's CUDA 12. A
    # `resolve:ssm:` ImageId would need ssm:GetParameters on the head's role too, or workers never start.
    images = {node["node_config"]["ImageId"] for node in load("aws-gpu.yaml")["available_node_types"].values()}
    (image,) = images
    assert re.fullmatch(r"ami-[0-9a-fX]{8,17}", image), image
    readme = (CLUSTER / "README.md").read_text()
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/" in readme


def launcher_commands(name: str, node: str) -> list[str]:
    """What runs on a head or worker node, in order: on the host, then in the container (Ray's merged lists)."""
    config = prepare_config(load(name))
    return [
        *config["initialization_commands"],
        *config[f"{node}_setup_commands"],
        *config[f"{node}_start_ray_commands"],
    ]


@pytest.mark.parametrize("node", ["head", "worker"])
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_commands_are_valid_bash(name: str, node: str) -> None:
    for command in launcher_commands(name, node):
        checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert checked.returncode == 0, f"{command}\n{checked.stderr}"


@pytest.mark.parametrize("node", ["head", "worker"])
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_nodes_start_ray_with_token_auth(name: str, node: str, tmp_path: Path) -> None:
    """Run the start commands as the autoscaler does, with a stand-in `ray` that records what it was given."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    (stubs / "ray").write_text(f'#!/bin/sh\necho "${{{AUTH_MODE_ENV_VAR}:-unset}} $*" >> {calls}\n')
    (stubs / "ray").chmod(0o755)
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path)}  # no RAY_AUTH_MODE inherited
    commands = with_head_node_ip(prepare_config(load(name))[f"{node}_start_ray_commands"], "10.0.0.2")
    for command in commands:
        subprocess.run(["bash", "-c", command], env=env, check=True)
    starts = [line.split() for line in calls.read_text().splitlines() if line.split()[1] == "start"]
    assert starts, "no `ray start`"
    for mode, _, *args in starts:
        assert mode == "token", args  # a worker without it cannot join; a head without it may run open
        assert ("--head" in args) == (node == "head")
    if node == "worker":
        assert "--address=10.0.0.2:6379" in starts[0]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_gives_every_node_the_token(name: str, tmp_path: Path) -> None:
    config = prepare_config(load(name))
    # `ray get-auth-token --generate` writes Ray's default file on the machine that runs `ray up`; the file
    # mount puts it where Ray looks on each node (the autoscaler forwards file mounts to the workers).
    assert config["file_mounts"][TOKEN_FILE] == TOKEN_FILE
    # Shells on the nodes (`ray exec ... ray status`) are clients too: the setup commands give them token mode.
    bashrc = tmp_path / ".bashrc"
    for command in [c for c in config["worker_setup_commands"] if ".bashrc" in c] * 2:  # idempotent on reruns
        subprocess.run(["bash", "-c", command], env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]}, check=True)
    assert bashrc.read_text().splitlines() == [f"export {AUTH_MODE_ENV_VAR}=token"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_deletes_nodes_it_no_longer_needs(name: str) -> None:
    # With Ray's AWS default (true), idle workers and `ray down` only stop instances, whose disks go on billing.
    assert prepare_config(load(name))["provider"]["cache_stopped_nodes"] is False


@pytest.mark.parametrize("node", ["head", "worker"])
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_apt_get_update_runs_before_any_install(name: str, node: str) -> None:
    script = "\n".join(launcher_commands(name, node))
    # `apt-get [options] install|update` within one simple command
    installs = [m.start() for m in re.finditer(r"\bapt(?:-get)?\s[^;&|()\n]*?\binstall\b", script)]
    updates = [m.start() for m in re.finditer(r"\bapt(?:-get)?\s[^;&|()\n]*?\bupdate\b", script)]
    assert installs, "expected the NFS client install"
    assert all(any(update < install for update in updates) for install in installs)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_nodes_mount_the_shared_file_system(name: str) -> None:
    config = load(name)
    mounts = [c for c in config["initialization_commands"] if re.search(rf"\bmount .* {LAUNCHER_SHARED_DIR}$", c)]
    assert len(mounts) == 1  # on the host, before Docker starts and bind-mounts it
    assert all("initialization_commands" not in node for node in config["available_node_types"].values())
    owner = next(c for c in config["initialization_commands"] if c.startswith("sudo chown "))
    assert owner == "sudo chown {}:{} {}".format(*RAY_IMAGE_USER, LAUNCHER_SHARED_DIR)


def test_gcp_gpu_workers_wait_for_the_nvidia_driver() -> None:
    # Ray adds --runtime=nvidia to `docker run` only if nvidia-smi works when the container starts; the Deep
    # Learning VM may still be installing the driver then (as in Ray's gcp/example-gpu-docker.yaml).
    config = load("gcp-gpu.yaml")
    (wait,) = [c for c in config["initialization_commands"] if "nvidia-smi" in c]
    assert re.search(r"timeout \d+ bash -c 'until nvidia-smi\b[^']*; do sleep \d+; done'", wait)
    (worker,) = gpu_worker_types(config).values()
    assert "initialization_commands" not in worker  # a node type's own list would replace the global one
    assert {"key": "install-nvidia-driver", "value": "True"} in worker["node_config"]["metadata"]["items"]


def test_aws_workers_write_the_bucket_with_their_own_role() -> None:
    config = load("aws-gpu.yaml")
    head = config["available_node_types"][config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    (worker,) = gpu_worker_types(config).values()
    worker_profile = worker["node_config"]["IamInstanceProfile"]["Name"]
    assert worker_profile != head  # workers run the members' code: no EC2 rights
    readme = (CLUSTER / "README.md").read_text()
    assert re.search(rf"for role in .*\b{head}\b.*\b{worker_profile}\b", readme)  # the README creates both
    assert f"role/{worker_profile}" in readme and "iam:PassRole" in readme  # and lets the head hand it out


def test_gcp_workers_write_the_bucket_as_rays_service_account() -> None:
    config = load("gcp-gpu.yaml")
    gcp = ray_module_constants("autoscaler/_private/gcp/config.py")
    email = gcp["SERVICE_ACCOUNT_EMAIL_TEMPLATE"].format(
        account_id=gcp["DEFAULT_SERVICE_ACCOUNT_ID"], project_id=config["provider"]["project_id"]
    )
    (worker,) = gpu_worker_types(config).values()
    (account,) = worker["node_config"]["serviceAccounts"]
    assert account["email"] == email  # the account `ray up` creates for the head, in this project
    assert account["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"]


def test_readme_efs_rule_admits_the_security_group_ray_puts_nodes_in() -> None:
    group = ray_module_constants("autoscaler/_private/aws/config.py")["SECURITY_GROUP_TEMPLATE"]
    nodes_group = group.format(load("aws-gpu.yaml")["cluster_name"])
    commands = [argv for block in bash_blocks((CLUSTER / "README.md").read_text()) for argv in bash_commands(block)]
    created = [argv for argv in commands if "create-security-group" in argv and nodes_group in argv]
    assert len(created) == 1 and created[0][0].startswith("NODES_SG=")
    (rule,) = [argv for argv in commands if "authorize-security-group-ingress" in argv]
    assert rule[rule.index("--port") + 1] == "2049" and rule[rule.index("--source-group") + 1] == "$NODES_SG"


PLACEHOLDER = re.compile(r"\b(?:ami|fs)-X{8,}\b|\b[A-Z]+(?:-[A-Z]+)+\b|\bOWNER\b|\bCOMMIT\b")


@pytest.mark.parametrize("name", [*LAUNCHER_CONFIGS, "kuberay-rayjob.yaml", "kuberay-shared-pvc.yaml"])
def test_placeholders_are_listed_in_the_readme(name: str) -> None:
    found = {match for text in all_strings(load_all(name)) for match in PLACEHOLDER.findall(text)}
    listed = set(re.findall(r"^\| `([^|]*)` \| `" + re.escape(name) + "`", (CLUSTER / "README.md").read_text(), re.M))
    listed = {placeholder.strip("`") for row in listed for placeholder in row.split("`, `")}
    assert found and found <= listed


def test_readme_job_command_writes_to_the_launchers_shared_storage() -> None:
    blocks = [block for block in remote_blocks((CLUSTER / "README.md").read_text()) if "ray job submit" in block]
    (block,) = blocks
    (argv,) = [argv for argv in bash_commands(block) if argv[:3] == ["ray", "job", "submit"]]
    args, config = entrypoint_config(shlex.join(argv[argv.index("--") + 1 :]))
    assert PurePosixPath(args.output_dir).is_relative_to(LAUNCHER_SHARED_DIR)
    for name in LAUNCHER_CONFIGS:
        (worker,) = gpu_worker_types(load(name)).values()
        assert config.resources.max_parallel_members == worker["max_workers"]  # one member per GPU node


DOCS = [REPO / "README.md", CLUSTER / "README.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_docs_reach_clusters_through_a_tunnel_with_the_token(doc: Path) -> None:
    text = doc.read_text()
    assert "0.0.0.0" not in text and "--dashboard-host" not in text
    clients = 0
    for block in remote_blocks(text):
        token_mode = False
        for argv in bash_commands(block):
            if argv[0] == "export" and f"{AUTH_MODE_ENV_VAR}=token" in argv[1:]:
                token_mode = True
            if argv[0] == "kubectl" and "port-forward" in argv:
                assert "--address" not in argv  # kubectl binds 127.0.0.1 unless told otherwise
            if argv[:2] in (["ray", "job"], ["ray", "status"]):
                clients += 1
                assert token_mode, f"{shlex.join(argv)} without `export {AUTH_MODE_ENV_VAR}=token` before it"
                assert argv[argv.index("--address") + 1] == "http://127.0.0.1:8265"
    assert clients


def test_readme_says_what_a_client_exports_for_token_auth() -> None:
    section = readme_section((REPO / "README.md").read_text(), "## On a Ray cluster")
    for name in [f"export {AUTH_MODE_ENV_VAR}=token", TOKEN_FILE, "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"]:
        assert name in section, name
    assert "ray get-auth-token --generate" in section and "ray start --head" in section


def test_cluster_readme_walks_through_the_steps_in_order() -> None:
    headings = re.findall(r"^## (.+)$", (CLUSTER / "README.md").read_text(), re.MULTILINE)
    steps = ["GPU quotas", "Credentials", "Shared storage", "Loading the data", "Submitting through a tunnel"]
    steps += ["Getting results back", "Tearing down"]
    assert [next(h for h in headings if h.startswith(step)) for step in steps] == [
        h for h in headings if any(h.startswith(step) for step in steps)
    ]


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load("kuberay-rayjob.yaml")


def pod_specs(rayjob: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return cluster["headGroupSpec"]["template"]["spec"], [
        group["template"]["spec"] for group in cluster["workerGroupSpecs"]
    ]


def shared_claim() -> tuple[dict[str, Any], dict[str, Any]]:
    """kuberay-shared-pvc.yaml: the claim, and the loader pod that mounts it."""
    claim, loader = load_all("kuberay-shared-pvc.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and loader["kind"] == "Pod"
    return claim, loader


def claim_path(pod: dict[str, Any], path: str, containers: str = "containers") -> tuple[str, PurePosixPath]:
    """The claim that holds `path` in every container of the pod, and where on the claim (deepest mount wins)."""
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
    found = set()
    for container in pod[containers]:
        mounts = [m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
        assert mounts, f"{container['name']} mounts nothing at {path}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        on_claim = PurePosixPath(mount.get("subPath", "")) / PurePosixPath(path).relative_to(mount["mountPath"])
        found.add((claims[mount["name"]], on_claim))
    (where,) = found
    return where


def claim_mounted_at(pod: dict[str, Any], path: str) -> str:
    return claim_path(pod, path)[0]


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
    claim, _ = shared_claim()
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
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


def test_rayjob_turns_on_token_auth_and_the_readme_asks_for_a_kuberay_that_has_it(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert version(cluster["rayVersion"]) >= RAY_MIN_FOR_AUTH
    # KubeRay puts the token in the pods' environment; a token or mode set by hand would be a second source.
    for pod in [*pod_specs(rayjob)[0:1], *pod_specs(rayjob)[1]]:
        for container in pod["containers"]:
            assert not {env["name"] for env in container.get("env", [])} & {AUTH_MODE_ENV_VAR, "RAY_AUTH_TOKEN"}
    readme = (CLUSTER / "README.md").read_text()
    (minimum,) = re.findall(r"KubeRay operator \*\*(\d+\.\d+\.\d+) or later\*\*", readme)
    assert version(minimum) >= KUBERAY_MIN_FOR_AUTH


def test_shared_claim_names_a_storage_class() -> None:
    claim, _ = shared_claim()
    # Unset, the cluster's default class (often ReadWriteOnce) would leave the claim Pending.
    assert isinstance(claim["spec"].get("storageClassName"), str) and claim["spec"]["storageClassName"]


def test_pods_write_the_claim_as_the_ray_user(rayjob: dict[str, Any]) -> None:
    args, _ = entrypoint_config(rayjob["spec"]["entrypoint"])
    loader = shared_claim()[1]["spec"]
    head, workers = pod_specs(rayjob)
    for pod in [head, *workers, loader]:
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (*RAY_IMAGE_USER, RAY_IMAGE_USER[1])
    # A new file system's root belongs to root, and fsGroup does not change every volume: the loader's root
    # init container hands the job's directories on the claim to that user.
    (prepare,) = loader["initContainers"]
    assert prepare["securityContext"]["runAsUser"] == 0
    ((owner, paths),) = re.findall(r"chown ([\d:]+) ([^;&|]+)", prepare["command"][-1])
    assert owner == "{}:{}".format(*RAY_IMAGE_USER)
    owned = {claim_path(loader, path, "initContainers")[1] for path in paths.split()}
    output_parent = claim_path(head, str(PurePosixPath(args.output_dir).parent))[1]
    assert {output_parent, claim_path(head, args.data_dir)[1]} <= owned


def test_readme_copies_the_data_to_where_the_head_reads_it(rayjob: dict[str, Any]) -> None:
    args, _ = entrypoint_config(rayjob["spec"]["entrypoint"])
    claim, loader = shared_claim()
    head, _ = pod_specs(rayjob)
    commands = [argv for block in bash_blocks((CLUSTER / "README.md").read_text()) for argv in bash_commands(block)]
    copies = [argv for argv in commands if argv[:2] == ["kubectl", "cp"] and ":" in argv[3]]
    assert sorted(PurePosixPath(argv[2]).name for argv in copies) == ["test.csv", "train.csv"]
    for argv in copies:
        pod, path = argv[3].split(":")
        assert pod == loader["metadata"]["name"]
        on_claim = claim_path(loader["spec"], path)
        assert on_claim == (claim["metadata"]["name"], claim_path(head, args.data_dir)[1] / PurePosixPath(path).name)
