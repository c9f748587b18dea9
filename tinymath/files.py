"""Atomic outputs: a folder or file appears complete or not at all.

Every command writes into a hidden temporary sibling and renames it into place at the end, so an
interrupted command never leaves a folder that looks finished, and a re-run starts clean.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tinymath.errors import TinymathError


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def check_output_dir(out: str | Path, overwrite: bool, marker: str | None = None) -> None:
    """Refuse to replace an existing non-empty folder unless ``overwrite`` (before any work starts).

    ``marker`` names the file that proves the folder is our own kind of output; even with
    ``overwrite`` a folder holding something else is refused, so nothing unrelated is destroyed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TinymathError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TinymathError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
        if marker and not (out / marker).exists():
            raise TinymathError(
                f"--out {out} holds files that tinymath did not write (no {marker}); "
                "choose another --out, or empty it yourself"
            )


@contextmanager
def atomic_output_dir(out: str | Path):
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.with_name(f".{out.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
