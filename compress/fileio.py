"""File helpers: hashing and crash-safe writes (temporary path, then an atomic rename)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def user_path(text: str, *, field: str) -> Path:
    """`text` as a path with `~` expanded; an unknown `~user` is bad input naming `field`."""
    from compress.errors import BadInputError

    try:
        return Path(text).expanduser()
    except RuntimeError as exc:  # pathlib: "Could not determine home directory"
        raise BadInputError(f"{field}: {text!r}: {exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files: each file's name and content hash, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; on success it replaces `final`.

    On any exception the temporary directory is removed and `final` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing any existing `dst` (both on one filesystem).

    The old `dst` is first renamed aside, so at every instant `dst` is either the complete old
    directory or the complete new one.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
