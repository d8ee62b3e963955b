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
class StoredImage:
    data: bytes
    media_type: str


def is_valid_name(name: str) -> bool:
    """Names are checked against a strict pattern before any lookup: no path tricks."""
    return bool(_NAME.match(name))


def media_type_of(name: str) -> str:
    return MEDIA_TYPES[name.rsplit(".", 1)[1]]


def new_name(output_format: str) -> str:
    """An unguessable file name from a cryptographic random source."""
    return f"{secrets.token_urlsafe(24)}.{output_format}"


class ResultStore(Protocol):
    async def put(self, data: bytes, output_format: str) -> str:
        """Store `data`; returns the file name under which it is served."""
        ...

    async def read(self, name: str) -> StoredImage | None:
        """The stored image, or None if the name is unknown, malformed or expired."""
        ...

    async def delete(self, name: str) -> None:
        """Delete one stored file now (its job was dropped); unknown names are ignored."""
        ...

    async def sweep(self) -> int:
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
        name = new_name(output_format)
        await anyio.to_thread.run_sync(self._write, name, data)
        return name

    def _write(self, name: str, data: bytes) -> None:
        # A folder removed while serving (a cleaned /tmp, say) is made again, not a 500.
        self.root.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, self.root / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    async def read(self, name: str) -> StoredImage | None:
        if not is_valid_name(name):
            return None
        data = await anyio.to_thread.run_sync(self._read_fresh, self.root / name)
        return None if data is None else StoredImage(data=data, media_type=media_type_of(name))

    def _read_fresh(self, path: Path) -> bytes | None:
        try:
            age = time.time() - path.stat().st_mtime
            if age <= self.ttl_s:
                return path.read_bytes()
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        return None

    async def delete(self, name: str) -> None:
        if is_valid_name(name):
            await anyio.to_thread.run_sync(lambda: (self.root / name).unlink(missing_ok=True))

    async def sweep(self) -> int:
        return await anyio.to_thread.run_sync(self._sweep)

    def _sweep(self) -> int:
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
