"""Training settings: the `TrainConfig` dataclass, and how it is resolved from defaults, a config
file (TOML, or a run's own run.json) and command-line flags, in that order of precedence.

A run saves its resolved config (``train_config.json`` at the start, ``run.json`` at the end), so
``tinymath train --config run/run.json`` repeats a run and ``--resume run`` continues one.
"""

from __future__ import annotations

import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from tinymath.data import DEFAULT_DATA, DEFAULT_MODEL
from tinymath.errors import TinymathError, raise_if_problems

RUN_FILE = "run.json"
CONFIG_FILE = "train_config.json"
# keys that run.json records about a finished run; not settings, so ignored when it is read back
RUN_RECORD_KEYS = {"dtype", "base_fingerprint", "data_stats", "versions", "git_commit", "num_processes",
                   "memory_plan", "result"}
# what may change when a run is resumed: everything else must match the saved run
RESUME_SAFE = {"max_steps", "epochs", "save_every", "keep_checkpoints", "log_every", "eval_every", "eval_limit",
               "report_to", "retention_every", "max_memory", "micro_batch_tokens", "gradient_checkpointing", "compile",
               "cuda_graphs"}


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as run.json (None = taken from the prepared data)."""

    data: str = DEFAULT_DATA
    model: str = DEFAULT_MODEL
    out: str = "run"
    format: str | None = None
    system_prompt: str | None = None
    max_length: int | None = None
    calc_annotations: str | None = None
    val_size: float = 0
    quant: str = "nf4"
    trust_remote_code: bool = False
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: float = 0.03
    weight_decay: float = 0.0
    lora_r: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    seed: int = 42
    packing: bool = True
    micro_batch_tokens: int | None = None
    max_memory: str | None = None
    gradient_checkpointing: bool = False
    compile: bool | None = None
    cuda_graphs: bool | None = None
    log_every: int = 1
    save_every: int | None = None
    keep_checkpoints: int = 2
    eval_every: int | None = None
    eval_limit: int = 200
    keep: str = "last"
    retention_every: int | None = None
    report_to: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        problems = []
        if self.lora_r <= 0:
            problems.append(f"--lora-r {self.lora_r} must be a positive rank (try 16)")
        if self.lora_alpha <= 0:
            problems.append(f"--lora-alpha {self.lora_alpha} must be positive (try 2 x --lora-r)")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout {self.lora_dropout} must be in [0, 1)")
        if self.lr <= 0:
            problems.append(f"--lr {self.lr} must be positive (try 2e-4)")
        if self.max_steps is not None and self.max_steps <= 0:
            problems.append(f"--max-steps {self.max_steps} must be at least 1")
        if self.epochs <= 0:
            problems.append(f"--epochs {self.epochs} must be positive")
        if self.batch_size <= 0:
            problems.append(f"--batch-size {self.batch_size} must be at least 1")
        if self.grad_accum <= 0:
            problems.append(f"--grad-accum {self.grad_accum} must be at least 1")
        if self.warmup < 0:
            problems.append(f"--warmup {self.warmup} must be >= 0 (a fraction of the steps, or a step count)")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens <= 0:
            problems.append(f"--micro-batch-tokens {self.micro_batch_tokens} must be positive")
        if self.max_memory is not None:
            try:
                parse_memory(self.max_memory)
            except TinymathError as exc:
                problems.append(str(exc))
        for name in ("save_every", "eval_every", "retention_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"--{name.replace('_', '-')} {value} must be a positive number of steps")
        if self.keep_checkpoints < 1:
            problems.append(f"--keep-checkpoints {self.keep_checkpoints} must be at least 1")
        if self.eval_limit <= 0:
            problems.append(f"--eval-limit {self.eval_limit} must be positive")
        if self.keep not in ("last", "best"):
            problems.append(f"--keep {self.keep}: use last or best")
        if self.keep == "best" and not self.eval_every:
            problems.append("--keep best needs --eval-every N (validation accuracy picks the best adapter)")
        if self.eval_every and not self.val_size and not self._prepared_has_validation():
            problems.append("--eval-every needs a validation split: --val-size N (raw data) or prepare-data --val-size")
        if self.report_to not in (None, "tensorboard", "wandb"):
            problems.append(f"--report-to {self.report_to}: use tensorboard or wandb")
        if self.quant not in ("nf4", "none"):
            problems.append(f"--quant {self.quant}: use nf4 or none")
        raise_if_problems(problems)

    def _prepared_has_validation(self) -> bool:
        return (Path(self.data) / "validation").is_dir()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def parse_memory(text: str) -> int:
    """``"6GB"``, ``"6GiB"``, ``"6000MB"`` -> bytes (GB and GiB both mean 2**30: what cards are sold as)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not match:
        raise TinymathError(f"--max-memory {text!r} is not a size; write it like 6GB or 5500MB")
    unit = (match.group(2) or "gb")[0]
    return int(float(match.group(1)) * (2**30 if unit == "g" else 2**20))


def _expected_type(name: str):
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0]


def _coerce(name: str, value, where: str):
    if value is None:
        return None
    expected = _expected_type(name)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool) or expected is not bool and isinstance(value, bool) \
            or not isinstance(value, expected):
        raise TinymathError(f"{where}: {name} should be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def load_config_file(path: str | Path) -> dict:
    """Settings from a TOML file (or a run.json/train_config.json): checked names and types."""
    path = Path(path)
    if not path.is_file():
        raise TinymathError(f"--config {path} does not exist")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TinymathError(f"--config {path}: TOML syntax error: {exc}") from None
    except json.JSONDecodeError as exc:
        raise TinymathError(f"--config {path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise TinymathError(f"--config {path}: expected a table of settings (name = value)")
    known = TrainConfig.field_names()
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in RUN_RECORD_KEYS:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise TinymathError(f"--config {path}: unknown setting {key!r}{hint}")
        settings[name] = _coerce(name, value, f"--config {path}")
    settings.pop("overwrite", None)  # never taken from a file: replacing a folder is asked for each time
    return settings


def resolve_train_config(flags: dict, config_file: str | None = None, resume: str | None = None) -> TrainConfig:
    """Defaults <- config file (or the resumed run's saved config) <- flags given on the command line.

    ``flags`` holds only the options the user actually passed (None = not given).
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if resume is not None:
        saved_path = Path(resume) / CONFIG_FILE
        if not saved_path.is_file():
            raise TinymathError(f"--resume {resume}: not a tinymath run folder (no {CONFIG_FILE})")
        saved = load_config_file(saved_path)
        if config_file:
            raise TinymathError("--resume continues a run with its saved settings; drop --config")
        conflicts = [k for k, v in given.items() if k not in RESUME_SAFE and k != "out" and saved.get(k) != v]
        if conflicts:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(conflicts))
            safe = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUME_SAFE))
            raise TinymathError(f"--resume: {names} would change the saved run; only {safe} may change on resume")
        settings = {**saved, **{k: v for k, v in given.items() if k in RESUME_SAFE}, "out": str(resume)}
        if "max_memory" in given and "micro_batch_tokens" not in given:
            settings["micro_batch_tokens"] = None  # plan again for the new memory limit
        return TrainConfig(**settings)
    settings = load_config_file(config_file) if config_file else {}
    settings.update(given)
    return TrainConfig(**settings)
