"""ensemble.storage.Storage against a real S3-compatible server (moto's, started by tests/s3_server.py)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs
import pytest

from ensemble import hold
from ensemble.config import ConfigError
from ensemble.hold import OutputDirHold
from ensemble.storage import Storage
from tests.s3_server import S3Bucket
from tests.s3_server import s3_bucket as s3_bucket  # the module-scoped server and bucket (re-export: a fixture)


@pytest.fixture
def s3(s3_bucket: S3Bucket) -> S3Bucket:
    """An empty prefix of its own for each test: one server for the module, no test sees another's files."""
    return s3_bucket.fresh()


class Unwritable:
    """Contents that fail once the temporary object is open: pyarrow's write wants a bytes-like object."""


def test_parses_an_s3_uri_with_its_endpoint(s3: S3Bucket) -> None:
    storage = Storage(s3.uri)
    assert isinstance(storage.filesystem, pyarrow.fs.S3FileSystem)
    assert storage.filesystem.region == "us-east-1"
    assert storage.root == f"{s3.bucket}/{s3.prefix}"
    assert not storage.is_local
    assert storage.location == s3.uri
    # A trailing slash names the same location.
    assert Storage(s3.uri.replace("?", "/?", 1)).root == storage.root


def test_check_writable_leaves_nothing_behind(s3: S3Bucket) -> None:
    Storage(s3.uri).check_writable()
    assert s3.objects() == []  # not even the directory markers that writing the probe created


def test_check_writable_keeps_an_existing_run(s3: S3Bucket) -> None:
    storage = Storage(s3.uri)
    storage.write_text("{}", "config.json")
    before = s3.objects()
    storage.check_writable()
    assert s3.objects() == before
    assert storage.read_text("config.json") == "{}"


def test_check_writable_refuses_a_file_and_a_missing_bucket(s3: S3Bucket) -> None:
    Storage(s3.uri).write_text("not a directory", "taken")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        Storage(s3.uri.replace("?", "/taken?", 1)).check_writable()
    missing = s3.uri.replace(f"s3://{s3.bucket}/", "s3://no-such-bucket-for-this-test/", 1)
    with pytest.raises(ConfigError, match="cannot be written") as refused:
        Storage(missing).check_writable()
    assert "\n" not in str(refused.value)


def test_write_and_read_round_trip(s3: S3Bucket) -> None:
    storage = Storage(s3.uri)
    storage.write_text("ImageId,Label\n1,7\n", "submission.csv")
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    storage.write_bytes(payload, "members", "m0", "checkpoint_000000", "logits.npz")
    assert storage.read_text("submission.csv") == "ImageId,Label\n1,7\n"
    assert storage.read_bytes("members", "m0", "checkpoint_000000", "logits.npz") == payload
    assert s3.read("members/m0/checkpoint_000000/logits.npz") == payload
    # Overwriting replaces the object; no temporary object is left after either write.
    storage.write_text("ImageId,Label\n1,3\n", "submission.csv")
    assert storage.read_text("submission.csv") == "ImageId,Label\n1,3\n"
    assert s3.files() == ["members/m0/checkpoint_000000/logits.npz", "submission.csv"]


def test_a_missing_file_reads_as_none(s3: S3Bucket) -> None:
    storage = Storage(s3.uri)
    assert storage.read_bytes("report.json") is None
    assert storage.read_text("members", "m0", "state.json") is None
    assert s3.objects() == []  # reading creates nothing


def test_a_failed_write_leaves_no_partial_or_temporary_object(s3: S3Bucket) -> None:
    storage = Storage(s3.uri)
    with pytest.raises(TypeError):
        storage.write_bytes(Unwritable(), "report.json")  # type: ignore[arg-type]
    assert storage.read_bytes("report.json") is None
    assert s3.files() == []
    # A failed overwrite keeps the old file whole.
    storage.write_text("old", "report.json")
    with pytest.raises(TypeError):
        storage.write_bytes(Unwritable(), "report.json")  # type: ignore[arg-type]
    assert storage.read_text("report.json") == "old"
    assert s3.files() == ["report.json"]


def test_path_and_relative_agree(s3: S3Bucket) -> None:
    storage = Storage(s3.uri)
    path = storage.path("members", "m0", "checkpoint_000001")
    assert path == f"{s3.bucket}/{s3.prefix}/members/m0/checkpoint_000001"
    assert storage.relative(path) == "members/m0/checkpoint_000001"
    assert storage.relative(storage.root) == ""
    # The paths the filesystem lists (as Ray's checkpoints carry them) map back the same way.
    storage.write_text("{}", "members", "m0", "checkpoint_000001", "state.json")
    selector = pyarrow.fs.FileSelector(storage.path(), recursive=True)
    listed = [storage.relative(info.path) for info in storage.filesystem.get_file_info(selector)]
    assert "members/m0/checkpoint_000001/state.json" in listed


def test_a_worker_process_uses_the_storage_it_is_sent(s3: S3Bucket) -> None:
    """What a Ray worker does: unpickle the driver's Storage (filesystem included) and read the run's marker.

    The credentials reach it only through the environment (`s3.env`), as they reach Ray's workers."""
    storage = Storage(s3.uri)
    storage.write_text("token-123", ".storage-marker")
    worker = "import pickle, sys; print(pickle.load(sys.stdin.buffer).read_text('.storage-marker'), end='')"
    done = subprocess.run(
        [sys.executable, "-c", worker], input=pickle.dumps(storage), env=s3.env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode() == "token-123"


def test_ray_storage_layer_on_the_same_location(s3: S3Bucket, tmp_path: Path) -> None:
    """What Ray Train does with storage_path=storage.path(...) and storage_filesystem=storage.filesystem, short
    of a training run: nested directories, copy_files up and down, recursive listing, a checkpoint round trip."""
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    storage = Storage(s3.uri)
    local = tmp_path / "checkpoint"
    (local / "assets" / "nested").mkdir(parents=True)
    (local / "state.json").write_text('{"epoch": 1}')
    (local / "assets" / "nested" / "weights.bin").write_bytes(b"\x00\x01" * 1000)

    # pyarrow.fs.copy_files into a prefix that does not exist yet, then list it back.
    pyarrow.fs.copy_files(str(local), storage.path("copied"), destination_filesystem=storage.filesystem)
    selector = pyarrow.fs.FileSelector(storage.path("copied"), recursive=True)
    files = [info for info in storage.filesystem.get_file_info(selector) if info.type == pyarrow.fs.FileType.File]
    assert sorted(storage.relative(info.path) for info in files) == [
        "copied/assets/nested/weights.bin",
        "copied/state.json",
    ]

    # Ray's own storage context: validation marker, checkpoint upload, checkpoint download.
    context = StorageContext(
        storage_path=storage.path("members"), experiment_dir_name="m0", storage_filesystem=storage.filesystem
    )
    persisted = context.persist_current_checkpoint(Checkpoint.from_directory(str(local)), "checkpoint_000000")
    assert storage.relative(persisted.path) == "members/m0/checkpoint_000000"
    assert storage.read_text("members", "m0", "checkpoint_000000", "state.json") == '{"epoch": 1}'
    restored = Path(Checkpoint(storage.path("members", "m0", "checkpoint_000000"), storage.filesystem).to_directory())
    assert (restored / "assets" / "nested" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert "members/m0/.validate_storage_marker" in s3.files()


def test_an_s3_output_dir_is_held_by_a_lease_that_another_run_takes_over_once_stale_or_its_process_is_gone(
    s3: S3Bucket, monkeypatch
) -> None:
    """Object stores have no locks: a lease object names the holder, whose heartbeat keeps it."""
    monkeypatch.setattr(hold, "LEASE_BEAT_SECONDS", 0.2)
    storage = Storage(s3.uri)
    with OutputDirHold(storage) as first:
        lease = hold.read_lease(storage)
        assert lease["pid"] == os.getpid() and lease["token"] == first.token
        time.sleep(1.0)
        assert hold.read_lease(storage)["heartbeat"] > lease["heartbeat"]  # it beats
        with pytest.raises(ConfigError) as refused:
            OutputDirHold(Storage(s3.uri))
        assert str(refused.value).startswith(f"output dir {s3.uri} is held by another run (host ")
        assert str(refused.value).endswith("; wait for it to end, or use another --output-dir")
        assert hold.read_lease(storage)["token"] == first.token  # the refused run changed nothing
    assert s3.objects() == []  # let go: the lease is gone, and the dir it created with it

    # A holder that died without letting go: once its heartbeat is stale, the next run takes the dir over.
    dead = {"host": "elsewhere", "pid": 1, "since": time.time() - 900, "token": "dead", "heartbeat": time.time() - 120}
    storage.write_text(json.dumps(dead), hold.LEASE_FILE)
    with OutputDirHold(storage) as second:
        assert second.taken_over == dead
        assert hold.read_lease(storage)["token"] == second.token

    # A run of this host that crashed: its heartbeat is fresh but its process is gone, so the rerun of the same
    # command takes the dir over at once.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    crashed = {"host": socket.gethostname(), "pid": ended.pid, "since": time.time(), "token": "crashed"}
    storage.write_text(json.dumps(crashed | {"heartbeat": time.time()}), hold.LEASE_FILE)
    with OutputDirHold(storage) as third:
        assert third.taken_over["token"] == "crashed"
