"""Several processes under ``accelerate launch``: this process's place (rank, world size, device),
its share of a list of work, and a clean end. One process (the common case) needs none of it,
and every function here is then trivial.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from tinymath.base.errors import TinymathError


def process_state():
    """accelerate's view of this process (rank, world size), after checking that ``accelerate launch``
    did not start more processes on this machine than it has GPUs (each process needs a GPU of its
    own; with several machines, only this machine's processes count: checked before any exchange,
    since two processes on one GPU cannot exchange anything through NCCL)."""
    import os

    import torch
    from accelerate import PartialState

    launcher = _one_started_of_several()
    if launcher is not None and "--cpu" in launcher:
        raise TinymathError("accelerate launch --cpu starts one process whatever --num_processes says; for several "
                            "CPU processes use torchrun --nproc_per_node N -m tinymath ... (on a machine with GPUs, "
                            "with CUDA_VISIBLE_DEVICES= before it)")
    if launcher is not None:
        raise TinymathError("accelerate launch was asked for several processes but started one: it starts several "
                            "by itself only on a machine with 2 or more GPUs (this one has "
                            f"{torch.cuda.device_count()}); add --multi_gpu to the launch (one GPU per machine, or "
                            "processes on a CPU)")
    try:
        state = PartialState(cpu=not torch.cuda.is_available())  # cpu: several CPU processes (gloo) in tests
    except getattr(torch.distributed, "DistError", RuntimeError) as exc:  # the rendezvous: a process never came
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise TinymathError(f"could not meet the other processes of this launch ({type(exc).__name__}: "
                            f"{_shortened(detail)}); a process that stopped before says why in its own output") \
            from exc
    if torch.cuda.is_available():
        check_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)), torch.cuda.device_count())
    return state


def _one_started_of_several() -> list[str] | None:
    """The launcher's arguments when ``accelerate launch`` asked for several processes (or machines)
    started this one alone, else None. Without ``--multi_gpu``, on a machine with fewer than 2 GPUs
    (or with ``--cpu``), it starts one plain process: no WORLD_SIZE, and a rendezvous address
    (MASTER_ADDR) that it sets only when several were asked for: asked on its command line, or, from
    its config file, an address the launcher itself did not have (a job script's own is no sign)."""
    import os

    if "ACCELERATE_MIXED_PRECISION" not in os.environ or "MASTER_ADDR" not in os.environ \
            or "WORLD_SIZE" in os.environ:
        return None
    parent = Path(f"/proc/{os.getppid()}")
    try:  # the launcher is this process's parent: what it runs, and what it was started with (Linux)
        command = [arg.decode(errors="replace") for arg in parent.joinpath("cmdline").read_bytes().split(b"\0")]
        environment = parent.joinpath("environ").read_bytes().split(b"\0")
    except OSError:
        return None  # cannot tell: a plain process, as accelerate started it
    if not any("accelerate" in arg for arg in command) or "launch" not in " ".join(command):
        return None
    asked = max(_launch_option(command, "--num_processes"), _launch_option(command, "--num_machines")) > 1
    set_by_launch = not any(entry.startswith(b"MASTER_ADDR=") for entry in environment)
    return command if asked or set_by_launch else None


def _launch_option(command: list[str], name: str) -> int:
    """An integer option of the launcher's command line (``--name N`` or ``--name=N``, with - or _
    between words, as accelerate takes either); 0 if absent."""
    for i, arg in enumerate(command):
        given, equals, value = arg.partition("=")
        if given.startswith("--") and given.replace("-", "_") == name.replace("-", "_"):
            value = value if equals else command[i + 1] if i + 1 < len(command) else ""
            return int(value) if value.isdigit() else 0
    return 0


def launched_together() -> bool:
    """Whether a launcher may have started this process as one of several (from its environment
    alone, without importing torch): then every process joins before any reads a file."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_MIXED_PRECISION" in os.environ


def several_machines() -> bool:
    """Whether this launch spans several machines (fewer processes here than in all)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world


def _shortened(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "..."


def check_gpus(local_processes: int, gpus: int) -> None:
    """One GPU per process of this machine."""
    if local_processes > gpus:
        raise TinymathError(f"accelerate launched {local_processes} processes on this machine but it has {gpus} "
                            f"GPU(s); use --num_processes {gpus} per machine", every_process=True)


def checked_together(state, check):
    """``check()`` on every process, then stop them all if it refused on any: the refusing process
    with its own error, the others naming it, so no process goes on to wait for one that has
    stopped (on several machines, a folder one of them lacks). Returns ``check()``'s result.
    ``state`` None: a process alone (`launched_together`), which just checks."""
    if state is None or state.num_processes == 1:
        return check()
    try:
        result, refusal = check(), None
    except Exception as exc:  # not only a refusal: an unreadable folder must not leave the others waiting
        result, refusal = None, exc
    from accelerate.utils import gather_object

    mine = None if refusal is None else str(refusal) if isinstance(refusal, TinymathError) else \
        f"{type(refusal).__name__}: {refusal}"
    said = gather_object([mine])
    first = next(((rank, text) for rank, text in enumerate(said) if text is not None), None)
    if refusal is None and first is not None:
        refusal = TinymathError(f"process {first[0]} of this launch refused to start ({first[1]}), so this one "
                                "stops too")
    elif isinstance(refusal, TinymathError) and len(set(said)) == 1:  # every process said the same:
        refusal.every_process = True  # once a machine is enough (a shared folder, a bad setting)
    if refusal is not None:
        raise refusal
    return result


def checked_alike(state, value, problem: str) -> None:
    """Stop every process when ``value`` (each process's own, e.g. read from its machine's files)
    is not the same on all of them; ``problem`` says what differs and what to do. One process:
    nothing to check."""
    if state is None or state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    if len(set(gather_object([value]))) > 1:
        raise TinymathError(problem)


def end_processes(state) -> None:
    """Under ``accelerate launch``: wait for every process, then close the process group (a clean
    exit instead of a teardown abort). One process: nothing to do."""
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def default_device() -> str:
    """``cuda:<local rank>`` when a GPU is present (one per process under accelerate), else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        from accelerate import PartialState

        return f"cuda:{PartialState().local_process_index}"
    return "cpu"


def process_share(count: int) -> range:
    """The indices of ``count`` work items this process takes: every num_processes-th one."""
    state = process_state()
    return range(state.process_index, count, state.num_processes)


def gather_in_order(mine: range, results: list, count: int) -> list:
    """Every process's ``results`` (for the indices ``mine``) as one list in input order, on every
    process. One process: its own results."""
    if process_state().num_processes == 1:
        return results
    from accelerate.utils import gather_object

    merged: list = [None] * count
    for i, result in gather_object(list(zip(mine, results))):
        merged[i] = result
    return merged


# what a collective raises when another process of the run is gone: its connection closed (gloo),
# or NCCL's remote-peer error
LOST_PEER_SIGNS = ("connection reset by peer", "connection closed by peer", "broken pipe",
                   "remote process exited", "ncclremoteerror")


@contextmanager
def peers_lost_as_error(processes: int, next_step=lambda: ""):
    """Under several processes: a collective that fails because another process of the run died
    (out of memory, bad data, killed) ends this one with one message, not a traceback per rank;
    ``next_step()`` adds what the user can do next. Other errors pass through unchanged."""
    import torch

    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        lost = isinstance(exc, getattr(torch.distributed, "DistNetworkError", ())) or any(
            sign in text.lower() for sign in LOST_PEER_SIGNS)
        if processes == 1 or not lost:
            raise
        detail = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise TinymathError(f"another process of this run stopped, so this one stops too ({type(exc).__name__}: "
                            f"{_shortened(detail)}); its own output says why. {next_step()}".strip()) from exc
