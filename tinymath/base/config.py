"""Training settings: the `TrainConfig` dataclass, the one declaration of every train option
(type, default, help, choices: the CLI's ``tinymath train`` options are generated from it), and
how a config is resolved from defaults, a config file (TOML, or a run's own run.json) and
command-line flags, in that order of precedence; and the check of a --model or --data value
meant as a local path (a bare name is told what a hub id looks like, the defaults as examples).

A run saves its resolved config (``train_config.json`` at the start, ``run.json`` at the end), so
``tinymath train --config run/run.json`` repeats a run and ``--resume run`` continues one. A config
is never changed while a run uses it: what a run decides for itself (micro-batch size,
checkpointing, compiling) is recorded in its result.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tinymath.base.errors import TinymathError, choice, problem_lines, problems_message, raise_if_problems
from tinymath.base.files import MODEL_SUFFIXES, missing_local, read_json_object, read_toml, split_file
from tinymath.base.prompts import CALC_ANNOTATIONS, FORMATS
from tinymath.base.quantization import QUANTIZATIONS
from tinymath.base.runs import CONFIG_FILE, MANIFEST, RUN_FILE, SUMMARY

DEFAULT_DATA = "openai/gsm8k"
DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
KEEP = ("last", "best")
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name -> the module it needs
# keys that run.json records about a finished run; not settings, so ignored when it is read back
RUN_RECORD_KEYS = {"dtype", "base_fingerprint", "data_stats", "versions", "git_commit", "num_processes",
                   "memory_plan", "result"}
# what may change when a run is resumed: everything else must match the saved run
RESUME_SAFE = {"max_steps", "epochs", "save_every", "keep_checkpoints", "log_every", "eval_every", "eval_limit",
               "report_to", "retention_every", "max_memory", "micro_batch_tokens", "gradient_checkpointing", "compile",
               "cuda_graphs", "fused_kernels", "compile_steps", "trust_remote_code"}


def option(default, help: str, panel: str | None = None, *, choices=None, flags: tuple[str, ...] = (),
           shown: str | None = None):
    """One train option: its default, its help, its help panel, its allowed values (a registry),
    its command-line spelling when not ``--name`` and how its default reads in ``--help``."""
    return field(default=default, metadata={"help": help, "panel": panel, "choices": choices, "flags": flags,
                                            "shown": shown})


SCHEDULE, LORA, DATA, SPEED, CONTROL, RL = "Schedule", "LoRA", "Data", "Speed", "Run control", "RL (--method grpo)"
# what a training method changes in the defaults (a flag or a config file still wins)
METHOD_DEFAULTS = {"grpo": {"lr": 1e-4, "warmup": 0.0, "batch_size": 32, "max_steps": 200}}
# what --init-adapter takes from the run it starts from (flags that differ are refused)
INIT_KEYS = ("model", "quant", "lora_r", "lora_alpha", "target_modules", "format", "system_prompt",
             "calc_annotations")


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as run.json (None = taken from the prepared data)."""

    data: str = option(DEFAULT_DATA, "A prepare-data folder, or raw data (prepared on the fly).")
    model: str = option(DEFAULT_MODEL, "Hub id, local folder, or .gguf.", flags=("--model", "-m"),
                        shown=f"the model a prepare-data --data was made for; else {DEFAULT_MODEL}")
    out: str = option("run", "Run folder (adapter, run.json, metrics.jsonl, checkpoints).")
    format: str | None = option(None, "Prompt format (raw data only).", DATA, choices=FORMATS, shown="chat")
    system_prompt: str | None = option(None, "System prompt (raw data only).", DATA)
    max_length: int | None = option(None, "Max tokens per example (raw data only).", DATA, shown="512")
    calc_annotations: str | None = option(None, "strip or keep <<a*b=c>> (raw data only).", DATA,
                                          choices=CALC_ANNOTATIONS, shown="keep")
    val_size: float = option(0.0, "Validation examples held out of train (raw data only).", DATA)
    quant: str = option("nf4", "Base weights: nf4 (QLoRA) or none.", choices=QUANTIZATIONS)
    trust_remote_code: bool = option(False, "Allow the model's own Python code from the hub.",
                                     flags=("--trust-remote-code",), shown="")
    epochs: float = option(3.0, "Passes over the training data.", SCHEDULE)
    max_steps: int | None = option(None, "Stop after N optimizer steps (overrides --epochs).", SCHEDULE,
                                   shown="by --epochs; 200 with --method grpo")
    batch_size: int = option(32, "Examples per GPU taken together; an optimizer step takes --batch-size x "
                                 "--grad-accum of them (with --method grpo: questions, each sampled --samples "
                                 "times). With --packing the step is cut into micro-batches by tokens.", SCHEDULE,
                             shown="32 (questions with --method grpo)")
    grad_accum: int = option(1, "Gradient accumulation (multiplies the examples per step).", SCHEDULE)
    lr: float = option(1e-3, "Peak learning rate, cosine decay.", SCHEDULE, shown="1e-3; 1e-4 with --method grpo")
    warmup: float = option(0.03, "Warm-up: a fraction of the steps (< 1) or a step count.", SCHEDULE,
                           shown="0.03; 0 with --method grpo")
    weight_decay: float = option(0.0, "AdamW weight decay.", SCHEDULE)
    lora_r: int = option(32, "LoRA rank.", LORA)
    lora_alpha: float = option(64.0, "LoRA alpha (scale = alpha / r).", LORA)
    lora_dropout: float = option(0.0, "LoRA dropout.", LORA)
    target_modules: str = option("all-linear", "'all-linear' or comma-separated names (q_proj,v_proj).", LORA)
    seed: int = option(42, "Random seed (LoRA init, data order).", SCHEDULE)
    packing: bool = option(True, "Padding-free packing (same loss, faster).", SPEED,
                           flags=("--packing/--no-packing",), shown="on")
    micro_batch_tokens: int | None = option(None, "Tokens per packed micro-batch.", SPEED,
                                            shown="sized to memory on GPU, 4096 on CPU")
    max_memory: str | None = option(None, "GPU memory to stay within, e.g. 6GB.", SPEED, shown="the free memory")
    gradient_checkpointing: bool = option(False, "Recompute activations to save memory (switched on by itself "
                                                 "when --max-memory needs it).", SPEED,
                                          flags=("--gradient-checkpointing/--no-gradient-checkpointing",), shown="")
    compile: bool | None = option(None, "torch.compile each decoder layer (fewer, fused kernels; about a minute "
                                        "of compiling first, in every new process).", SPEED,
                                  flags=("--compile/--no-compile",),
                                  shown="on with a GPU, --packing and 10M training tokens or more (25M "
                                        "where --fused-kernels can run)")
    cuda_graphs: bool | None = option(None, "Replay each micro-batch's forward and backward as a CUDA graph "
                                            "(small models wait on kernel launches otherwise).", SPEED,
                                      flags=("--cuda-graphs/--no-cuda-graphs",),
                                      shown="on with a GPU, --packing, no checkpointing and 20 steps or more")
    fused_kernels: bool | None = option(None, "Liger's fused Triton kernels for RMSNorm, rotary embeddings and "
                                              "SwiGLU in the decoder layers (pip install liger-kernel: the gpu extra); "
                                              "about 1.3x the tokens/s on TinyLlama's architecture.", SPEED,
                                        flags=("--fused-kernels/--no-fused-kernels",),
                                        shown="SFT on a GPU with --packing and liger-kernel installed, when "
                                              "the layers are not compiled")
    log_every: int = option(1, "Write metrics every N steps.", CONTROL)
    save_every: int | None = option(None, "Save a resumable checkpoint every N steps.", CONTROL)
    keep_checkpoints: int = option(2, "How many checkpoints to keep.", CONTROL)
    eval_every: int | None = option(None, "GSM8K accuracy on the validation split every N steps (needs "
                                          "--val-size, or data with a validation split).", CONTROL)
    eval_limit: int = option(200, "Validation problems per evaluation.", CONTROL)
    keep: str = option("last", "Final adapter: the last one, or the best by validation accuracy.", CONTROL,
                       choices=KEEP)
    retention_every: int | None = option(None, "Every N steps, record drift from the base on general prompts "
                                               "(KL, top-1 agreement).", CONTROL)
    report_to: str | None = option(None, "Also log to tensorboard or wandb (if installed).", CONTROL,
                                   choices=REPORTERS)
    overwrite: bool = option(False, "Replace an existing run folder (only once the new run is complete).",
                             flags=("--overwrite/--no-overwrite",), shown="")
    method: str = option("sft", "sft: supervised fine-tuning on the reference solutions. grpo: reinforcement "
                                "learning from the model's own sampled solutions, rewarded when the final answer "
                                "is right (start it from an SFT run with --init-adapter).", RL)
    init_adapter: str | None = option(None, "grpo: start from this run folder's adapter (its base model, LoRA "
                                            "shape and prompt format are taken too).", RL, shown="the base model")
    samples: int = option(8, "grpo: solutions sampled per question (the group its rewards are compared in).", RL)
    temperature: float = option(0.7, "grpo: sampling temperature of the solutions (the loss takes their "
                                     "log-probabilities at it too: on-policy).", RL)
    max_new_tokens: int = option(256, "grpo: longest sampled solution.", RL)
    format_reward: float = option(0.0, "grpo: reward for giving a '#### N' final answer at all (the correct answer "
                                       "earns 1).", RL)
    calculator: bool = option(False, "grpo: sample and validate with the calculator ('<<expr=' completed by "
                                     "tinymath's calculator, as `eval --calculator` answers); its results are "
                                     "trained on like the sampled tokens, as SFT trains on annotated solutions.", RL,
                              flags=("--calculator/--no-calculator",), shown="off")
    compile_steps: bool = option(False, "grpo: compile each decode step of the sampling with torch.compile before "
                                        "its CUDA graph is captured (as `eval --compile-steps`): about 25 s in a "
                                        "new process, then faster sampling; pays in runs of about 50 steps or "
                                        "more.", RL,
                                 flags=("--compile-steps/--no-compile-steps",), shown="off")

    def validate(self) -> None:
        """Every problem at once, each naming the flag to fix; NaN and infinity are never valid."""
        problems = [f"--{name.replace('_', '-')} {value} must be a finite number"
                    for name, value in asdict(self).items() if isinstance(value, float) and not math.isfinite(value)]
        raise_if_problems(problems)
        problems += _positive(self, ("lora_r", "lora_alpha", "lr", "epochs", "batch_size", "grad_accum",
                                     "eval_limit", "log_every"))
        problems += _positive(self, ("max_steps", "micro_batch_tokens", "save_every", "eval_every",
                                     "retention_every", "max_length"), optional=True)
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout {self.lora_dropout} must be in [0, 1)")
        for name in ("warmup", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 0")
        problems += val_size_problems(self.val_size)
        if self.max_memory is not None:
            try:
                parse_memory(self.max_memory)
            except TinymathError as exc:
                problems.append(str(exc))
        if self.keep_checkpoints < 1:
            problems.append(f"--keep-checkpoints {self.keep_checkpoints} must be at least 1")
        problems += choice("--keep", self.keep, KEEP) + choice("--quant", self.quant, QUANTIZATIONS)
        if self.report_to is not None:
            problems += choice("--report-to", self.report_to, REPORTERS)
        if self.format is not None:
            problems += choice("--format", self.format, FORMATS)
        if self.calc_annotations is not None:
            problems += choice("--calc-annotations", self.calc_annotations, CALC_ANNOTATIONS)
        problems += _positive(self, ("samples", "max_new_tokens", "temperature"))
        if self.method == "grpo" and self.samples == 1:  # (0 or less: "must be positive" says it)
            problems.append(f"--samples {self.samples}: GRPO compares each solution with the others of its "
                            "question, so it needs at least 2 (try 8)")
        if self.format_reward < 0:
            problems.append(f"--format-reward {self.format_reward} must be >= 0")
        if self.calculator and self.method != "grpo":
            problems.append("--calculator samples solutions with the calculator in reinforcement learning: add "
                            "--method grpo (SFT trains on the reference solutions)")
        if self.compile_steps and self.method != "grpo":
            problems.append("--compile-steps compiles the decode steps of GRPO's sampling: add --method grpo")
        elif self.compile_steps and self.compile is False:
            problems.append("--compile-steps compiles the steps of fast decoding, which --no-compile turns off "
                            "(drop one of them)")
        if self.init_adapter and self.method != "grpo":
            problems.append("--init-adapter starts reinforcement learning from a run: add --method grpo")
        if self.keep == "best" and not self.eval_every:
            problems.append("--keep best needs --eval-every N (validation accuracy picks the best adapter)")
        data = Path(self.data).expanduser()
        if self.val_size and (data / MANIFEST).is_file():
            problems.append(f"--val-size holds problems out of raw data; --data {self.data} is already prepared: "
                            "run prepare-data with --val-size instead")
        if self.eval_every and not self.val_size and not (data / "validation").is_dir() \
                and not (data.is_dir() and split_file(data, "validation")):
            problems.append("--eval-every needs a validation split: --val-size N (raw data), prepare-data --val-size, "
                            "or a validation.jsonl beside train.jsonl")
        raise_if_problems(problems)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _positive(config: TrainConfig, names: tuple[str, ...], optional: bool = False) -> list[str]:
    problems = []
    for name in names:
        value = getattr(config, name)
        if (value is not None or not optional) and not value > 0:
            problems.append(f"--{name.replace('_', '-')} {value} must be positive")
    return problems


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


def _coerce(name: str, value, where: str, key: str | None = None):
    """``value`` as setting ``name`` takes it; ``key``: how the file spelled the name, for the message."""
    if value is None:
        return None
    expected = _expected_type(name)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool) or expected is not bool and isinstance(value, bool) \
            or not isinstance(value, expected):
        raise TinymathError(f"{where}: {key or name} should be {expected.__name__}, got {value!r} "
                            f"({type(value).__name__})")
    return value


def load_config_file(path: str | Path, problems: list[str] | None = None) -> dict:
    """Settings from a TOML file (or a run.json/train_config.json): checked names and types. Given
    ``problems``, unknown names and wrong types are added to it (and left out of the settings), to be
    listed with the values' own problems; otherwise they are raised here."""
    path = Path(path)
    if path.is_dir():
        hint = f"; give {path / RUN_FILE} to repeat that run" if (path / RUN_FILE).is_file() else ""
        raise TinymathError(f"--config {path} is a folder, not a settings file (TOML, or a run's {RUN_FILE}){hint}")
    if not path.is_file():
        raise TinymathError(f"--config {path} does not exist")
    try:
        raw = read_json_object(path, "a table of settings") if path.suffix == ".json" else read_toml(path)
    except TinymathError as exc:
        raise TinymathError(f"--config {exc}") from None
    _check_not_another_record(path, raw)
    known = TrainConfig.field_names()
    settings, found = {}, []  # every unknown name and wrong type in the file at once
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in RUN_RECORD_KEYS:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)  # num_epochs: epochs; splits: none
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            found.append(f"--config {path}: unknown setting {key!r}{hint}")
            continue
        try:
            settings[name] = _coerce(name, value, f"--config {path}", key)
        except TinymathError as exc:
            found.append(str(exc))
    if problems is None:
        raise_if_problems(found)
    else:
        problems += found
    # never taken from a file: replacing a folder, and running a model's own code, are asked for each time
    settings.pop("overwrite", None)
    settings.pop("trust_remote_code", None)
    return settings


def _check_not_another_record(path: Path, raw: dict) -> None:
    """Refuse another command's record given as --config (its keys are no settings), saying what to give."""
    if path.name == MANIFEST:
        raise TinymathError(f"--config {path} is a prepare-data record, not a settings file; give its folder as "
                            f"--data {path.parent}")
    if path.name == SUMMARY:
        settings = raw.get("settings")
        adapter = settings.get("adapter") if isinstance(settings, dict) else None
        run = Path(adapter) / RUN_FILE if isinstance(adapter, str) else None
        hint = f"; to repeat the run it evaluated, give --config {run}" if run and run.is_file() else ""
        raise TinymathError(f"--config {path} is an eval summary, not a settings file (TOML, or a run's "
                            f"{RUN_FILE}){hint}")


def resolve_train_config(flags: dict, config_file: str | None = None, resume: str | None = None) -> TrainConfig:
    """Defaults <- config file (or the resumed run's saved config) <- flags given on the command line.

    ``flags`` holds only the options the user actually passed (None = not given).
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if resume is not None:
        saved_path = Path(resume).expanduser() / CONFIG_FILE
        if not Path(resume).expanduser().exists():
            raise TinymathError(f"--resume {resume} does not exist")
        if not saved_path.is_file():
            raise TinymathError(f"--resume {resume}: not a tinymath run folder (no {CONFIG_FILE})")
        saved = load_config_file(saved_path)
        if config_file:
            raise TinymathError("--resume continues a run with its saved settings; drop --config")
        absolute = absolute_paths(given)  # a path given again, relative or not, is the same setting
        if "out" in given and Path(given["out"]).expanduser().absolute() != Path(resume).expanduser().absolute():
            raise TinymathError(f"--resume {resume} continues that run in its own folder; drop --out {given['out']}")
        conflicts = [k for k, v in given.items()
                     if k not in RESUME_SAFE and k != "out" and saved.get(k) not in (v, absolute[k])]
        if conflicts:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(conflicts))
            safe = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUME_SAFE))
            raise TinymathError(f"--resume: {names} would change the saved run; only {safe} may change on resume")
        settings = {**saved, **{k: v for k, v in given.items() if k in RESUME_SAFE}, "out": str(resume)}
        if "epochs" in given and "max_steps" not in given:
            settings["max_steps"] = None  # a length asked for in epochs is not cut by a saved step count
        if "max_memory" in given and "micro_batch_tokens" not in given:
            settings["micro_batch_tokens"] = None  # plan again for the new memory limit
        return TrainConfig(**settings)
    if not config_file:
        return _new_train_config({}, given)
    file_problems: list[str] = []  # the file's unknown names and wrong types: listed with every other problem
    from_file = load_config_file(config_file, file_problems)
    try:
        config = _new_train_config(from_file, given)
        _name_the_file(config, [k for k in from_file if k not in given], config_file)
    except TinymathError as exc:
        if not file_problems:
            raise
        problems, notes = problem_lines(exc)
        raise TinymathError("\n".join([problems_message(file_problems + problems), *notes])) from None
    raise_if_problems(file_problems)
    return config


def _new_train_config(from_file: dict, given: dict) -> TrainConfig:
    """A new run's settings (not validated): the method's defaults <- the config file <- flags."""
    settings = {**from_file, **given}
    if settings.get("method", "sft") != "grpo":  # RL-only flags would be ignored by SFT: say so
        panels = {f.name: f.metadata.get("panel") for f in fields(TrainConfig)}
        ignored = [k for k in given if panels.get(k) == RL and k not in ("method", "init_adapter", "calculator")]
        if ignored:
            names = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(ignored))
            raise TinymathError(f"{names}: reinforcement-learning settings; add --method grpo (SFT trains on the "
                                "reference solutions and would ignore them)")
    defaults = dict(METHOD_DEFAULTS.get(settings.get("method", "sft"), {}))
    if "epochs" in settings:  # a length asked for in epochs is not cut by the method's default step count
        defaults.pop("max_steps", None)
    settings = {**defaults, **settings}
    if settings.get("init_adapter"):
        settings.update(_from_init_adapter(settings["init_adapter"], settings))
    elif "model" not in settings:
        settings.update(_from_prepared_data(settings.get("data", DEFAULT_DATA)))
    return TrainConfig(**absolute_paths(settings))


def _name_the_file(config: TrainConfig, from_file: list[str], config_file: str) -> None:
    """Validate ``config``; a problem with a setting the file gave (not a flag) says it came from the file."""
    try:
        config.validate()
    except TinymathError as exc:
        problems, _ = problem_lines(exc)
        named = [k.replace("_", "-") for k in from_file  # the setting a problem is about: the flag it starts with
                 if any(re.match(rf"--{k.replace('_', '-')}(?![\w-])", line) for line in problems)]
        if not named:
            raise
        raise TinymathError(f"{exc}\n({', '.join(named)}: set in --config {config_file})") from None


def check_local_source(flag: str, source: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse a ``flag`` value meant as a local path that does not exist (a hub id passes)."""
    if missing_local(source, suffixes):
        raise TinymathError(f"{flag} {source} does not exist{_hub_id_hint(flag, source, suffixes)}")


def _hub_id_hint(flag: str, source: str, suffixes: tuple[str, ...]) -> str:
    """For a bare name (``gsm8k``: no folder, no file suffix), what a hub id looks like instead."""
    if "/" in source or source.startswith((".", "~")) or Path(source).suffix in suffixes:
        return ""
    return f" here; a hub id looks like owner/name (e.g. {DEFAULT_DATA if flag == '--data' else DEFAULT_MODEL})"


PATH_SETTINGS = ("data", "model", "init_adapter", "adapter", "base")  # settings that may name a local path


def val_size_problems(val_size: float) -> list[str]:
    """``--val-size``: a whole count (>= 1) of problems to hold out, or a fraction below 1."""
    if val_size < 0:
        return [f"--val-size {val_size} must be >= 0 (a count, or a fraction below 1)"]
    if val_size >= 1 and val_size != int(val_size):
        return [f"--val-size {val_size} must be a whole count of problems, or a fraction below 1"]
    return []


def absolute_paths(settings: dict, keys: tuple[str, ...] = PATH_SETTINGS) -> dict:
    """Local paths (the settings ``keys``) as absolute ones, so that the run.json or summary.json
    they are saved in works from any folder (eval, chat, merge-adapters, --resume); a hub id (no
    such local path) stays as given."""
    import os

    return {key: os.path.abspath(os.path.expanduser(value))
            if key in keys and isinstance(value, str) and value and Path(value).expanduser().exists()
            else value for key, value in settings.items()}


def _from_prepared_data(data: str) -> dict:
    """The model a prepare-data folder was tokenized for, as the default --model (data tokenized for
    one model trains no other)."""
    manifest = Path(data).expanduser() / MANIFEST
    model = read_json_object(manifest, "a prepare-data manifest").get("model") if manifest.is_file() else None
    if not isinstance(model, str) or not model:
        return {}
    if missing_local(model, MODEL_SUFFIXES):
        raise TinymathError(f"--data {data} was prepared for {model}, which is no longer there; "
                            "give --model (the same model, wherever it is now)")
    return {"model": model}


def _from_init_adapter(run_dir: str, settings: dict) -> dict:
    """The settings a run started from ``run_dir``'s adapter must share with it (base model, LoRA
    shape, prompt format); one given otherwise is refused."""
    from tinymath.base.runs import load_run

    run = load_run(run_dir).config
    if Path(settings.get("out", "run")).expanduser().resolve() == Path(run_dir).expanduser().resolve():
        raise TinymathError(f"--out {settings.get('out', 'run')} is the run --init-adapter starts from; give the "
                            "new run a folder of its own (it would replace the adapter it learns from)")
    taken = {key: run.get(key) for key in INIT_KEYS if key in run}
    absolute = absolute_paths(settings)  # a path given relative is the same as the run's absolute one
    clash = [key for key, value in taken.items() if key in settings and value not in (settings[key], absolute[key])]
    if clash:
        names = ", ".join(f"--{k.replace('_', '-')} {settings[k]}" for k in clash)
        raise TinymathError(f"--init-adapter {run_dir}: that run has {', '.join(f'{k} {taken[k]}' for k in clash)}, "
                            f"not {names}; drop {'it' if len(clash) == 1 else 'them'} (a run continues its "
                            "adapter's base, LoRA shape and prompt)")
    return taken
