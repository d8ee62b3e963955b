from __future__ import annotations

import os
import time
from pathlib import Path

from stream.store import DiskResultStore


async def test_stored_file_is_served_until_it_expires_then_deleted(tmp_path: Path) -> None:
    store = DiskResultStore(tmp_path, ttl_s=60)
    name = await store.put(b"\x89PNG...", "png")
    stored = await store.read(name)
    assert stored is not None and stored.media_type == "image/png"
    assert stored.data == b"\x89PNG..."
    old = time.time() - 120
    os.utime(tmp_path / name, (old, old))
    assert await store.read(name) is None
    assert not (tmp_path / name).exists()


async def test_names_are_unguessable_and_checked_before_any_file_access(tmp_path: Path) -> None:
    store = DiskResultStore(tmp_path / "images", ttl_s=60)
    (tmp_path / "secret.png").write_bytes(b"x")
    names = {await store.put(b"x", "png") for _ in range(20)}
    assert len(names) == 20 and all(len(name) >= 32 for name in names)
    assert await store.read("../secret.png") is None
    assert await store.read("a.png") is None


async def test_sweep_deletes_only_expired_files(tmp_path: Path) -> None:
    store = DiskResultStore(tmp_path, ttl_s=60)
    keep, drop = await store.put(b"1", "png"), await store.put(b"2", "jpeg")
    old = time.time() - 120
    os.utime(tmp_path / drop, (old, old))
    assert await store.sweep() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep]


async def test_a_data_folder_removed_while_serving_is_made_again(tmp_path: Path) -> None:
    store = DiskResultStore(tmp_path / "images", ttl_s=60)
    (tmp_path / "images").rmdir()
    name = await store.put(b"picture", "png")
    stored = await store.read(name)
    assert stored is not None and stored.data == b"picture"
