"""Atomic file writes and content hashes.

Every job in fgcmr may be killed at any moment and rerun; a reader must never see half a file.
So every writer goes through here: write to a temporary name in the same directory, fsync, rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give; mkstemp alone gives 0600
_DIR_MODE = 0o777 & ~_current_umask()  # what mkdir() would give; mkdtemp alone gives 0700


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory in ``parent`` with the umask's permissions (``mkdtemp`` alone gives 0700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, _DIR_MODE)
    return path


def honour_umask(root: str | Path) -> None:
    """Give ``root`` and everything under it the umask's permissions (writers such as safetensors make 0600 files)."""
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            os.chmod(path, _DIR_MODE if path.is_dir() else _FILE_MODE)


def clean_leftovers(*dirs: str | Path, name: str = "*") -> list[Path]:
    """Remove the temporary files of writers killed mid-write (``.<name>.*.tmp``) in ``dirs``; call it
    before any writer of this job starts there (``name``: only those of that file, where other jobs may be
    writing other files in the same directory). Returns what was removed."""
    removed = []
    for d in map(Path, dirs):
        for path in d.glob(".*.tmp" if name == "*" else f".{name}.*.tmp") if d.is_dir() else []:
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


class CorruptFileError(ValueError):
    """A file fgcmr wrote is unreadable or differs from its record; the message names the file and what to do."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a truncated or edited one raises ``CorruptFileError`` naming it, not a bare decode error."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(
                f"{path} is not valid JSON ({e}); it was truncated or edited: "
                "rerun the stage that wrote it, or restore it"
            ) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
