"""User-facing errors: one line that names the field and the file, never a traceback."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class TransactError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits non-zero."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None, field: str | None = None) -> None:
        self.path, self.field = (str(path) if path is not None else None), field
        where = ", ".join(x for x in (f"field '{field}'" if field else None, self.path) if x)
        super().__init__(f"{where}: {message}" if where else message)


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def replace_folder(tmp: Path, target: Path) -> None:
    """Move a finished temporary folder onto ``target``, replacing an old one only after the new one is
    complete (the old folder is moved aside first, then removed)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
