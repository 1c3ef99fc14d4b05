"""Checks that a command can write its outputs, made before it computes for minutes rather than after."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Raises ValueError (one line naming `flag`) unless a file can be written at `path`: its folder exists and
    takes files, and `path` is not a folder nor a file that cannot be opened for writing. Leaves no trace."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, not a file")
    folder = p.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{flag} {path}: the folder {folder} {what}")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there: {e.strerror}") from None
    if not existed:
        p.unlink()


def prepare_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Creates the folder `path` (and its parents) if missing; raises ValueError (one line naming `flag`) when it
    cannot be created or takes no files."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write files there: {e.strerror}") from None
