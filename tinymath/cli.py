"""The `tinymath` command: options -> one service call -> rich output. No ML logic here.

Heavy libraries are imported inside the commands, so `tinymath --help` is instant. A
`TinymathError` (a user mistake) is printed as one clean message with a non-zero exit.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import inspect
import json
import os
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tinymath.base.config import DEFAULT_DATA, DEFAULT_MODEL, TrainConfig
from tinymath.base.errors import Terminated, TinymathError
from tinymath.base.prompts import CALC_ANNOTATIONS, FORMATS
from tinymath.base.quantization import QUANTIZATIONS
from tinymath.base.runs import PREDICTIONS
from tinymath.lib.gguf_export import GGUF_TYPES
from tinymath.lib.grpo import METHODS
from tinymath.lib.lora import MERGE_BASES
from tinymath.lib.scoring import PROTOCOLS
from tinymath.services.merge import DTYPES


class _Group(typer.core.TyperGroup):
    """Typer's group, with `--help` shown as the flag it is (no `<bool>` value), and piped help (to a
    pager or a file) as wide as the widest line needs rather than cut to 80 columns, here and in every
    command."""

    def get_help_option(self, ctx):
        return _flag(super().get_help_option(ctx))

    def format_help(self, ctx, formatter):
        _widening(super().format_help)(ctx, formatter)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            command.get_help_option = lambda ctx, get=command.get_help_option: _flag(get(ctx))
            command.format_help = _widening(command.format_help)
        return command


PIPED_WIDTH = 120  # columns of output (tables, --help) written to a pipe or file; a terminal keeps its own width


def _widening(format_help):
    """``format_help`` writing piped help `PIPED_WIDTH` wide (TERMINAL_WIDTH, when set, still wins)."""

    def widened(ctx, formatter):
        from typer import rich_utils  # imported by help alone: other commands start without it

        if rich_utils.MAX_WIDTH is None and _piped(sys.stdout):
            rich_utils.MAX_WIDTH = PIPED_WIDTH
        return format_help(ctx, formatter)

    return widened


def _flag(option):
    if option is not None:
        option.metavar = FLAG
    return option


app = typer.Typer(
    name="tinymath",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _console(stderr: bool = False) -> Console:
    """rich's console; to a pipe or file (a log, `| tee`) as wide as `PIPED_WIDTH`, not rich's 80
    columns (COLUMNS, when set, still wins)."""
    return Console(stderr=stderr, width=PIPED_WIDTH if _piped(sys.stderr if stderr else sys.stdout) else None)


def _piped(stream) -> bool:
    """Whether ``stream`` goes to a pipe or file (not a terminal, nor closed: ``2>&-`` makes it None)
    with no COLUMNS set."""
    return stream is not None and not stream.isatty() and not os.environ.get("COLUMNS")


out_console = _console()
err_console = _console(stderr=True)


def _print_version(asked: bool) -> None:
    if asked:
        from tinymath import __version__

        print(f"tinymath {__version__}")
        raise typer.Exit()


FLAG = ""  # the metavar of an on/off flag: it takes no value (Typer would show "<bool>")


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print tinymath's version and exit.", metavar=FLAG)] = False,
):
    """Fine-tune small chat LLMs to solve grade-school math step by step (QLoRA on GSM8K).

    Examples:

    ```
    tinymath prepare-data --data openai/gsm8k --out prep
    tinymath train --data prep --out run
    tinymath eval --adapter run --split test --out ev
    echo "What is 12 * 7?" | tinymath chat --adapter run
    accelerate launch --num_processes 2 -m tinymath train --data prep --out run
    ```

    Each command's --help has its own examples. On a GPU, `pip install liger-kernel` (the gpu
    extra) gives training Liger's fused kernels (about 1.3x faster).
    """


def choices(name: str, registry) -> type[Enum]:
    """A Typer choice type made from one of tinymath's registries (the single list of its kind)."""
    return Enum(name, {key: key for key in registry}, type=str)


Format = choices("Format", FORMATS)
Quant = choices("Quant", QUANTIZATIONS)
Calc = choices("Calc", CALC_ANNOTATIONS)
DType = choices("DType", DTYPES)
Protocol = choices("Protocol", PROTOCOLS)
MergeBase = choices("MergeBase", MERGE_BASES)
GgufType = choices("GgufType", GGUF_TYPES)


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, kernel hints) is not for our users."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # without importing datasets (0.4 s)
    warnings.filterwarnings("ignore")
    for name in ("bitsandbytes", "transformers", "peft", "accelerate", "datasets", "lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# Python's cyclic garbage collector, at its defaults, runs a full pass over every object (about
# 600k once torch and transformers are loaded) several times while a command imports and loads, and
# finds next to nothing: commands set its first threshold from 700 to 50,000 allocations. It still
# collects, so a long run keeps no garbage; a 2-core CPU eval of 2 problems takes 0.89x as long.
GC_THRESHOLDS = (50_000, 20, 100)
SAYING_SECONDS = 3  # how long the other processes of a launch wait for the first to say a shared error


def command(fn):
    """Run a command; user mistakes become one message on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            return fn(*args, **kwargs)
        except TinymathError as exc:
            if not (exc.every_process and _launched_rank()):  # said once a machine, by its first process
                _print_error(str(exc))
            else:  # the launcher stops every process once one has ended: let the first say it before
                import time

                time.sleep(SAYING_SECONDS)
            raise typer.Exit(exc.exit_code)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # a path given on the command line: the user's to shorten
                _print_error(f"{exc.filename or 'a path given'}: {exc.strerror}; use a shorter path")
                raise typer.Exit(1)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise
            _print_error(f"{exc.filename or 'an output file'}: {exc.strerror}; nothing was left half-written, "
                         "free some space or choose another --out and run the command again")
            raise typer.Exit(1)
        except Terminated:
            rank = _launched_rank()
            if rank is None:
                err_console.print("[yellow]stopped by SIGTERM[/yellow]")
            elif rank == 0:  # once a machine: most often the launcher stopping the rest after one failed
                err_console.print("[yellow]stopped by SIGTERM[/yellow], which a launcher sends every process "
                                  "once one of them has failed: that process's error, if any, says why",
                                  soft_wrap=True)
            raise typer.Exit(143)
        except KeyboardInterrupt:
            if not _launched_rank():  # Ctrl-C reaches every process of a launch: said once a machine
                err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)

    return wrapper


def _launched_rank() -> int | None:
    """This process's rank on its machine under ``accelerate launch`` or torchrun (None: a plain
    command): what every process would say, the first of each machine says, on that machine's terminal."""
    import os

    launched = os.environ.get("WORLD_SIZE", "1") != "1" and "LOCAL_RANK" in os.environ
    return int(os.environ["LOCAL_RANK"]) if launched else None


def _print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _shows_progress(json_out: bool) -> bool:
    """Progress bars (on stderr): always, except with --json where stderr is not a terminal (a
    script reading the JSON; a person watching still sees the work move)."""
    return not json_out or sys.stderr.isatty()


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local Hugging Face folder, or .gguf file.")]
DataOpt = Annotated[str, typer.Option(help="Hub id, a folder with train.jsonl/test.jsonl, or one .jsonl/.json/.parquet file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, nothing else.", metavar=FLAG)]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing output folder.", metavar=FLAG)]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code from the hub (off unless you ask).", metavar=FLAG)]


@app.command("prepare-data")
@command
def prepare_data_cmd(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("prep"),
    data: DataOpt = DEFAULT_DATA,
    model: ModelOpt = DEFAULT_MODEL,
    format: Annotated[Format, typer.Option(help="Prompt format: the tokenizer's chat template, or ### Instruction text.")] = Format.chat,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt (chat format) or preamble.")] = None,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    calc_annotations: Annotated[Calc, typer.Option(help="GSM8K calculator annotations <<48/2=24>>: keep (the model learns to write them; eval --calculator fills in results) or strip.")] = Calc.keep,
    val_size: Annotated[float, typer.Option(help="Validation examples taken from train: a count, or a fraction < 1.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N rows of each split.")] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """Format, tokenize and loss-mask GSM8K for training.

    Examples:

    ```
    tinymath prepare-data --out prep
    tinymath prepare-data --data ./gsm8k --model SmolLM2-135M-Instruct.Q4_1.gguf --out prep --val-size 200
    ```
    """
    from tinymath.services.prepare import prepare_data

    manifest = prepare_data(data=data, model=model, out=out, fmt=format.value, system_prompt=system_prompt,
                            max_length=max_length, calc_annotations=calc_annotations.value, val_size=val_size,
                            limit=limit, overwrite=overwrite, trust_remote_code=trust_remote_code,
                            show_progress=_shows_progress(json_out))
    if json_out:
        return _print_json(manifest)
    from rich import box
    from rich.table import Table

    table = Table(title=f"prepared {escape(str(out))} (lengths in tokens)", box=box.SIMPLE_HEAD)
    for col in ("split", "examples", "dropped", "truncated", "tokens", "mean", "p95", "max"):  # fits 80 columns
        table.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for split, s in manifest["splits"].items():
        table.add_row(split, str(s["examples"]), str(s.get("dropped_too_long", 0)), str(s["truncated"]),
                      f"{s['tokens']:,}", str(s["length"]["mean"]), str(s["length"]["p95"]), str(s["length"]["max"]))
    out_console.print(table)
    if "test" in manifest["splits"]:
        out_console.print("[dim]no test problem is dropped, whatever its length: evaluation asks every one[/dim]")


# train options whose registry lives above the base layer (the training methods are library classes)
LIBRARY_CHOICES = {"method": METHODS}


def _shown_default(f) -> str:
    """How a train option's default reads in --help: from its one declaration in `TrainConfig`."""
    shown = f.metadata["shown"]
    if shown is None and f.default is not None:
        shown = format(f.default, "g") if isinstance(f.default, float) else str(f.default)
    return f" [default: {shown}]" if shown else ""


def _train_option(f) -> inspect.Parameter:
    """The command-line option of one `TrainConfig` field (None when not given, so a config file or
    a resumed run's saved value is not overridden by a default)."""
    meta = f.metadata
    hint = typing.get_type_hints(TrainConfig)[f.name]
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    registry = meta["choices"] if meta["choices"] is not None else LIBRARY_CHOICES.get(f.name)
    if registry is not None:
        kind = choices(f.name.title().replace("_", ""), registry)
    option = typer.Option(*meta["flags"], help=meta["help"] + _shown_default(f), rich_help_panel=meta["panel"],
                          show_default=False, metavar=FLAG if kind is bool else None)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def _with_train_options(fn):
    """Give ``fn`` (which takes ``**options``) one keyword option per `TrainConfig` field."""
    from dataclasses import fields

    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(fn, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params = [_train_option(f) for f in fields(TrainConfig)] + own
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


@app.command("train")
@command
@_with_train_options
def train_cmd(
    config: Annotated[Optional[Path], typer.Option(help="TOML file (or a run's run.json) with any train options; flags override it.", rich_help_panel="Run control", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder from its latest checkpoint.", rich_help_panel="Run control", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and data/token counts, then exit.", rich_help_panel="Run control", metavar=FLAG)] = False,
    json_out: JsonOpt = False,
    **options,
):
    """QLoRA fine-tuning: a 4-bit NF4 base with trainable LoRA adapters.

    The run folder is all later commands need: `tinymath eval --adapter run`,
    `tinymath merge-adapters run --out merged`, `tinymath chat --adapter run`.
    Ctrl-C saves a checkpoint; `--resume run` continues exactly where it stopped.

    Examples:

    ```
    tinymath train --out run
    tinymath train --data prep --model SmolLM2-135M-Instruct.Q4_1.gguf --out run --max-steps 3 --batch-size 2
    tinymath train --config recipe.toml --lr 1e-4 --dry-run
    tinymath train --resume run
    tinymath train --method grpo --init-adapter run --data prep --out run-rl --eval-every 40 --keep best
    accelerate launch --num_processes 2 -m tinymath train --data prep --out run
    ```
    """
    from tinymath.base.config import resolve_train_config
    from tinymath.lib.distributed import checked_together, end_processes, launched_together, process_state

    flags = {name: value.value if isinstance(value, Enum) else value for name, value in options.items()}
    # under a launcher every process joins before reading a file (--config, --resume): none stops alone
    joined = process_state() if launched_together() else None
    resolved = checked_together(joined, lambda: resolve_train_config(flags, str(config) if config else None,
                                                                      str(resume) if resume else None))
    if dry_run:
        from tinymath.services.train import dry_run_report

        report = checked_together(joined, lambda: dry_run_report(resolved, resume=resume is not None))
        if not _launched_rank():  # under a launcher: one report a machine, its first process's
            _print_json(report) if json_out else out_console.print_json(data=report)
        end_processes(process_state())
        if report["out_refused"]:  # the report is still printed; the exit status says the run would not start
            raise TinymathError(f"the run itself would stop here: {report['out_refused']}", every_process=True)
        return
    from tinymath.services.train import train

    summary = train(resolved, show_progress=_shows_progress(json_out), resume=resume is not None)
    state = process_state()
    end_processes(state)
    if not state.is_main_process:  # under accelerate launch: one report, rank 0's
        return
    if json_out:
        return _print_json(summary)
    held_out = f", validation loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else ""
    if summary.get("reward_last_steps") is not None:
        window = _steps(summary.get("reward_window_steps", 10))
        held_out += (f", sample reward {summary['reward_first_steps']:.3f} -> {summary['reward_last_steps']:.3f} "
                     f"(mean of the first {window}, of the last {window})")
    if summary.get("best_val_accuracy") is not None:
        held_out += f", best validation accuracy {summary['best_val_accuracy']:.1%} (step {summary['best_step']})"
    kept = summary.get("adapter_step", summary["steps"])
    shipped = "" if kept == summary["steps"] else f"; the adapter kept is step {kept}'s"
    if summary.get("learning_steps") == 0:  # GRPO: every group unanimous, every step
        shipped += "; no step had a question whose samples differed in reward, so the adapter is unchanged"
    out_console.print(f"[bold green]done[/bold green]: {_steps(summary['steps'])}, final loss "
                      f"{summary['final_loss']:.4f}{held_out}, {summary['real_tokens_per_s']:,.0f} tokens/s -> "
                      f"{escape(str(summary['out']))}{shipped}", soft_wrap=True)  # a path is not broken over lines


@app.command("merge-adapters")
@command
def merge_cmd(
    run: Annotated[Path, typer.Argument(help="A `tinymath train` run folder.", metavar="RUN")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model.")] = Path("merged"),
    dtype: Annotated[DType, typer.Option(help="Weight dtype of the merged model.")] = DType.bf16,
    merge_base: Annotated[MergeBase, typer.Option(help="Merge into the NF4-dequantized base (what the adapter was trained against) or the original weights.")] = MergeBase.dequantized,
    gguf: Annotated[Optional[GgufType], typer.Option(help="Also write a .gguf for llama.cpp / Ollama (f16, or q8_0: half the size) and an Ollama Modelfile.", show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """Merge a run's LoRA adapter into a standalone model (safetensors).

    Examples:

    ```
    tinymath merge-adapters run --out merged
    tinymath merge-adapters run --out merged-fp32 --dtype fp32 --merge-base original
    tinymath merge-adapters run --out merged --gguf q8_0 && cd merged && ollama create mathtiny -f Modelfile
    ```
    """
    from tinymath.services.merge import merge_adapters

    with err_console.status("merging...", spinner="dots") if not json_out else _nothing():
        report = merge_adapters(run, out, dtype=dtype.value, merge_base=merge_base.value, overwrite=overwrite,
                                trust_remote_code=trust_remote_code, gguf=gguf.value if gguf else None)
    if json_out:
        return _print_json(report)
    out_console.print(f"[bold green]merged[/bold green] the adapter of {escape(str(run))} into "
                      f"{escape(report['base_model'])} -> {escape(str(out))}  (largest logit difference vs "
                      f"base+adapter: {report['max_logit_diff']:.2e}, tolerance {report['tolerance']:.2e})",
                      soft_wrap=True)
    if report.get("gguf"):
        out_console.print(f"for llama.cpp and Ollama: {escape(str(Path(out) / report['gguf']['file']))} and "
                          f"{escape(str(Path(out) / report['gguf']['modelfile']))}", soft_wrap=True)


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


@contextlib.contextmanager
def _kept_for_good():
    """Load what the process keeps to its end (torch, transformers, a model) outside the cyclic
    garbage collector: its full passes walk all ~600k of their objects and find next to nothing,
    several times while they load and again at exit (about 1 s of a one-answer chat). The few MB
    of import leftovers that are garbage by the end are kept, frozen with the rest."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.freeze()  # later collections, the one at exit included, skip what is loaded by now


def _gsm8k(o: dict) -> None:
    """``eval --task gsm8k``: accuracy by the chosen backend."""
    return EVAL_BACKENDS[o["backend"].value](o)


def _tinymath_gsm8k(o: dict) -> None:
    """``eval --task gsm8k``: accuracy, as a table or JSON."""
    from tinymath.lib.distributed import end_processes, process_state
    from tinymath.services.evaluate import evaluate

    summary = evaluate(model=o["model"], adapter=str(o["adapter"]) if o["adapter"] else None, data=o["data"],
                       split=o["split"], limit=o["limit"], out=o["out"], batch_size=o["batch_size"],
                       max_new_tokens=_answer_tokens(o, 256), quant=o["quant"].value,
                       fmt=o["format"].value if o["format"] else None, system_prompt=o["system_prompt"],
                       merge_base=o["merge_base"].value, overwrite=o["overwrite"],
                       trust_remote_code=o["trust_remote_code"], show_progress=_shows_progress(o["json_out"]),
                       calculator=o["calculator"], samples=o["samples"], temperature=o["temperature"],
                       seed=o["seed"], protocol=o["protocol"].value, compile=o["compile"],
                       compile_steps=o["compile_steps"])
    state = process_state()
    end_processes(state)
    if not state.is_main_process:  # under accelerate launch: one report, rank 0's
        return
    if o["json_out"]:
        return _print_json(summary)
    _print_gsm8k(summary, summary["settings"]["split"] or Path(summary["settings"]["data"]).name, o["samples"], o["out"])
    if o["data"] is None and summary["settings"]["data"] != DEFAULT_DATA:  # not the default a user may expect
        out_console.print(f"problems from {escape(summary['settings']['data'])}, the GSM8K that "
                          f"{escape(str(o['adapter']))} was trained on (--data chooses others)", highlight=False,
                          soft_wrap=True)


def _print_gsm8k(summary: dict, split: str, samples: int, out) -> None:
    from rich.table import Table

    table = Table(title="GSM8K " + escape(split))
    table.add_column("metric")
    table.add_column("value", justify="right")
    low, high = summary["ci95"]
    majority = "maj_at_k" in summary  # the accuracy of the majority answer of --samples
    table.add_row(f"maj@{samples} accuracy" if majority else "accuracy",
                  f"{summary['accuracy']:.2%}  (95% CI {low:.1%}-{high:.1%})")
    if majority:
        table.add_row(f"pass@{samples}", f"{summary['pass_at_k']:.2%}")
        table.add_row("single-sample accuracy", f"{summary['single_sample_accuracy']:.2%}")
    else:
        table.add_row("accuracy (strict: #### marker)", f"{summary['accuracy_strict']:.2%}")
        table.add_row("no answer found", f"{summary['invalid_rate']:.1%}")
    table.add_row("problems", str(summary["n"]))
    table.add_row("tokens generated", f"{summary['tokens_generated']:,} ({summary['tokens_per_s']:,.0f}/s)")
    out_console.print(table)
    if out:
        out_console.print(f"predictions -> {escape(str(out / PREDICTIONS))}")


def _answer_tokens(o: dict, default: int) -> int:
    """``--max-new-tokens`` as given, else the task's default."""
    return default if o["max_new_tokens"] is None else o["max_new_tokens"]


def _retention(o: dict) -> None:
    """``eval --task retention``: drift from the base model, as a table or JSON."""
    from tinymath.services.retention import evaluate_retention

    out, json_out = o["out"], o["json_out"]
    status = err_console.status("measuring drift from the base model...") if not json_out else _nothing()
    with status:
        summary = evaluate_retention(model=o["model"], adapter=str(o["adapter"]) if o["adapter"] else None,
                                     base=o["base"], out=out, limit=o["limit"], lm_eval_tasks=o["lm_eval"],
                                     max_new_tokens=_answer_tokens(o, 64),
                                     overwrite=o["overwrite"], trust_remote_code=o["trust_remote_code"])
    if json_out:
        return _print_json(summary)
    from rich.table import Table

    table = Table(title=f"retention: {summary['verdict']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("KL(base || tuned), nats/token", f"{summary['kl']:.4f}")
    table.add_row("perplexity ratio tuned/base", f"{summary['ppl_ratio']:.3f}")
    table.add_row("top-1 next-token agreement", f"{summary['top1_agreement']:.1%}")
    table.add_row("prompts / scored tokens", f"{summary['n']} / {summary['tokens']:,}")
    out_console.print(table)
    if out:
        out_console.print(f"side by side -> {escape(str(Path(out) / 'retention.md'))}")


def _lm_eval(o: dict) -> None:
    """``eval --backend lm-eval``: lm-evaluation-harness's own gsm8k task."""
    from tinymath.services.harness import evaluate_with_lm_eval

    status = err_console.status("lm-evaluation-harness: gsm8k...") if not o["json_out"] else _nothing()
    with status:
        summary = evaluate_with_lm_eval(model=o["model"], adapter=str(o["adapter"]) if o["adapter"] else None,
                                        data=o["data"], limit=o["limit"], out=o["out"], batch_size=o["batch_size"],
                                        max_new_tokens=_answer_tokens(o, 256), merge_base=o["merge_base"].value,
                                        overwrite=o["overwrite"], trust_remote_code=o["trust_remote_code"])
    if o["json_out"]:
        return _print_json(summary)
    out_console.print(f"lm-evaluation-harness gsm8k on {summary['n']} problems: strict-match "
                      f"{summary['accuracy_strict']:.2%}, flexible-extract {summary['accuracy']:.2%}")


# eval --backend name -> what generates and scores GSM8K (the CLI's --backend choices)
EVAL_BACKENDS = {"tinymath": _tinymath_gsm8k, "lm-eval": _lm_eval}
Backend = choices("Backend", EVAL_BACKENDS)

# eval --task name -> what runs it (the CLI's --task choices)
EVAL_TASKS = {"gsm8k": _gsm8k, "retention": _retention}
Task = choices("Task", EVAL_TASKS)


@app.command("eval")
@command
def eval_cmd(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, folder, .gguf, or a merge-adapters output.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="A `tinymath train` run folder (its base, format and prompt are reused).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Hub id, a folder with train.jsonl/test.jsonl, one .jsonl/.json/.parquet file, or a prepare-data folder. "
                                                    f"[default: with --adapter, the run's own data where this machine holds the split; else {DEFAULT_DATA}]", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Which split to score.")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N problems.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Problems generated together (default: as many as GPU memory allows; 16 on CPU).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Longest answer generated. [default: 256; 64 for --task retention]", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for predictions.jsonl and summary.json.")] = None,
    quant: Annotated[Quant, typer.Option(help="Weights for --model: unquantized (fast) or NF4.", rich_help_panel="Model and prompt")] = Quant.none,
    format: Annotated[Optional[Format], typer.Option(help="Prompt format (default: the run's, else chat).", rich_help_panel="Model and prompt")] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt (default: the run's).", rich_help_panel="Model and prompt")] = None,
    merge_base: Annotated[MergeBase, typer.Option(help="For --adapter: merge into dequantized NF4 or original weights.", rich_help_panel="Model and prompt")] = MergeBase.dequantized,
    task: Annotated[Task, typer.Option(help="gsm8k accuracy, or retention: drift from the base model on general prompts.", rich_help_panel="What to measure")] = Task.gsm8k,
    backend: Annotated[Backend, typer.Option(help="tinymath: its own fast generation. lm-eval: lm-evaluation-harness's gsm8k task itself (pip install lm-eval).", rich_help_panel="What to measure")] = Backend.tinymath,
    calculator: Annotated[Optional[bool], typer.Option("--calculator/--no-calculator", help="Complete <<expr= annotations with a safe calculator (train with --calc-annotations keep). Default: as the model was trained (on for a GRPO --calculator run).", show_default=False, rich_help_panel="Decoding", metavar=FLAG)] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="Fast decoding: a static KV cache, each step replayed from a CUDA graph (torch.compile instead where stop strings need transformers' generate; --no-compile: plain generate, --calculator in rounds). [default: on a GPU for 64 problems or more]", rich_help_panel="Decoding", show_default=False, metavar=FLAG)] = None,
    compile_steps: Annotated[bool, typer.Option("--compile-steps", help="Compile each decode step with torch.compile before replaying it from a CUDA graph: about 25 s per batch shape in a new process (8 s once cached, plus loading), then steps whose time follows their rows. One full-test evaluation on one GPU is slower with it; it pays in long decoding (train --method grpo --compile-steps).", rich_help_panel="Decoding", metavar=FLAG)] = False,
    samples: Annotated[int, typer.Option(help="Samples per problem; > 1 scores the majority answer (maj@K), also pass@K.", rich_help_panel="Decoding")] = 1,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (needed with --samples > 1).", rich_help_panel="Decoding")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.", rich_help_panel="Decoding")] = 0,
    protocol: Annotated[Protocol, typer.Option(help="default: the training format, zero-shot. lm-eval-gsm8k: lm-eval's gsm8k task (5-shot, Question:/Answer:, its stop strings and filters).", rich_help_panel="Decoding")] = Protocol.default,
    compare: Annotated[Optional[tuple[Path, Path]], typer.Option(help="Compare two eval --out folders (same problems): accuracies, difference with 95% CI, McNemar p, flips.", rich_help_panel="Comparison", metavar="A B")] = None,
    base: Annotated[Optional[str], typer.Option(help="Retention: the base model to compare with (default: the run's base).", rich_help_panel="Retention")] = None,
    lm_eval: Annotated[Optional[str], typer.Option("--lm-eval", help="Retention: also run these lm-evaluation-harness tasks (e.g. hellaswag,arc_easy) on base and tuned; needs lm-eval.", rich_help_panel="Retention")] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """GSM8K accuracy with batched generation and the shared answer extraction; or, with
    `--task retention`, how far a tuned model drifted from its base on general prompts.

    Examples:

    ```
    tinymath eval --adapter run --split test
    tinymath eval --model SmolLM2-135M-Instruct.Q4_1.gguf --data ./gsm8k --limit 200 --out ev --json
    tinymath eval --task retention --adapter run --out retention
    tinymath eval --adapter run --samples 8 --temperature 0.7 --out ev-maj8
    tinymath eval --compare ev-base ev-run
    accelerate launch --num_processes 2 -m tinymath eval --adapter run --out ev
    ```
    """
    _refuse_unused_eval_options(ctx, compare is not None, task.value, backend.value, model, adapter)
    if compare:
        return _compare(*compare, json_out)
    return EVAL_TASKS[task.value](locals())


# what each kind of evaluation reads of eval's options; any other option given is refused, not ignored
_EVAL_ALWAYS = {"json_out", "trust_remote_code"}
_EVAL_USES = {
    "compare": ({"compare", "json_out"}, "--compare (it reads two finished evaluations and writes nothing)"),
    "retention": ({"task", "model", "adapter", "base", "out", "overwrite", "limit", "lm_eval", "max_new_tokens",
                   *_EVAL_ALWAYS}, "--task retention (drift from the base on its own general prompts)"),
    "lm-eval": ({"backend", "task", "model", "adapter", "data", "limit", "out", "overwrite", "batch_size",
                 "max_new_tokens", "merge_base", *_EVAL_ALWAYS},
                "--backend lm-eval (the harness's own gsm8k task: its prompt, decoding and scoring)"),
    "tinymath": ({"backend", "task", "model", "adapter", "data", "split", "limit", "out", "overwrite", "batch_size",
                  "max_new_tokens", "quant", "format", "system_prompt", "merge_base", "calculator", "compile",
                  "compile_steps", "samples", "temperature", "seed", "protocol", *_EVAL_ALWAYS},
                 "a GSM8K evaluation (--base and --lm-eval are --task retention settings)"),
}


def _refuse_unused_eval_options(ctx, comparing: bool, task: str, backend: str, model, adapter) -> None:
    """An option the chosen evaluation would not read is refused by name (as train refuses RL-only
    options), rather than silently dropped."""
    kind = "compare" if comparing else "retention" if task == "retention" else backend
    used, why = _EVAL_USES[kind]
    given = {p.name: (p.secondary_opts or p.opts)[0] if ctx.params.get(p.name) is False else p.opts[0]
             for p in ctx.command.params  # named as typed: --no-calculator, not --calculator
             if p.name and getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"}
    unused = [flag for name, flag in given.items() if name not in used]
    if unused:
        raise TinymathError(f"{why} does not use {', '.join(unused)}: drop {'it' if len(unused) == 1 else 'them'}")
    if "merge_base" in given and model is not None:
        raise TinymathError("--merge-base chooses the weights an --adapter run is merged into; with --model there is "
                            "nothing to merge: drop it")
    prompt = [given[name] for name in ("format", "system_prompt") if name in given]
    if prompt and ctx.params.get("protocol") is not None and ctx.params["protocol"].value == "lm-eval-gsm8k":
        raise TinymathError(f"--protocol lm-eval-gsm8k asks in lm-eval's own 5-shot prompt; it does not use "
                            f"{', '.join(prompt)}: drop {'it' if len(prompt) == 1 else 'them'}")
    if "quant" in given and adapter is not None:
        raise TinymathError("--quant chooses how a --model is loaded; an --adapter run is merged into its base "
                            "(--merge-base): drop --quant")


def _compare(first, second, json_out):
    from tinymath.services.evaluate import compare

    result = compare(first, second)
    if json_out:
        return _print_json(result)
    from rich.table import Table

    table = Table(title=f"paired comparison on {result['n']} problems")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(f"A accuracy ({escape(str(first))})", f"{result['accuracy_a']:.2%}")
    table.add_row(f"B accuracy ({escape(str(second))})", f"{result['accuracy_b']:.2%}")
    low, high = result["difference_ci95"]
    table.add_row("B - A", f"{result['difference']:+.2%} (95% CI {low:+.2%} to {high:+.2%})")
    table.add_row("McNemar p-value", f"{result['mcnemar_p']:.3g}")
    table.add_row("right only in A / only in B", f"{len(result['only_a_correct'])} / {len(result['only_b_correct'])}")
    out_console.print(table)
    if result["settings_differ"]:
        differ = ", ".join(f"{key} ({'none' if a is None else a} vs {'none' if b is None else b})"
                           for key, (a, b) in result["settings_differ"].items())
        out_console.print(f"note: the two evaluations also differ in {escape(differ)}, so the difference "
                          "measures those settings too", style="yellow", highlight=False)


app.command("evaluate", hidden=True, help="Alias of eval.")(eval_cmd)


@app.command("chat")
@command
def chat_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, folder, .gguf, or a merge-adapters output.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="A `tinymath train` run folder.")] = None,
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="Answer this one question and exit.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy (default); > 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    quant: Annotated[Quant, typer.Option(help="Weights for --model: unquantized or NF4.")] = Quant.none,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt (default: the run's).")] = None,
    calculator: Annotated[Optional[bool], typer.Option("--calculator/--no-calculator", help="Complete <<expr= annotations with a safe calculator (replies then arrive whole). Default: as the model was trained.", show_default=False, metavar=FLAG)] = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """Solve problems step by step: interactive in a terminal, one answer per line from a pipe.

    Examples:

    ```
    tinymath chat --adapter run
    echo "Tom has 3 apples and buys 4 more. How many apples does he have?" | tinymath chat --model merged
    tinymath chat --model merged --question "What is 12 * 7?" --json
    ```
    """
    from tinymath.lib.generate import GenerationSettings, load_for_inference
    from tinymath.services.chat import ChatSession, answer, run_interactive, run_scripted

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  calculator=bool(calculator))
    settings.validate()
    if question is None and sys.stdin is None:  # started with its standard input closed (`<&-`)
        raise TinymathError("no question: standard input is closed; pass -q QUESTION, or pipe questions in")
    if question is not None and not question.strip():
        raise TinymathError("--question is empty; ask something")
    # --json is for scripts: in a terminal it answers each line as a JSON object, as from a pipe
    interactive = question is None and sys.stdin.isatty() and not json_out
    status = err_console.status("loading model...", spinner="dots") if interactive else _nothing()
    with status, _kept_for_good():
        inference = load_for_inference(model, str(adapter) if adapter else None, quant=quant.value,
                                       system_prompt=system_prompt, trust_remote_code=trust_remote_code)
        settings.calculator = inference.uses_calculator(calculator)
        session = ChatSession(inference, settings, keep_history=interactive)
        if interactive:  # the first streamed reply should not pay for warm-up; a script pays it once anyway
            session.warm_up()
    if question is not None:
        result = answer(session, question)
        return _print_json(result) if json_out else print(result["completion"])
    if interactive:
        raise typer.Exit(run_interactive(session, out_console))
    raise typer.Exit(run_scripted(session, getattr(sys.stdin, "buffer", sys.stdin), json_out))
