"""What makes a long run safe: checkpoints (save, keep the last K, find, restore) and turning
SIGINT/SIGTERM into "save and stop" (while a run still sets up, SIGTERM into an interrupt). (The
lock that keeps two runs out of one folder is the run folder's: `tinymath.base.runs.run_lock`.)

A checkpoint is ``RUN/checkpoints/step-000123/``: the adapter, optimizer and scheduler state, every
process's RNG states, ``state.json`` (step, number of processes, best accuracy) and, with ``--keep
best``, a copy of ``RUN/best/`` as it was then (resuming puts it back: a later best belongs to steps
that run again). It is written to a temporary folder and renamed, so a crash mid-save never damages
the last good one; and a checkpoint damaged anyway (a disk error, a copy cut short) is passed over
for the newest intact one, with a word to the user. Everything is read back as data
(`tinymath.base.files`: safetensors, and torch files with ``weights_only=True``), so a shared run
folder cannot run code. The data position is the step number: the order of examples is a pure
function of (seed, epoch).
"""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from tinymath.base.errors import Terminated, TinymathError
from tinymath.base.runs import BEST, CHECKPOINTS, CONFIG_FILE, RUN_FILE
from tinymath.lib.distributed import several_machines


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())


def finished_steps(run: Path) -> int | None:
    """The steps a finished run took (its ``run.json``), when ``run`` is one."""
    from tinymath.base.files import read_json_object

    if not (Path(run) / RUN_FILE).is_file():
        return None
    try:
        steps = read_json_object(Path(run) / RUN_FILE).get("result", {}).get("steps")
    except (TinymathError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def check_resumable(run: Path, final: Path | None = None, processes: int = 1) -> None:
    """``--resume`` of a run with no checkpoint to continue from, refused before anything loads,
    with what to do instead (``final``: where the run ends up, when it replaces another;
    ``processes``: this launch's). A run still training is left to its lock to name."""
    from tinymath.base.runs import check_not_locked

    if checkpoint_dirs(run):
        return
    check_not_locked(Path(run))  # a run still training before its first checkpoint: named as such
    finished = finished_steps(run)
    if finished is not None:
        raise TinymathError(f"--resume {run}: the run has finished its {finished} steps ({RUN_FILE}) and kept no "
                            "checkpoint to continue from (a run keeps them with --save-every N); to train longer, "
                            f"start a new run: {train_command(processes)} --config {Path(run) / RUN_FILE} --out NEW "
                            "--max-steps N (or --epochs N)")
    raise TinymathError(f"--resume {run}: no checkpoint to resume from (a run saves one every --save-every N steps, "
                        f"and when Ctrl-C stops it); to start it again: {train_command(processes)} --config "
                        f"{Path(run) / CONFIG_FILE} --out {final or run} --overwrite")


def latest_checkpoint(run: Path) -> Path | None:
    found = checkpoint_dirs(run)
    return found[-1] if found else None


def rng_state() -> dict:
    """This process's random number generators (Python's, torch's CPU and CUDA ones)."""
    import random

    import torch

    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def save_checkpoint(run: Path, step: int, peft_model, optimizer, scheduler, extra: dict, keep: int,
                    rng_states: list[dict] | None = None) -> Path:
    """Save everything needed to continue after ``step``; keep only the newest ``keep`` checkpoints.
    ``rng_states``: every process's `rng_state`, in rank order (None: this process alone). The
    number of processes is recorded: a resume must run as many (`check_processes`).

    Checkpoints after ``step`` are removed: they belong to steps being run again (a resume from an
    older checkpoint because the newest was damaged), and are never kept in place of this one."""
    import torch

    from tinymath.base.files import atomic_output_dir, write_json

    rng_states = rng_states or [rng_state()]
    target = Path(run) / CHECKPOINTS / f"step-{step:06d}"
    with atomic_output_dir(target) as tmp:
        peft_model.save_pretrained(str(tmp))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / _rng_file(rank))
        best_saved = (Path(run) / BEST).is_dir()
        if best_saved:
            shutil.copytree(Path(run) / BEST, tmp / BEST)
        write_json(tmp / "state.json", {"step": step, **extra, "best_saved": best_saved,
                                        "processes": len(rng_states)})
    found = checkpoint_dirs(run)  # zero-padded step numbers: names sort by step
    later = [p for p in found if p.name > target.name]
    for old in later + [p for p in found if p.name <= target.name][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def resume_command(run: Path, processes: int, several_machines: bool = False) -> str:
    """The command that continues ``run``, launched as it trained (a run resumes with as many
    processes as it had)."""
    machines = (" (on each machine, with the --num_machines, --machine_rank and --main_process_ip it started "
                "with)") if several_machines and processes > 1 else ""
    return f"{train_command(processes)} --resume {run}{machines}"


def train_command(processes: int) -> str:
    """``tinymath train``, launched with ``processes`` processes."""
    if processes == 1:
        return "tinymath train"
    return f"accelerate launch --multi_gpu --num_processes {processes} -m tinymath train"


def check_processes(state: dict, processes: int, run: Path) -> None:
    """A run resumes with as many processes as it trained with: the global batch, the data position
    and each process's random numbers depend on it."""
    saved = state.get("processes")
    if saved is not None and saved != processes:
        launch = resume_command(run, saved, several_machines()) + ("" if saved > 1 else " (one process)")
        raise TinymathError(f"--resume {run}: the run trained with {saved} process(es), this launch has {processes}; "
                            f"resume it as it ran: {launch}")


def load_checkpoint(path: Path, peft_model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore adapter weights, optimizer, scheduler and this process's (``rank``) RNG states;
    returns state.json."""
    import random

    import torch
    from peft import set_peft_model_state_dict

    from tinymath.base.files import load_safetensors, read_json_object, torch_load

    state = read_json_object(path / "state.json", "a checkpoint's state")
    if not isinstance(state.get("step"), int):
        raise TinymathError(f"{path / 'state.json'} has no step number")
    weights = load_safetensors(path / "adapter_model.safetensors")
    rng_file = _rng_file(rank) if (path / _rng_file(rank)).is_file() else _rng_file(0)  # older: one file
    optimizer_state, scheduler_state, rng = (torch_load(path / name) for name in ("optimizer.pt", "scheduler.pt",
                                                                                  rng_file))
    set_peft_model_state_dict(peft_model, weights)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    random.setstate(_python_rng_state(rng["python"]))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _python_rng_state(saved) -> tuple:
    """``random.getstate()`` comes back from a torch file with its tuples as lists."""
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def load_latest_checkpoint(run: Path, peft_model, optimizer, scheduler, say=print,
                           rank: int = 0) -> tuple[Path, dict]:
    """Restore the newest checkpoint of ``run`` that reads back whole (``rank``: this process's
    random numbers); a damaged newer one is reported with ``say`` and passed over. An error when
    none is intact."""
    found = checkpoint_dirs(run)
    if not found:
        raise TinymathError(f"--resume {run}: no checkpoint to resume from (a run saves one every --save-every N "
                            "steps, and when Ctrl-C stops it)")
    problems = []
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, peft_model, optimizer, scheduler, rank)
        except (TinymathError, KeyError, ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: wrong shapes
            problems.append(f"{path.name}: {exc}")
            say(f"tinymath: checkpoint {path} is damaged ({exc}); trying an older one")
    raise TinymathError(f"--resume {run}: no intact checkpoint ({'; '.join(problems)}); start the run again "
                        f"from its settings: tinymath train --config {Path(run) / CONFIG_FILE} --out NEW")


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


@contextmanager
def stop_on_signals(notice: str | None = None):
    """Turn SIGINT/SIGTERM into a request the loop sees between steps (``flag["signal"]``);
    ``notice`` is said on stderr at once, so a step that takes a while does not look deaf."""
    import sys

    flag = {"signal": None}
    previous = {}

    def handler(signum, frame):
        if flag["signal"] is not None:  # a second Ctrl-C (or SIGTERM): stop now
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name
        if notice:
            print(f"\n{notice}", file=sys.stderr, flush=True)

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
