"""Folders that the scripts write into, created and checked before any work is done."""

from __future__ import annotations

import os


def writable_folder_problem(path: str) -> str | None:
    """Creates the folder ``path`` (and its parents) where it does not exist yet; returns None
    where it is a folder this process can write into, else why not, in a few words (the OS's
    reason)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "it is a file"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        return error.strerror or str(error)
    return None if os.access(path, os.W_OK | os.X_OK) else "Permission denied"
