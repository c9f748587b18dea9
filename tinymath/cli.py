"""The `tinymath` command: options -> one service call -> rich output. No ML logic here.

Heavy libraries are imported inside the commands, so `tinymath --help` is instant. A
`TinymathError` (a user mistake) is printed as one clean message with a non-zero exit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tinymath.errors import TinymathError

app = typer.Typer(
    name="tinymath",
    help="Fine-tune small chat LLMs to solve grade-school math step by step (QLoRA on GSM8K).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
out_console = Console()
err_console = Console(stderr=True)

DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"  # as tinymath.data; kept here so --help needs no import
DEFAULT_DATA = "openai/gsm8k"


class Format(str, Enum):
    chat = "chat"
    instruction = "instruction"


class Quant(str, Enum):
    nf4 = "nf4"
    none = "none"


class Calc(str, Enum):
    strip = "strip"
    keep = "keep"


class DType(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Task(str, Enum):
    gsm8k = "gsm8k"
    retention = "retention"


class Protocol(str, Enum):
    default = "default"
    lm_eval_gsm8k = "lm-eval-gsm8k"


class MergeBase(str, Enum):
    dequantized = "dequantized"
    original = "original"


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, kernel hints) is not for our users."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("bitsandbytes", "transformers", "peft", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def command(fn):
    """Run a command; user mistakes become one message on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except TinymathError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)

    return wrapper


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local Hugging Face folder, or .gguf file.")]
DataOpt = Annotated[str, typer.Option(help="Hub id, a folder with train.jsonl/test.jsonl, or one .jsonl/.json/.parquet file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, nothing else.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing output folder.")]
TrustOpt = Annotated[bool, typer.Option(help="Allow the model's own Python code from the hub (off unless you ask).")]


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
    tinymath prepare-data --data ../gsm8k --model SmolLM2-135M-Instruct.Q4_1.gguf --out prep --val-size 200
    ```
    """
    from tinymath.data import prepare_data

    manifest = prepare_data(data=data, model=model, out=out, fmt=format.value, system_prompt=system_prompt,
                            max_length=max_length, calc_annotations=calc_annotations.value, val_size=val_size,
                            limit=limit, overwrite=overwrite, trust_remote_code=trust_remote_code,
                            show_progress=not json_out)
    if json_out:
        return _print_json(manifest)
    from rich.table import Table

    table = Table(title=f"prepared {out}")
    for col in ("split", "examples", "truncated", "tokens", "mean len", "p95 len", "max len"):
        table.add_column(col)
    for split, s in manifest["splits"].items():
        table.add_row(split, str(s["examples"]), str(s["truncated"]), f"{s['tokens']:,}", str(s["length"]["mean"]),
                      str(s["length"]["p95"]), str(s["length"]["max"]))
    out_console.print(table)


class Keep(str, Enum):
    last = "last"
    best = "best"


class ReportTo(str, Enum):
    tensorboard = "tensorboard"
    wandb = "wandb"


def _opt(help: str, panel: str | None = None, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


@app.command("train")
@command
def train_cmd(
    data: Annotated[Optional[str], _opt("A prepare-data folder, or raw data (prepared on the fly). [default: openai/gsm8k]")] = None,
    model: Annotated[Optional[str], _opt("Hub id, local folder, or .gguf. [default: TinyLlama/TinyLlama-1.1B-Chat-v1.0]", None, "--model", "-m")] = None,
    out: Annotated[Optional[str], _opt("Run folder (adapter, run.json, metrics.jsonl, checkpoints). [default: run]")] = None,
    config: Annotated[Optional[Path], _opt("TOML file (or a run's run.json) with any train options; flags override it.", "Run control")] = None,
    resume: Annotated[Optional[Path], _opt("Continue this run folder from its latest checkpoint.", "Run control")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and data/token counts, then exit.", rich_help_panel="Run control")] = False,
    epochs: Annotated[Optional[float], _opt("Passes over the training data. [default: 3]", "Schedule")] = None,
    max_steps: Annotated[Optional[int], _opt("Stop after N optimizer steps (overrides --epochs).", "Schedule")] = None,
    batch_size: Annotated[Optional[int], _opt("Examples per optimizer step and GPU = --batch-size x --grad-accum. With --packing the step is cut into micro-batches by tokens. [default: 32]", "Schedule")] = None,
    grad_accum: Annotated[Optional[int], _opt("Gradient accumulation (multiplies the examples per step). [default: 1]", "Schedule")] = None,
    lr: Annotated[Optional[float], _opt("Peak learning rate, cosine decay. [default: 1e-3]", "Schedule")] = None,
    warmup: Annotated[Optional[float], _opt("Warm-up: a fraction of the steps (< 1) or a step count. [default: 0.03]", "Schedule")] = None,
    seed: Annotated[Optional[int], _opt("Random seed (LoRA init, data order). [default: 42]", "Schedule")] = None,
    lora_r: Annotated[Optional[int], _opt("LoRA rank. [default: 32]", "LoRA")] = None,
    lora_alpha: Annotated[Optional[float], _opt("LoRA alpha (scale = alpha / r). [default: 64]", "LoRA")] = None,
    lora_dropout: Annotated[Optional[float], _opt("LoRA dropout. [default: 0]", "LoRA")] = None,
    target_modules: Annotated[Optional[str], _opt("'all-linear' or comma-separated names (q_proj,v_proj). [default: all-linear]", "LoRA")] = None,
    quant: Annotated[Optional[Quant], _opt("Base weights: nf4 (QLoRA) or none. [default: nf4]")] = None,
    format: Annotated[Optional[Format], _opt("Prompt format (raw data only). [default: chat]", "Data")] = None,
    system_prompt: Annotated[Optional[str], _opt("System prompt (raw data only).", "Data")] = None,
    max_length: Annotated[Optional[int], _opt("Max tokens per example (raw data only). [default: 512]", "Data")] = None,
    calc_annotations: Annotated[Optional[Calc], _opt("strip or keep <<a*b=c>> (raw data only). [default: keep]", "Data")] = None,
    val_size: Annotated[Optional[float], _opt("Validation examples held out of train (raw data only).", "Data")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Padding-free packing (same loss, faster). [default: on]", rich_help_panel="Speed", show_default=False)] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations to save memory (switched on by itself when --max-memory needs it).", rich_help_panel="Speed", show_default=False)] = None,
    max_memory: Annotated[Optional[str], _opt("GPU memory to stay within, e.g. 6GB (default: the free memory).", "Speed")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile each decoder layer (fewer, fused kernels; about a minute of compiling first). [default: on with a GPU and --packing]", rich_help_panel="Speed", show_default=False)] = None,
    cuda_graphs: Annotated[Optional[bool], typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay each micro-batch's forward and backward as a CUDA graph (small models wait on kernel launches otherwise). [default: on with one GPU, --packing and no checkpointing]", rich_help_panel="Speed", show_default=False)] = None,
    micro_batch_tokens: Annotated[Optional[int], _opt("Tokens per packed micro-batch (default: sized to memory on GPU, 4096 on CPU).", "Speed")] = None,
    save_every: Annotated[Optional[int], _opt("Save a resumable checkpoint every N steps.", "Run control")] = None,
    keep_checkpoints: Annotated[Optional[int], _opt("How many checkpoints to keep. [default: 2]", "Run control")] = None,
    eval_every: Annotated[Optional[int], _opt("GSM8K accuracy on the validation split every N steps (needs --val-size).", "Run control")] = None,
    eval_limit: Annotated[Optional[int], _opt("Validation problems per evaluation. [default: 200]", "Run control")] = None,
    keep: Annotated[Optional[Keep], _opt("Final adapter: the last one, or the best by validation accuracy. [default: last]", "Run control")] = None,
    report_to: Annotated[Optional[ReportTo], _opt("Also log to tensorboard or wandb (if installed).", "Run control")] = None,
    log_every: Annotated[Optional[int], _opt("Write metrics every N steps. [default: 1]", "Run control")] = None,
    retention_every: Annotated[Optional[int], _opt("Every N steps, record drift from the base on general prompts (KL, top-1 agreement).", "Run control")] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code", help="Allow the model's own Python code from the hub.", show_default=False)] = None,
    json_out: JsonOpt = False,
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
    accelerate launch --num_processes 2 -m tinymath train --data prep --out run
    ```
    """
    from tinymath.config import resolve_train_config

    enum_value = lambda e: e.value if e is not None else None  # noqa: E731
    flags = dict(
        data=data, model=model, out=out, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        grad_accum=grad_accum, lr=lr, warmup=warmup, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target_modules=target_modules, quant=enum_value(quant), format=enum_value(format),
        system_prompt=system_prompt, max_length=max_length, calc_annotations=enum_value(calc_annotations),
        val_size=val_size, packing=packing, gradient_checkpointing=gradient_checkpointing, compile=compile, cuda_graphs=cuda_graphs,
        max_memory=max_memory,
        micro_batch_tokens=micro_batch_tokens, save_every=save_every, keep_checkpoints=keep_checkpoints,
        eval_every=eval_every, eval_limit=eval_limit, keep=enum_value(keep), report_to=enum_value(report_to),
        log_every=log_every, retention_every=retention_every, trust_remote_code=trust_remote_code,
    )
    resolved = resolve_train_config(flags, str(config) if config else None, str(resume) if resume else None)
    resolved.overwrite = overwrite
    if dry_run:
        from tinymath.train import dry_run_report

        report = dry_run_report(resolved)
        if json_out:
            return _print_json(report)
        out_console.print_json(data=report)
        return
    from tinymath.train import train

    summary = train(resolved, show_progress=not json_out, resume=resume is not None)
    if json_out:
        return _print_json(summary)
    out_console.print(f"[bold green]done[/bold green]: {summary['steps']} steps, final loss "
                      f"{summary['final_loss']:.4f}, {summary['real_tokens_per_s']:,.0f} tokens/s -> {resolved.out}")


@app.command("merge-adapters")
@command
def merge_cmd(
    run: Annotated[Path, typer.Argument(help="A `tinymath train` run folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the merged model.")] = Path("merged"),
    dtype: Annotated[DType, typer.Option(help="Weight dtype of the merged model.")] = DType.bf16,
    merge_base: Annotated[MergeBase, typer.Option(help="Merge into the NF4-dequantized base (what the adapter was trained against) or the original weights.")] = MergeBase.dequantized,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
):
    """Merge a run's LoRA adapter into a standalone model (safetensors).

    Examples:

    ```
    tinymath merge-adapters run --out merged
    tinymath merge-adapters run --out merged-fp32 --dtype fp32 --merge-base original
    ```
    """
    from tinymath.merge import merge_adapters

    with err_console.status("merging...", spinner="dots") if not json_out else _nothing():
        report = merge_adapters(run, out, dtype=dtype.value, merge_base=merge_base.value, overwrite=overwrite)
    if json_out:
        return _print_json(report)
    out_console.print(f"[bold green]merged[/bold green] -> {out}  (largest logit difference vs base+adapter: "
                      f"{report['max_logit_diff']:.2e}, tolerance {report['tolerance']:.2e})")


def _nothing():
    from contextlib import nullcontext

    return nullcontext()


@app.command("eval")
@command
def eval_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, folder, .gguf, or a merge-adapters output.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="A `tinymath train` run folder (its base, format and prompt are reused).")] = None,
    data: DataOpt = DEFAULT_DATA,
    split: Annotated[str, typer.Option(help="Which split to score.")] = "test",
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N problems.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Problems generated together (default: as many as GPU memory allows; 16 on CPU).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer generated.")] = 256,
    out: Annotated[Optional[Path], typer.Option(help="Folder for predictions.jsonl and summary.json.")] = None,
    quant: Annotated[Quant, typer.Option(help="Weights for --model: unquantized (fast) or NF4.")] = Quant.none,
    format: Annotated[Optional[Format], typer.Option(help="Prompt format (default: the run's, else chat).")] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt (default: the run's).")] = None,
    merge_base: Annotated[MergeBase, typer.Option(help="For --adapter: merge into dequantized NF4 or original weights.")] = MergeBase.dequantized,
    task: Annotated[Task, typer.Option(help="gsm8k accuracy, or retention: drift from the base model on general prompts.")] = Task.gsm8k,
    calculator: Annotated[bool, typer.Option(help="Complete <<expr= annotations with a safe calculator (train with --calc-annotations keep).", rich_help_panel="Decoding")] = False,
    samples: Annotated[int, typer.Option(help="Samples per problem; > 1 scores the majority answer (maj@K), also pass@K.", rich_help_panel="Decoding")] = 1,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (needed with --samples > 1).", rich_help_panel="Decoding")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.", rich_help_panel="Decoding")] = 0,
    protocol: Annotated[Protocol, typer.Option(help="default: the training format, zero-shot. lm-eval-gsm8k: lm-eval's gsm8k task (5-shot, Question:/Answer:, its stop strings and filters).", rich_help_panel="Decoding")] = Protocol.default,
    compare: Annotated[Optional[tuple[Path, Path]], typer.Option(help="Compare two eval --out folders (same problems): accuracies, difference with 95% CI, McNemar p, flips.", rich_help_panel="Comparison")] = None,
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
    tinymath eval --model SmolLM2-135M-Instruct.Q4_1.gguf --data ../gsm8k --limit 200 --out ev --json
    tinymath eval --task retention --adapter run --out retention
    tinymath eval --adapter run --samples 8 --temperature 0.7 --out ev-maj8
    tinymath eval --compare ev-base ev-run
    accelerate launch --num_processes 2 -m tinymath eval --adapter run --out ev
    ```
    """
    if compare:
        return _compare(*compare, json_out)
    if task == Task.retention:
        return _retention(model, adapter, base, out, limit, lm_eval, overwrite, trust_remote_code, json_out)
    from tinymath.evaluate import evaluate

    summary = evaluate(model=model, adapter=str(adapter) if adapter else None, data=data, split=split, limit=limit,
                       out=out, batch_size=batch_size, max_new_tokens=max_new_tokens, quant=quant.value,
                       fmt=format.value if format else None, system_prompt=system_prompt,
                       merge_base=merge_base.value, overwrite=overwrite, trust_remote_code=trust_remote_code,
                       show_progress=not json_out, calculator=calculator, samples=samples, temperature=temperature,
                       seed=seed, protocol=protocol.value)
    from tinymath.model import end_processes, process_state

    state = process_state()
    end_processes(state)
    if not state.is_main_process:  # under accelerate launch: one report, rank 0's
        return
    if json_out:
        return _print_json(summary)
    from rich.table import Table

    table = Table(title="GSM8K " + split)
    table.add_column("metric")
    table.add_column("value", justify="right")
    low, high = summary["ci95"]
    table.add_row("accuracy", f"{summary['accuracy']:.2%}  (95% CI {low:.1%}-{high:.1%})")
    if "maj_at_k" in summary:
        table.add_row(f"pass@{samples}", f"{summary['pass_at_k']:.2%}")
        table.add_row("single-sample accuracy", f"{summary['single_sample_accuracy']:.2%}")
    else:
        table.add_row("accuracy (strict: #### marker)", f"{summary['accuracy_strict']:.2%}")
        table.add_row("no answer found", f"{summary['invalid_rate']:.1%}")
    table.add_row("problems", str(summary["n"]))
    table.add_row("tokens generated", f"{summary['tokens_generated']:,} ({summary['tokens_per_s']:,.0f}/s)")
    out_console.print(table)
    if out:
        out_console.print(f"predictions -> {out / 'predictions.jsonl'}")


def _compare(first, second, json_out):
    from tinymath.evaluate import compare

    result = compare(first, second)
    if json_out:
        return _print_json(result)
    from rich.table import Table

    table = Table(title=f"paired comparison on {result['n']} problems")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row(f"A accuracy ({first})", f"{result['accuracy_a']:.2%}")
    table.add_row(f"B accuracy ({second})", f"{result['accuracy_b']:.2%}")
    low, high = result["difference_ci95"]
    table.add_row("B - A", f"{result['difference']:+.2%} (95% CI {low:+.2%} to {high:+.2%})")
    table.add_row("McNemar p-value", f"{result['mcnemar_p']:.3g}")
    table.add_row("right only in A / only in B", f"{len(result['only_a_correct'])} / {len(result['only_b_correct'])}")
    out_console.print(table)


def _retention(model, adapter, base, out, limit, lm_eval, overwrite, trust_remote_code, json_out):
    from tinymath.retention import evaluate_retention

    status = err_console.status("measuring drift from the base model...") if not json_out else _nothing()
    with status:
        summary = evaluate_retention(model=model, adapter=str(adapter) if adapter else None, base=base, out=out,
                                     limit=limit, lm_eval_tasks=lm_eval, overwrite=overwrite,
                                     trust_remote_code=trust_remote_code)
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
        out_console.print(f"side by side -> {Path(out) / 'retention.md'}")


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
    calculator: Annotated[bool, typer.Option(help="Complete <<expr= annotations with a safe calculator (replies then arrive whole).")] = False,
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
    from tinymath.chat import ChatSession, answer, run_interactive, run_scripted
    from tinymath.generate import GenerationSettings, load_for_inference

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  calculator=calculator)
    settings.validate()
    interactive = question is None and sys.stdin.isatty()
    status = err_console.status("loading model...", spinner="dots") if interactive else _nothing()
    with status:
        inference = load_for_inference(model, str(adapter) if adapter else None, quant=quant.value,
                                       system_prompt=system_prompt, trust_remote_code=trust_remote_code)
        session = ChatSession(inference, settings, keep_history=interactive)
        session.warm_up()
    if question is not None:
        result = answer(session, question)
        return _print_json(result) if json_out else print(result["completion"])
    if interactive:
        raise typer.Exit(run_interactive(session, out_console))
    raise typer.Exit(run_scripted(session, sys.stdin, json_out))
