"""A real S3-compatible server for tests: moto's HTTP server on a free local port, with one bucket.

Use it from a test module with `from tests.s3_server import s3_bucket` (or expose it from conftest.py).
The fixture yields an `S3Bucket`: `uri` is a fresh prefix in the form `pyarrow.fs.FileSystem.from_uri`
(and so `ensemble.storage.Storage` and Ray) accepts; `fresh()` gives another one, for one test each.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
import pyarrow.fs
import pytest

REGION = "us-east-1"
# Dummy credentials: moto accepts any. pyarrow's S3 URIs take no access_key/secret_key query parameters
# (only userinfo, which would show wherever Storage prints its location), so they go through the
# environment, where a `python -m ensemble.run` subprocess and Ray's workers find them too.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    # No probing of the EC2 instance-metadata endpoint when the AWS SDK looks for credentials or a region.
    "AWS_EC2_METADATA_DISABLED": "true",
}
_BOTO_KEYS = {
    "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
    "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
}


@dataclass(frozen=True)
class S3Bucket:
    endpoint: str  # host:port of the server
    bucket: str
    prefix: str  # a fresh key prefix inside the bucket, no slashes at either end
    env: dict[str, str]  # os.environ plus the credentials: pass as `env=` to subprocesses
    filesystem: pyarrow.fs.S3FileSystem

    @property
    def uri(self) -> str:
        # `region` is required in practice: without it pyarrow asks the server for the bucket's region.
        return f"s3://{self.bucket}/{self.prefix}?endpoint_override={self.endpoint}&scheme=http&region={REGION}"

    def fresh(self) -> S3Bucket:
        """Another empty prefix in the same bucket."""
        return S3Bucket(self.endpoint, self.bucket, f"run-{uuid.uuid4().hex[:12]}", self.env, self.filesystem)

    def objects(self) -> list[str]:
        """The keys of the objects stored under the prefix, relative to it, as the server lists them.

        Listed with boto3 (moto's dependency), not pyarrow, so that they are the server's own: pyarrow's
        empty directory markers show as keys ending in "/", and the prefix's own marker as "".
        """
        client = boto3.client("s3", endpoint_url=f"http://{self.endpoint}", region_name=REGION, **_BOTO_KEYS)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return sorted(item["Key"][len(self.prefix) + 1 :] for page in pages for item in page.get("Contents", []))

    def files(self) -> list[str]:
        """The objects under the prefix that are files, not directory markers."""
        return [key for key in self.objects() if key and not key.endswith("/")]

    def read(self, key: str) -> bytes:
        with self.filesystem.open_input_stream(f"{self.bucket}/{self.prefix}/{key}") as stream:
            return stream.read()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_answering(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not answer at {url} within {timeout:.0f}s")


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's own process group, then SIGKILL it after the grace period."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables in os.environ for the block, then put back what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def s3_server(env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's server on a free local port, its own process group, stopped afterwards: its host:port. `env`: more
    of the server's settings (INITIAL_NO_AUTH_ACTION_COUNT=0: it checks credentials, and knows none)."""
    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    # Its own session (process group), so that stopping it ends whatever it started and nothing else.
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=os.environ | (env or {}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_until_answering(f"http://{endpoint}/moto-api/", process)
        yield endpoint
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[S3Bucket]:
    with s3_server() as endpoint, _environment(CREDENTIALS):
        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=endpoint, scheme="http", region=REGION, allow_bucket_creation=True
        )
        bucket = f"test-{uuid.uuid4().hex[:12]}"
        filesystem.create_dir(bucket)  # a bucket: the first component of an S3 path
        yield S3Bucket(endpoint, bucket, "", {**os.environ}, filesystem).fresh()
