"""Url results: files on local disk under unguessable names, expiring after a set time.

State that other replicas may need to see sits behind this small interface, so that a
shared folder or Redis can replace the local default without touching the routes.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from stream.images import MEDIA_TYPES

_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.(png|jpeg|webp|gif|avif)$")


@dataclass(frozen=True)
class StoredFile:
    path: Path
    media_type: str


class ResultStore(Protocol):
    async def put(self, data: bytes, output_format: str) -> str:
        """Store `data`; returns the file name under which it is served."""
        ...

    def get(self, name: str) -> StoredFile | None:
        """The stored file, or None if the name is unknown, malformed or expired."""
        ...

    def delete(self, name: str) -> None:
        """Delete one stored file now (its job was dropped); unknown names are ignored."""
        ...

    def sweep(self) -> int:
        """Delete expired files; returns how many were deleted."""
        ...


class DiskResultStore:
    """Names come from `secrets`, are checked against a strict pattern before any file
    access, and files are written to a temporary name and renamed, so that a reader never
    sees half a file and a crash never leaves one under a served name."""

    def __init__(self, root: Path, ttl_s: float) -> None:
        self.root = root
        self.ttl_s = ttl_s
        root.mkdir(parents=True, exist_ok=True)

    async def put(self, data: bytes, output_format: str) -> str:
        name = f"{secrets.token_urlsafe(24)}.{output_format}"
        await anyio.to_thread.run_sync(self._write, name, data)
        return name

    def _write(self, name: str, data: bytes) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, self.root / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, name: str) -> StoredFile | None:
        if not _NAME.match(name):
            return None
        path = self.root / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > self.ttl_s:
            path.unlink(missing_ok=True)
            return None
        return StoredFile(path=path, media_type=MEDIA_TYPES[name.rsplit(".", 1)[1]])

    def delete(self, name: str) -> None:
        if _NAME.match(name):
            (self.root / name).unlink(missing_ok=True)

    def sweep(self) -> int:
        deleted = 0
        now = time.time()
        for path in self.root.iterdir():
            try:
                if now - path.stat().st_mtime > self.ttl_s:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:
                continue
        return deleted
