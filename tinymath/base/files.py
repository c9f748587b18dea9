"""Reading and writing files: one reader per format, atomic writers, output-folder checks.

Every file tinymath reads goes through one of the readers here (UTF-8 text, JSON, JSONL, TOML,
safetensors, torch checkpoints), so a damaged or foreign file is one clear message naming it,
never a traceback. Torch checkpoints are read with ``weights_only=True``: a run folder someone
shared is data, and loading it never runs code.

Every output is written into a hidden temporary sibling and renamed into place at the end, so an
interrupted command never leaves a folder that looks finished, and a re-run starts clean.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tinymath.base.errors import Terminated, TinymathError


# ---------------------------------------------------------------- reading


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # the data files tinymath reads
MODEL_SUFFIXES = (".gguf",)  # the one model file tinymath reads (any other model is a folder or a hub id)


def split_file(folder: str | Path, split: str) -> Path | None:
    """A data folder's file for ``split`` (``train.jsonl``, ``test.parquet``, ...), if it has one."""
    folder = Path(folder).expanduser()
    return next((folder / f"{split}{x}" for x in DATA_SUFFIXES if (folder / f"{split}{x}").is_file()), None)


def looks_like_path(source: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``source`` (a --model or --data value) is meant as a local path rather than a hub id:
    hub ids are "owner/name", so a bare "merged" or a "train.jsonl" that does not exist is a typo,
    not a reason to wait on the network."""
    return source.startswith((".", "/", "~")) or Path(source).suffix in suffixes or source.count("/") != 1


def missing_local(source: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``source`` is meant as a local path (`looks_like_path`) that does not exist."""
    return looks_like_path(source, suffixes) and not Path(source).expanduser().exists()


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a missing, unreadable or non-UTF-8 file is one message naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TinymathError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except FileNotFoundError:
        raise TinymathError(f"{path} does not exist") from None
    except OSError as exc:
        raise TinymathError(f"{path}: cannot be read ({exc.strerror})") from None


def read_json(path: str | Path):
    """A JSON file's value."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TinymathError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None


def read_json_object(path: str | Path, what: str = "a JSON object") -> dict:
    """A JSON file that must hold an object (``what`` names it in the error)."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise TinymathError(f"{path}: expected {what}, found {type(value).__name__}")
    return value


def read_jsonl(path: str | Path, skip_torn_last: bool = False, where: str | None = None) -> list[dict]:
    """One JSON object per non-empty line. ``skip_torn_last``: a last line cut off mid-write (a
    killed process) is dropped instead of reported. ``where``: a key under which each row records
    its file and line (for messages about the row's content)."""
    lines = read_text(path).split("\n")  # not splitlines(): U+2028 and the like may sit inside a JSON string
    while lines and not lines[-1].strip():  # the last line is the last one with something on it
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if skip_torn_last and number == len(lines):
                break
            raise TinymathError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TinymathError(f"{path}, line {number}: expected a JSON object")
        if where:
            row[where] = f"{path}, line {number}"
        rows.append(row)
    return rows


def read_toml(path: str | Path) -> dict:
    """A TOML file's table."""
    import tomllib
    try:
        return tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise TinymathError(f"{path}: TOML syntax error: {exc}") from None


def load_safetensors(path: str | Path) -> dict:
    """The tensors of a ``.safetensors`` file; a truncated or corrupt file is one clear message."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise TinymathError(f"{path} does not exist") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TinymathError(f"{path} is damaged or not a safetensors file ({exc})") from None


def check_safetensors(path: str | Path) -> None:
    """That a ``.safetensors`` file is whole, from its header alone (a truncated or foreign file
    fails here), without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt"):
            pass
    except FileNotFoundError:
        raise TinymathError(f"{path} does not exist") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TinymathError(f"{path} is damaged or not a safetensors file ({exc})") from None


def torch_load(path: str | Path):
    """A torch checkpoint file, as data only (``weights_only=True``: no pickled code runs)."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise TinymathError(f"{path} does not exist") from None
    except pickle.UnpicklingError as exc:
        raise TinymathError(f"{path} holds more than tensors and numbers, so it was not loaded (a checkpoint "
                            f"tinymath wrote never does): {(str(exc).splitlines() or [''])[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise TinymathError(f"{path} is damaged ({(str(exc).splitlines() or [''])[0]})") from None


# ---------------------------------------------------------------- writing


def _finite(value, where: str = "value") -> None:
    """JSON has no NaN or infinity: refuse them instead of writing a file other tools cannot read."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}, which JSON cannot hold")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _finite(item, where)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_umask_allows(path: str | Path, folder: bool = False) -> None:
    """Temporary files and folders are created private (0600/0700); outputs get the permissions
    any file the user creates gets (so a shared run folder can be read by others)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def permissions_as_umask_allows(folder: str | Path) -> None:
    """Every file and folder below ``folder`` readable as the user's umask allows (libraries that
    save through private temporary files leave their outputs 0600)."""
    folder = Path(folder)
    _as_umask_allows(folder, folder=True)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            _as_umask_allows(path, folder=path.is_dir())


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temp file + rename). NaN and infinity are a bug here, never written."""
    path = Path(path)
    _finite(data, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        _as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically (temp file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        _as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: str | Path, flag: str = "--out", named: str | Path | None = None) -> None:
    """Fail before any work when ``folder`` (or the nearest existing parent, where it will be
    created) cannot be written: tried with a real temporary file, which holds for every user and
    every file system (read-only mounts, permissions, a file where a folder should be)."""
    folder = Path(folder).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    try:
        if existing is None or not existing.is_dir():
            raise NotADirectoryError(f"{existing or folder} is not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tinymath-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TinymathError(f"{flag} {named or folder}: cannot write there ({exc.strerror or exc}); "
                            f"choose another {flag}") from None


def output_path(out: str | Path) -> Path:
    """``--out`` as meant: ``~`` expanded, and a symbolic link followed to the folder it names (the
    output replaces that folder; the link stays)."""
    out = Path(out).expanduser()
    return out.resolve() if out.is_symlink() else out


def check_output_dir(out: str | Path, overwrite: bool, marker: str | None = None) -> None:
    """Refuse to replace an existing non-empty folder unless ``overwrite`` (before any work starts).

    ``marker`` names the file that proves the folder is our own kind of output; even with
    ``overwrite`` a folder holding something else is refused, so nothing unrelated is destroyed.
    The folder's parent must be writable.
    """
    out = output_path(out)
    if out.exists() and not out.is_dir():
        raise TinymathError(f"--out {out} is a file, not a folder")
    if out.is_dir():  # even empty: the output takes the folder's place, which cannot be done from inside it
        check_not_working_dir(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TinymathError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
        if marker and not (out / marker).exists():
            raise TinymathError(
                f"--out {out} is not an output of this command (no {marker}); --overwrite replaces only "
                "those: choose another --out, or empty it yourself"
            )
    check_writable(out.absolute().parent, named=out)


def check_not_working_dir(out: str | Path) -> None:
    """A folder to be replaced must not be the working directory or one of its parents."""
    out, here = Path(out).resolve(), Path.cwd().resolve()
    if out == here or out in here.parents:
        raise TinymathError(f"--out {out} is the current folder (or holds it); it cannot be replaced from "
                            "inside. Run from another folder")


def replace_dir(new: Path, out: Path) -> None:
    """Put folder ``new`` in the place of ``out`` (the old one, if any, is removed after the swap)."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(out, trash)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(trash, out)  # the old output back in its place
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, out)


@contextmanager
def sigterm_as_interrupt(unless_handled: bool = False):
    """SIGTERM interrupts as Ctrl-C does (a KeyboardInterrupt), so that work stopped by it cleans up
    after itself instead of being killed mid-way (a half-written output removed; training's own
    `stop_on_signals` takes over for its loop). ``unless_handled``: leave a handler someone else
    installed in place (a checkpoint saved inside the training loop stops as the loop decides)."""
    def handler(signum, frame):
        raise Terminated

    if unless_handled and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_output_dir(out: str | Path):
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on error it is removed."""
    out = output_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
        _as_umask_allows(tmp, folder=True)
    except OSError as exc:
        raise TinymathError(f"--out {out}: cannot write there ({exc.strerror})") from None
    try:
        with sigterm_as_interrupt(unless_handled=True):  # stopped by SIGTERM too, nothing half-written stays
            yield tmp
            permissions_as_umask_allows(tmp)
            replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
