"""The folders tinymath writes, and the one owner of a training run folder's layout.

A run folder (``tinymath train --out RUN``)::

    RUN/adapter_config.json, adapter_model.safetensors   the PEFT adapter
    RUN/tokenizer files                                  the tokenizer it was trained with
    RUN/train_config.json                                the resolved settings, written at the start
    RUN/metrics.jsonl                                    one line per logged step
    RUN/curves.png                                       loss, learning rate, validation accuracy
    RUN/checkpoints/step-000123/                         resumable checkpoints
    RUN/best/                                            the best adapter (--keep best)
    RUN/run.json                                         every setting and the result, written last
    RUN/README.md                                        a model card: what the adapter is, how to use it
    RUN/.lock                                            held (flock) while a process trains here, then removed

A folder without ``run.json`` is an unfinished run. A run asked to ``--overwrite`` an earlier one
trains in the hidden sibling ``.RUN.partial`` (whose ``.replaces`` file names RUN) and takes RUN's
place only when it is complete, so a failed new run never costs the old one.

Here too: the names of the other commands' outputs, reading ``run.json`` back (`load_run`), the
checks of train's output folder, the run lock, reading ``metrics.jsonl`` and the run's model card.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tinymath.base.errors import TinymathError
from tinymath.base.files import (MODEL_SUFFIXES, check_not_working_dir, check_safetensors, looks_like_path,
                                  output_path, read_json_object, read_jsonl)

RUN_FILE = "run.json"
CONFIG_FILE = "train_config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"
BEST = "best"
LOCK = ".lock"
REPLACES = ".replaces"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# the other commands' outputs
MANIFEST = "prepare.json"          # prepare-data
SUMMARY = "summary.json"           # eval
PREDICTIONS = "predictions.jsonl"  # eval
MERGE_MARKER = "tinymath.json"     # merge-adapters
MODEL_CARD = "README.md"
# run.json keys that a later command needs, with their types
RUN_KEYS = {"model": str, "quant": str, "format": str, "system_prompt": (str, type(None))}


# ---------------------------------------------------------------- reading a finished run


@dataclass
class RunInfo:
    """What a run folder says about itself (from its run.json)."""

    path: Path
    config: dict

    @property
    def base_model(self) -> str:
        return self.config["model"]

    @property
    def quant(self) -> str:
        return self.config["quant"]

    @property
    def prompt_format(self) -> str:
        return self.config["format"]

    @property
    def system_prompt(self) -> str | None:
        return self.config.get("system_prompt")


def load_run(path: str | Path) -> RunInfo:
    """Read and check a training run folder; a clear error if it is not one.

    Only data is taken from it: whether remote code may run is never read from a run folder,
    it is the command's own ``--trust-remote-code`` flag.
    """
    from tinymath.base.prompts import FORMATS
    from tinymath.base.quantization import QUANTIZATIONS

    path = Path(path)
    if path.is_file():
        hint = (" (a model: eval and chat take it as --model)" if path.suffix == ".gguf" else
                f"; give the folder that holds it ({path.parent})" if (path.parent / RUN_FILE).is_file() else "")
        raise TinymathError(f"{path} is a file, not a `tinymath train` run folder{hint}")
    if not path.is_dir():
        raise TinymathError(f"{path} does not exist; give a `tinymath train` output folder")
    missing = [name for name in (RUN_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / name).exists()]
    if is_unfinished_run(path):
        raise TinymathError(f"{path} is a training run that has not finished (it has checkpoints but no {RUN_FILE}); "
                            f"continue it with `tinymath train --resume {path}`, or give a finished run")
    if RUN_FILE in missing and (path / CONFIG_FILE).is_file():
        raise TinymathError(f"{path} is a training run that has not finished and has no checkpoint yet (it may "
                            "still be training); give it once it is done, or a finished run (if it was stopped for "
                            f"good, train it again: tinymath train --config {path / CONFIG_FILE} --out {path} "
                            "--overwrite)")
    if missing and RUN_FILE not in missing:  # finished, then something taken away
        raise TinymathError(f"{path} is a finished training run missing {', '.join(missing)}; copy the whole run "
                            "folder again")
    if missing:
        check_not_prepared_data(path, str(path), "a training run", "; give a `tinymath train` output folder")
        model = (" (it is a model folder, already standalone: eval and chat take it as --model)"
                 if (path / "config.json").is_file() else "")
        raise TinymathError(f"{path} is not a tinymath training run (missing {', '.join(missing)}){model}; "
                            "give the --out folder of `tinymath train`")
    config = read_json_object(path / RUN_FILE, "the settings of a tinymath run")
    problems = [f"{key} should be {getattr(kind, '__name__', 'text or null')}"
                for key, kind in RUN_KEYS.items() if key not in config and kind is str
                or key in config and not isinstance(config[key], kind)]
    if not problems and config["quant"] not in QUANTIZATIONS:
        problems.append(f"quant {config['quant']!r} is unknown")
    if not problems and config["format"] not in FORMATS:
        problems.append(f"format {config['format']!r} is unknown")
    if config.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        problems.append(f"dtype {config['dtype']!r} is unknown")
    if problems:
        raise TinymathError(f"{path / RUN_FILE} is not a tinymath run record ({'; '.join(problems)})")
    check_safetensors(path / ADAPTER_WEIGHTS)  # a damaged adapter is reported before any model is loaded
    return RunInfo(path=path, config=config)


def recorded_model(record: Path) -> str | None:
    """The ``model`` a run.json or prepare-data manifest names, if it can be read (for messages)."""
    try:
        model = read_json_object(record).get("model")
    except TinymathError:
        return None
    return model if isinstance(model, str) else None


def check_not_prepared_data(path: Path, given: str, wanted: str, fix: str = "") -> None:
    """Refuse a prepare-data output (``path``, shown as ``given``) where ``wanted`` belongs (a model,
    a training run); ``fix`` ends the message."""
    if (path / MANIFEST).is_file():
        model = recorded_model(path / MANIFEST)
        prepared = f"; it was prepared for the model {model}" if model else ""
        raise TinymathError(f"{given} is a prepare-data output (training data), not {wanted}{prepared}{fix}")


def read_metrics(run: str | Path) -> list[dict]:
    """The logged steps of a run (a last line torn by a killed process is skipped)."""
    path = Path(run) / METRICS
    return read_jsonl(path, skip_torn_last=True) if path.is_file() else []


def keep_metrics_until(run: str | Path, step: int) -> None:
    """Forget what was logged after ``step`` (a resumed run logs those steps again)."""
    from tinymath.base.files import write_text

    import json

    kept = [row for row in read_metrics(run) if isinstance(row.get("step"), int) and row["step"] <= step]
    write_text(Path(run) / METRICS, "".join(json.dumps(row) + "\n" for row in kept))


# ---------------------------------------------------------------- train's output folder


def is_unfinished_run(folder: Path) -> bool:
    """A run stopped before its end (Ctrl-C, a crash): checkpoints to resume from, no ``run.json`` yet."""
    return (folder / CHECKPOINTS).is_dir() and not (folder / RUN_FILE).exists()


def is_tinymath_run(folder: Path) -> bool:
    """Whether ``run.json`` or ``train_config.json`` (as train writes them) proves ``folder`` is a
    tinymath run; other files, a metrics.jsonl say, prove nothing."""
    for name in (RUN_FILE, CONFIG_FILE):
        try:
            saved = read_json_object(folder / name)
        except TinymathError:
            continue
        if {"model", "data", "lora_r", "lr"} <= saved.keys():
            return True
    return False


def partial_folder(out: Path) -> Path:
    """Where a run that replaces ``out`` trains until it is complete."""
    return out.with_name(f".{out.name}.partial")


@dataclass(frozen=True)
class TrainOutput:
    """``live``: the folder a run trains in (checkpoints, metrics, lock); ``final``: where the
    complete run ends up. They differ only for a run that replaces an earlier one."""

    live: Path
    final: Path


def plan_train_output(out: str | Path, overwrite: bool, resume: bool) -> TrainOutput:
    """Check ``--out`` before any work and say where the run will train. Reads only: the folder is
    claimed (created, locked, cleared) by `claim_train_output`."""
    out = output_path(out)
    if out.exists() and not out.is_dir():
        raise TinymathError(f"--out {out} is a file, not a folder")
    final = out  # a partial run (``.NAME.partial``, marked by ``.replaces``) resumed still replaces its sibling NAME
    if resume and (out / REPLACES).is_file() and out.name.startswith(".") and out.name.endswith(".partial"):
        final = out.with_name(out.name[1:-len(".partial")])
    if final.is_dir():  # first: a folder another run is writing to is named as such, whatever else it holds
        check_not_locked(final)
    if resume:
        return TrainOutput(live=out, final=final)
    if not (out.is_dir() and any(p.name != LOCK for p in out.iterdir())):
        return TrainOutput(live=out, final=out)
    if not overwrite:
        hint = f", or --resume {out} to continue it" if is_unfinished_run(out) else ""
        raise TinymathError(f"--out {out} already exists and is not empty; pass --overwrite to replace it{hint}")
    if not is_tinymath_run(out):
        raise TinymathError(f"--out {out} is not a training run (no {RUN_FILE} of a run); --overwrite replaces "
                            "only those: choose another --out, or empty it yourself")
    check_not_working_dir(out)
    _check_partial_is_ours(partial_folder(out), out)
    return TrainOutput(live=partial_folder(out), final=out)


def _ours_to_replace(partial: Path) -> bool:
    """Whether ``partial`` (beside the run it would replace) may be cleared: empty, or an earlier
    attempt at the replacement (marked by ``.replaces``), or a tinymath run."""
    return not any(partial.iterdir()) or (partial / REPLACES).exists() or is_tinymath_run(partial)


def _check_partial_is_ours(partial: Path, out: Path) -> None:
    if partial.exists() and not (partial.is_dir() and _ours_to_replace(partial)):
        raise TinymathError(f"{partial}, where a run replacing --out {out} trains until it is complete, holds files "
                            "tinymath did not write; move or delete it, then run the command again")


@contextmanager
def claimed_train_output(output: TrainOutput, resume: bool):
    """Hold a run's folders while it trains: the final folder's lock is taken before anything is
    read or deleted; a new run that replaces another starts its partial folder afresh. On success
    a partial run takes its final place. On failure a run with no checkpoint to resume from is
    removed (a partial one, or one this run created), so nothing half-written is left behind."""
    import shutil

    created = not output.live.exists()
    with run_lock(output.final):
        if output.live != output.final and not resume:
            _check_partial_is_ours(output.live, output.final)  # again, now that the run's lock is held
            if output.live.exists():
                shutil.rmtree(output.live)  # an earlier attempt at this replacement
            output.live.mkdir(parents=True)
            (output.live / REPLACES).write_text(output.final.name, encoding="utf-8")
        elif not resume and any(p.name != LOCK for p in output.live.iterdir()):
            raise TinymathError(f"--out {output.live} was written to by another run meanwhile; use another --out")
        try:
            yield
        except BaseException:
            _discard_unresumable(output, created, resume)
            raise
        if output.live != output.final:
            from tinymath.base.files import replace_dir

            (output.live / REPLACES).unlink(missing_ok=True)
            (output.live / LOCK).unlink(missing_ok=True)
            replace_dir(output.live, output.final)


def _discard_unresumable(output: TrainOutput, created: bool, resume: bool) -> None:
    import shutil

    checkpoints = output.live / CHECKPOINTS
    if resume or checkpoints.is_dir() and any(checkpoints.iterdir()):
        return  # a run to continue: left as it is
    if output.live != output.final or created:
        shutil.rmtree(output.live, ignore_errors=True)
        return
    for path in output.live.iterdir():  # a folder that was empty when the run began: emptied again
        if path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_not_locked(folder: Path) -> None:
    """Refuse, as `run_lock` would, a folder whose lock a training run holds; takes nothing (a
    shared probe, so the processes of one launch can all ask at once)."""
    import fcntl

    fd = _locked_lock_file(folder, os.O_RDONLY, fcntl.LOCK_SH)
    if fd is not None:
        os.close(fd)


def _locked(folder: Path, holder: bytes) -> TinymathError:
    return TinymathError(f"another training run (pid {holder.decode(errors='replace').strip() or '?'}) is writing to "
                         f"{folder}; wait for it to finish, or use another --out")


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not removed, nor replaced by another)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (own.st_dev, own.st_ino)


PROBE_SECONDS = 1.0  # how long a run waits for a probe's shared lock to go before calling the folder taken


def _locked_lock_file(folder: Path, flags: int, kind: int) -> int | None:
    """``folder/.lock`` opened with ``flags`` and flock'ed with ``kind``; refused while a run holds
    it. The exclusive lock waits out `PROBE_SECONDS` first: another command's probe
    (`check_not_locked`) holds the shared lock for an instant. A lock file its last holder removed
    after this process opened it is passed over for the one the path names now (a lock on a
    removed file keeps no one out). None: there is no lock file (``flags`` without ``O_CREAT``)."""
    import fcntl
    import time

    path = folder / LOCK
    deadline = time.monotonic() + (PROBE_SECONDS if kind == fcntl.LOCK_EX else 0)
    while True:
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            if flags & os.O_CREAT:  # the folder itself went (another command's clean-up) as this run started
                raise TinymathError(f"{folder} was removed while this run was starting in it; start it again") from None
            return None
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise _locked(folder, holder) from None
        if _names(path, fd):
            return fd
        os.close(fd)


@contextmanager
def run_lock(folder: Path):
    """Hold ``folder/.lock`` exclusively for the duration of training (created if need be, removed
    at the end: a finished or stopped run's folder keeps no lock file).

    An OS lock (``flock``): taken atomically, so of two runs started together exactly one gets
    it, and released by the kernel when a process dies, so a crash leaves no stale lock (only
    its file, which the next run takes over).
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = _locked_lock_file(folder, os.O_RDWR | os.O_CREAT, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:  # removed while still held, so a run that opened it meanwhile finds it gone and opens anew
        if _names(folder / LOCK, fd):  # not when the folder was removed or replaced meanwhile
            with suppress(OSError):
                (folder / LOCK).unlink()
        os.close(fd)


def model_card(run: dict) -> str:
    """The run folder's README.md, from its ``run.json``: what the adapter is and how to use it
    (in place of PEFT's template of blanks). The header names the base only when it is a hub id
    (the hub refuses a card whose ``base_model`` is a local path)."""
    import json

    result = run.get("result") or {}
    model = run["model"]
    local = looks_like_path(model, MODEL_SUFFIXES)
    header = ["---", *([] if local else [f"base_model: {json.dumps(model)}"]), "library_name: peft",
              "tags:", "- lora", "- gsm8k", "- tinymath", "---"]
    base = "a 4-bit NF4" if run["quant"] == "nf4" else "an unquantized"
    start = f", continuing the adapter of `{run['init_adapter']}`" if run.get("init_adapter") else ""
    lines = [
        *header, "", f"# GSM8K LoRA adapter for {Path(model).name if local else model}", "",
        f"Trained by `tinymath train --method {run.get('method', 'sft')}` on `{run['data']}`{start}: "
        f"{result.get('steps')} steps, LoRA r{run.get('lora_r')} (alpha {run.get('lora_alpha', 0):g}, "
        f"{run.get('target_modules')}) on {base} base (`{model}`), learning rate {run.get('lr', 0):g}, "
        f"prompt format `{run['format']}`.",
    ]
    best = result.get("best_val_accuracy")
    if best is not None:
        lines += ["", f"Best validation accuracy {best:.1%} (step {result.get('best_step')}); "
                      f"this folder's adapter is from step {result.get('adapter_step', result.get('steps'))}."]
    lines += ["", "```bash", "tinymath eval --adapter RUN --split test   # GSM8K test accuracy",
              "tinymath chat --adapter RUN                 # step-by-step answers",
              "tinymath merge-adapters RUN --out merged    # a standalone model (safetensors, --gguf)", "```", "",
              "Every setting and the result are in `run.json`; the loss and accuracy curves in `curves.png`.", ""]
    return "\n".join(lines)
