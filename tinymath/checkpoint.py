"""What makes a long run safe: checkpoints (save, keep the last K, find, restore), the lock that
keeps two runs out of one folder, and turning SIGINT/SIGTERM into "save and stop".

A checkpoint is ``RUN/checkpoints/step-000123/``: the adapter, optimizer and scheduler state, RNG
states, ``state.json`` (step, epoch position, best accuracy) and, with ``--keep best``, a copy of
``RUN/best/`` as it was then (resuming puts it back: a later best belongs to steps that run again).
It is written to a temporary folder and renamed, so a crash mid-save never damages the last good
one. The data position is the step number: the order of examples is a pure function of (seed, epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from tinymath.errors import TinymathError

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
BEST = "best"


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())


def latest_checkpoint(run: Path) -> Path | None:
    found = checkpoint_dirs(run)
    return found[-1] if found else None


def save_checkpoint(run: Path, step: int, peft_model, optimizer, scheduler, extra: dict, keep: int) -> Path:
    """Save everything needed to continue after ``step``; keep only the newest ``keep`` checkpoints."""
    import random

    import torch

    from tinymath.files import atomic_output_dir, write_json

    target = Path(run) / CHECKPOINTS / f"step-{step:06d}"
    with atomic_output_dir(target) as tmp:
        peft_model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        best_saved = (Path(run) / BEST).is_dir()
        if best_saved:
            shutil.copytree(Path(run) / BEST, tmp / BEST)
        write_json(tmp / "state.json", {"step": step, **extra, "best_saved": best_saved})
    for old in checkpoint_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path, peft_model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG states; returns state.json."""
    import random

    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(path / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())


def restore_best(path: Path, run: Path, state: dict) -> None:
    """Make ``RUN/best/`` what it was at checkpoint ``path`` (``state``: its state.json, as
    `load_checkpoint` returns it), or absent if there was none then. Checkpoints from before best/
    was kept in them say nothing about it: best/ is left alone."""
    if "best_saved" not in state:
        return
    best = Path(run) / BEST
    shutil.rmtree(best, ignore_errors=True)
    if (Path(path) / BEST).is_dir():
        shutil.copytree(Path(path) / BEST, best)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_unlocked(run: Path) -> None:
    """Refuse a folder that a live run is writing to (a stale lock of a dead process is ignored)."""
    lock = Path(run) / LOCK
    if lock.is_file():
        try:
            pid = int(lock.read_text().strip() or 0)
        except ValueError:
            pid = 0
        if pid and pid != os.getpid() and _pid_alive(pid):
            raise TinymathError(f"another training run (pid {pid}) is writing to {run}; wait for it to finish, "
                                f"or use another --out")


@contextmanager
def run_lock(run: Path):
    """Hold ``RUN/.lock`` (our pid) for the duration of training."""
    check_unlocked(run)
    lock = Path(run) / LOCK
    lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a request the loop sees between steps (``flag["signal"]``)."""
    flag = {"signal": None}
    previous = {}

    def handler(signum, frame):
        if flag["signal"] is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
