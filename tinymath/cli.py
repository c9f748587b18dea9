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

DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
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
    calc_annotations: Annotated[Calc, typer.Option(help="GSM8K calculator annotations <<48/2=24>>: strip or keep.")] = Calc.strip,
    val_size: Annotated[float, typer.Option(help="Validation examples taken from train: a count, or a fraction < 1.")] = 0,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N rows of each split.")] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """Format, tokenize and loss-mask GSM8K for training.

    Examples:

        tinymath prepare-data --out prep
        tinymath prepare-data --data ../gsm8k --model SmolLM2-135M-Instruct.Q4_1.gguf --out prep --val-size 200
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


@app.command("train")
@command
def train_cmd(
    data: Annotated[str, typer.Option(help="A prepare-data folder, or raw data (prepared on the fly).")] = DEFAULT_DATA,
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Run folder (adapter, run.json, metrics.jsonl).")] = Path("run"),
    epochs: Annotated[float, typer.Option(help="Passes over the training data.", rich_help_panel="Schedule")] = 3.0,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps (overrides --epochs).", rich_help_panel="Schedule")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per optimizer step and GPU is --batch-size x --grad-accum (with --packing the step is cut into micro-batches by tokens, not by this).", rich_help_panel="Schedule")] = 64,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation (multiplies the examples per step).", rich_help_panel="Schedule")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay).", rich_help_panel="Schedule")] = 3e-4,
    warmup: Annotated[float, typer.Option(help="Warm-up: a fraction of the steps (< 1) or a step count.", rich_help_panel="Schedule")] = 0.03,
    seed: Annotated[int, typer.Option(help="Random seed (LoRA init, data order).", rich_help_panel="Schedule")] = 42,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel="LoRA")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / r).", rich_help_panel="LoRA")] = 32.0,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout (0 keeps the fast path lean).", rich_help_panel="LoRA")] = 0.0,
    target_modules: Annotated[str, typer.Option(help="'all-linear' or comma-separated names (q_proj,v_proj).", rich_help_panel="LoRA")] = "all-linear",
    quant: Annotated[Quant, typer.Option(help="Base model weights: NF4 4-bit (QLoRA) or unquantized.")] = Quant.nf4,
    format: Annotated[Optional[Format], typer.Option(help="Prompt format (raw data only; default chat).", rich_help_panel="Data")] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt (raw data only).", rich_help_panel="Data")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Max tokens per example (raw data only; default 512).", rich_help_panel="Data")] = None,
    calc_annotations: Annotated[Optional[Calc], typer.Option(help="strip or keep <<a*b=c>> (raw data only; default strip).", rich_help_panel="Data")] = None,
    val_size: Annotated[float, typer.Option(help="Validation examples from train (raw data only).", rich_help_panel="Data")] = 0,
    packing: Annotated[bool, typer.Option(help="Padding-free packing of examples (same loss, faster).", rich_help_panel="Speed")] = True,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations to save memory (switched on by itself when --max-memory needs it).", rich_help_panel="Speed")] = False,
    max_memory: Annotated[Optional[str], typer.Option(help="GPU memory to stay within, e.g. 6GB: sizes micro-batches and checkpointing (default: the free memory).", rich_help_panel="Speed")] = None,
    micro_batch_tokens: Annotated[Optional[int], typer.Option(help="Tokens per packed micro-batch (default: sized to memory on GPU, the whole step on CPU).", rich_help_panel="Speed")] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """QLoRA fine-tuning: a 4-bit NF4 base with trainable LoRA adapters.

    The run folder is all later commands need: `tinymath eval --adapter run`,
    `tinymath merge-adapters run --out merged`, `tinymath chat --adapter run`.

    Examples:

        tinymath train --out run
        tinymath train --data prep --model SmolLM2-135M-Instruct.Q4_1.gguf --out run --max-steps 3 --batch-size 2
        accelerate launch --num_processes 2 -m tinymath train --data prep --out run
    """
    from tinymath.train import TrainConfig, train

    config = TrainConfig(
        data=data, model=model, out=str(out), format=format.value if format else None,
        system_prompt=system_prompt, max_length=max_length,
        calc_annotations=calc_annotations.value if calc_annotations else None, val_size=val_size,
        quant=quant.value, trust_remote_code=trust_remote_code, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules, seed=seed,
        packing=packing, gradient_checkpointing=gradient_checkpointing, max_memory=max_memory,
        micro_batch_tokens=micro_batch_tokens, overwrite=overwrite,
    )
    summary = train(config, show_progress=not json_out)
    if json_out:
        return _print_json(summary)
    out_console.print(f"[bold green]done[/bold green]: {summary['steps']} steps, final loss "
                      f"{summary['final_loss']:.4f}, {summary['real_tokens_per_s']:,.0f} tokens/s -> {out}")


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

        tinymath merge-adapters run --out merged
        tinymath merge-adapters run --out merged-fp32 --dtype fp32 --merge-base original
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
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """GSM8K accuracy with batched generation and the shared answer extraction.

    Examples:

        tinymath eval --adapter run --split test
        tinymath eval --model SmolLM2-135M-Instruct.Q4_1.gguf --data ../gsm8k --limit 200 --out ev --json
    """
    from tinymath.evaluate import evaluate

    summary = evaluate(model=model, adapter=str(adapter) if adapter else None, data=data, split=split, limit=limit,
                       out=out, batch_size=batch_size, max_new_tokens=max_new_tokens, quant=quant.value,
                       fmt=format.value if format else None, system_prompt=system_prompt,
                       merge_base=merge_base.value, overwrite=overwrite, trust_remote_code=trust_remote_code,
                       show_progress=not json_out)
    if json_out:
        return _print_json(summary)
    from rich.table import Table

    table = Table(title="GSM8K " + split)
    table.add_column("metric")
    table.add_column("value", justify="right")
    low, high = summary["ci95"]
    table.add_row("accuracy", f"{summary['accuracy']:.2%}  (95% CI {low:.1%}-{high:.1%})")
    table.add_row("accuracy (strict: #### marker)", f"{summary['accuracy_strict']:.2%}")
    table.add_row("problems", str(summary["n"]))
    table.add_row("no answer found", f"{summary['invalid_rate']:.1%}")
    table.add_row("tokens generated", f"{summary['tokens_generated']:,} ({summary['tokens_per_s']:,.0f}/s)")
    out_console.print(table)
    if out:
        out_console.print(f"predictions -> {out / 'predictions.jsonl'}")


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
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
):
    """Solve problems step by step: interactive in a terminal, one answer per line from a pipe.

    Examples:

        tinymath chat --adapter run
        echo "Tom has 3 apples and buys 4 more. How many apples does he have?" | tinymath chat --model merged
        tinymath chat --model merged --question "What is 12 * 7?" --json
    """
    from tinymath.chat import ChatSession, answer, run_interactive, run_scripted
    from tinymath.generate import GenerationSettings, load_for_inference

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
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
