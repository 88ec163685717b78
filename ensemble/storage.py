"""Where a run's files live, and how they are written: `Storage`, a local folder or a bucket.

A run's output location (`output_dir`) is a local path or a URI (`file://`, `s3://`, `gs://`)
opened through pyarrow's filesystems, the same layer Ray uses for its checkpoints, so a bucket
and a local disk go through the same code. Files are written to a temporary name and then
moved into place: a rename on a local disk, a single upload on an object store; either way a
reader sees the old file or the whole new one, never half of one.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow
import pyarrow.fs

from ensemble.config import ConfigError


class Storage:
    def __init__(self, location: str):
        self.is_local = "://" not in location or location.startswith("file://")
        if "://" not in location:
            location = str(Path(location).resolve())
        try:
            self.filesystem, self.root = pyarrow.fs.FileSystem.from_uri(location)
        except (pyarrow.ArrowException, ValueError) as error:
            raise ConfigError(f"output dir {location}: {str(error).splitlines()[0]}") from None
        self.root = self.root.rstrip("/")
        self.location = location

    def check_writable(self, probe_bytes: int = 0) -> None:
        """Write and delete a probe file of `probe_bytes` at the output location: a one-line ConfigError if that
        fails.

        Run before Ray starts, so that an unusable location stops a run before any work; a location
        that did not exist is removed again, so that a run refused later leaves nothing behind.
        """
        existed = self._info(self.root, "reached")
        if existed == pyarrow.fs.FileType.File:
            raise ConfigError(f"output dir {self.location}: is a file, not a directory")
        probe = f".write-check-{uuid.uuid4().hex}"
        try:
            self.write_bytes(bytes(probe_bytes), probe)
            self.filesystem.delete_file(self.path(probe))
            if existed == pyarrow.fs.FileType.NotFound:
                self.filesystem.delete_dir(self.root)
        except (OSError, pyarrow.ArrowException) as error:
            raise self._error("written", error) from None

    def unwritable(self) -> str | None:
        """Why a megabyte cannot be written at the location now (a full disk, a read-only or lost mount, a bucket
        gone, permissions), in one line; None if it can."""
        try:
            self.check_writable(probe_bytes=2**20)
        except ConfigError as error:
            return str(error)
        return None

    def path(self, *parts: str) -> str:
        """A path inside the run, as `filesystem` (and Ray's `storage_filesystem`) expects it."""
        return "/".join([self.root, *parts])

    def relative(self, path: str) -> str:
        """The part of a filesystem path below the run's root (how the report names files)."""
        return path[len(self.root) :].lstrip("/")

    def read_bytes(self, *parts: str) -> bytes | None:
        """A file's contents, or None when it does not exist; a ConfigError where the location cannot be read (an
        endpoint that does not answer, credentials refused)."""
        if self._info(self.path(*parts), "read") == pyarrow.fs.FileType.NotFound:
            return None
        try:
            with self.filesystem.open_input_stream(self.path(*parts)) as stream:
                return stream.read()
        except (OSError, pyarrow.ArrowException) as error:
            raise self._error("read", error) from None

    def _info(self, path: str, doing: str) -> pyarrow.fs.FileType:
        try:
            return self.filesystem.get_file_info(path).type
        except (OSError, pyarrow.ArrowException) as error:
            raise self._error(doing, error) from None

    def _error(self, doing: str, error: Exception) -> ConfigError:
        """One line: the location, what could not be done, and the filesystem's own first line (an S3 error's
        code and what curl said are in its first 160 characters)."""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ConfigError(f"output dir {self.location}: cannot be {doing} ({reason[:160]})")

    def read_text(self, *parts: str) -> str | None:
        contents = self.read_bytes(*parts)
        return None if contents is None else contents.decode()

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def write_bytes(self, contents: bytes, *parts: str) -> None:
        final = self.path(*parts)
        directory, name = final.rsplit("/", 1)
        temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
        self.filesystem.create_dir(directory, recursive=True)
        try:
            with self.filesystem.open_output_stream(temporary) as stream:
                stream.write(contents)
            self.filesystem.move(temporary, final)
        except BaseException:
            if self.filesystem.get_file_info(temporary).type != pyarrow.fs.FileType.NotFound:
                self.filesystem.delete_file(temporary)
            raise
