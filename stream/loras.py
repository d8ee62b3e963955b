"""The server's LoRA folder, seen from the HTTP side: names checked before a job queues,
and the listing of `GET /v1/loras`. Nothing here imports torch; a file is judged by its
safetensors header alone, and the model side reads it (see `pipeline.loras`).

A request names a LoRA by its path inside `--lora-dir`, a file or a folder holding one.
Nothing outside the folder is ever read: no absolute paths, no `..`, no symbolic link that
leads out of it (the path is resolved and must stay inside), no URL (nothing is
downloaded); only `.safetensors` files (never pickle), at most `lora_max_bytes` each.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from stream.errors import InvalidRequest

SUFFIX = ".safetensors"
# What diffusers' `save_lora_weights` names the file in a LoRA folder.
FOLDER_WEIGHTS = "pytorch_lora_weights.safetensors"
MAX_HEADER_BYTES = 100 * 2**20
MAX_NAME_CHARS = 512
MAX_LISTED = 1000
MAX_DEPTH = 4
RANK_KEYS = ("lora_A", "lora_down", ".down.")


@dataclass(frozen=True)
class LoraFile:
    """A checked LoRA: `path` resolved inside the folder, `rank` from its header (None when
    no tensor looks like a LoRA's down projection)."""

    name: str
    path: Path
    size: int
    mtime_ns: int
    rank: int | None


class LoraFolder:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes

    def resolve(self, name: object, param: str) -> LoraFile:
        """The file `name` stands for; raises `InvalidRequest` naming `param`."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest(f"{param} must name a LoRA", param=param)
        relative = _relative(name, param)
        try:
            path = (self.root / relative).resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a loop of links
            raise InvalidRequest(
                f"there is no LoRA named {name!r} (GET /v1/loras lists them)",
                param=param,
                code="lora_not_found",
            ) from None
        path = self._inside(path, name, param)
        if path.is_dir():
            path = self._inside(_weights_in(path, name, param), name, param)
        if path.suffix.lower() != SUFFIX:
            raise _invalid(f"the LoRA {name!r} is not a .safetensors file", param)
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise _invalid(f"the LoRA {name!r} is not a regular file", param)
        if info.st_size > self.max_bytes:
            raise _invalid(
                f"the LoRA {name!r} is larger than this server's limit of {self.max_bytes} bytes",
                param,
            )
        try:
            rank = header_rank(str(path), info.st_size, info.st_mtime_ns)
        except (OSError, ValueError):
            raise _invalid(f"the LoRA {name!r} is not a valid safetensors file", param) from None
        return LoraFile(name, path, info.st_size, info.st_mtime_ns, rank)

    def listing(self, loaded: frozenset[str]) -> list[dict[str, Any]]:
        """Every .safetensors file under the folder (links that leave it are skipped), as
        OpenAI-style list items; `loaded` holds the resolved paths the engine has cached."""
        items: list[dict[str, Any]] = []
        for folder, folders, files in os.walk(self.root):
            depth = len(Path(folder).relative_to(self.root).parts)
            folders[:] = sorted(folders) if depth < MAX_DEPTH else []
            for file in sorted(f for f in files if f.lower().endswith(SUFFIX)):
                item = self._item(Path(folder) / file, loaded)
                if item is not None:
                    items.append(item)
                if len(items) >= MAX_LISTED:
                    return items
        return items

    def _item(self, path: Path, loaded: frozenset[str]) -> dict[str, Any] | None:
        try:
            real = path.resolve(strict=True)
            info = real.stat()
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.root) or not stat.S_ISREG(info.st_mode):
            return None
        try:
            rank = header_rank(str(real), info.st_size, info.st_mtime_ns)
            valid = True
        except (OSError, ValueError):
            rank, valid = None, False
        return {
            "id": path.relative_to(self.root).as_posix(),
            "object": "lora",
            "created": int(info.st_mtime),
            "owned_by": "fluxstream",
            "size_bytes": info.st_size,
            "rank": rank,
            "valid": valid and info.st_size <= self.max_bytes,
            "loaded": str(real) in loaded,
        }

    def _inside(self, path: Path, name: str, param: str) -> Path:
        if not path.is_relative_to(self.root):
            raise InvalidRequest(
                f"the LoRA {name!r} leads out of the server's LoRA folder", param=param
            )
        return path


def _relative(name: str, param: str) -> PurePosixPath:
    if "://" in name:
        raise InvalidRequest(
            f"{param}: this server loads LoRAs from its own folder only and downloads "
            "nothing; name one that GET /v1/loras lists",
            param=param,
        )
    relative = PurePosixPath(name)
    if (
        len(name) > MAX_NAME_CHARS
        or "\x00" in name
        or "\\" in name
        or relative.is_absolute()
        or name.startswith("~")
        or ".." in relative.parts
        or not relative.parts
    ):
        raise InvalidRequest(
            f"{param} must be a name inside the server's LoRA folder, without '..', '\\' or "
            "a leading '/'",
            param=param,
        )
    return relative


def _weights_in(folder: Path, name: str, param: str) -> Path:
    """The weights of a LoRA folder: diffusers' file name, else its only .safetensors."""
    files = sorted(p for p in folder.iterdir() if p.name.lower().endswith(SUFFIX))
    named = [p for p in files if p.name == FOLDER_WEIGHTS]
    if named or len(files) == 1:
        return (named or files)[0].resolve()
    raise _invalid(
        f"the LoRA folder {name!r} holds {len(files)} .safetensors files; name one of them", param
    )


@functools.lru_cache(maxsize=1024)
def header_rank(path: str, size: int, mtime_ns: int) -> int | None:
    """The rank of a safetensors LoRA file, from its header (read once per version of the
    file); raises ValueError when the header is not a valid safetensors header."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError("impossible header length")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not an object")
    data_bytes = size - 8 - length
    ranks = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape, offsets = _entry(entry)
        if offsets[1] > data_bytes:
            raise ValueError("a tensor lies past the end of the file")
        if len(shape) == 2 and any(part in key for part in RANK_KEYS):
            ranks.append(shape[0])
    return max(ranks, default=None)


def _entry(entry: Any) -> tuple[list[int], list[int]]:
    if not isinstance(entry, dict):
        raise ValueError("a tensor entry is not an object")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (
        isinstance(entry.get("dtype"), str)
        and isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError("a tensor entry is malformed")
    return shape, offsets


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_lora")
