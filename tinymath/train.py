"""train: QLoRA fine-tuning (NF4 base via bitsandbytes + PEFT LoRA) in an Accelerate loop.

One recipe, top to bottom: check the config, load data and model, train, save, clean up. The same
code runs on CPU, one GPU, or several GPUs under ``accelerate launch`` (data parallel; each process
holds its own NF4 copy, rank 0 logs and saves).

The loss is the mean cross-entropy over every answer token of an optimizer step (all micro-batches
and processes together), so how a step is cut into micro-batches, or whether examples are packed
into one padding-free row, does not change the math.

Run folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT), the tokenizer,
``metrics.jsonl`` (one line per step) and ``run.json`` (every resolved setting), written last:
a folder without run.json is an unfinished run.
"""

from __future__ import annotations

import math
import platform
import subprocess
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tinymath.data import DEFAULT_DATA, DEFAULT_MODEL
from tinymath.errors import TinymathError, raise_if_problems

RUN_FILE = "run.json"


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
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: float = 0.03
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"
    seed: int = 42
    packing: bool = True
    micro_batch_tokens: int | None = None
    max_memory: str | None = None
    gradient_checkpointing: bool = False
    log_every: int = 1
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
        if self.quant not in ("nf4", "none"):
            problems.append(f"--quant {self.quant}: use nf4 or none")
        raise_if_problems(problems)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


# ---------------------------------------------------------------- batches


def pack_examples(examples: list[dict]):
    """One padding-free row: examples concatenated, ``position_ids`` restarting at each example and
    the example boundaries (``cu_seq_lens``) for `tinymath.attention`, so attention never crosses
    from one example into another."""
    import torch

    input_ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    positions = [p for ex in examples for p in range(len(ex["input_ids"]))]
    lengths = [len(ex["input_ids"]) for ex in examples]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
            "max_seq_len": max(lengths)}


def pad_examples(examples: list[dict], pad_id: int):
    """The plain reference batch: right-padded rows with an attention mask."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, :n] = torch.tensor(ex["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def count_label_tokens(examples: list[dict]) -> int:
    """Answer tokens that carry loss (labels shift by one: the first token is never a target)."""
    return sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)


def micro_batches(examples: list[dict], config: TrainConfig, pad_id: int, max_tokens: int | None = None):
    """Cut a step's examples into micro-batches: packed rows of at most ``max_tokens`` tokens, or
    (reference path) padded batches of ``batch_size`` examples."""
    if not config.packing:
        for start in range(0, len(examples), config.batch_size):
            yield pad_examples(examples[start:start + config.batch_size], pad_id)
        return
    chunk, size = [], 0
    for ex in examples:
        n = len(ex["input_ids"])
        if chunk and max_tokens and size + n > max_tokens:
            yield pack_examples(chunk)
            chunk, size = [], 0
        chunk.append(ex)
        size += n
    if chunk:
        yield pack_examples(chunk)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


def build_loss_model(model, fast: bool = True, chunk_tokens: int = 4096):
    """Wrap the PEFT model in a module whose forward returns the summed answer-token loss.

    ``fast``: the LM head runs only on labelled positions, in chunks whose fp32 logits are
    recomputed in the backward pass (checkpointed) instead of kept: the full ``tokens x
    vocabulary`` logits are never materialized. Otherwise the plain reference: the model's full
    logits and one cross-entropy. One module, so DDP (under accelerate) sees a single forward.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(head, hidden, targets):
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")

    class CausalLMLoss(torch.nn.Module):
        def __init__(self, peft_model):
            super().__init__()
            self.peft_model = peft_model

        def forward(self, input_ids, labels, **kwargs):
            if not fast:
                logits = self.peft_model(input_ids=input_ids, use_cache=False, **kwargs).logits[:, :-1]
                return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")
            causal_lm = self.peft_model.get_base_model()
            hidden = causal_lm.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != -100
            hidden, targets = hidden[:, :-1][keep], targets[keep]
            head = causal_lm.get_output_embeddings()
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, targets.shape[0], chunk_tokens):
                h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
                total = total + (checkpoint(chunk_loss, head, h, t, use_reentrant=False) if torch.is_grad_enabled()
                                 else chunk_loss(head, h, t))
            return total

    return CausalLMLoss(model)


# ---------------------------------------------------------------- data


def load_training_data(config: TrainConfig, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Tokenized train (and validation) examples: a prepare-data folder, or raw data prepared now."""
    from tinymath.data import is_prepared, load_prepared, read_gsm8k, tokenize_split, validate_prepare_options

    if is_prepared(config.data):
        dataset, manifest = load_prepared(config.data)
        for key in ("format", "system_prompt", "max_length", "calc_annotations"):
            given = getattr(config, key)
            if given is not None and given != manifest[key]:
                raise TinymathError(f"--{key.replace('_', '-')} {given} contradicts the prepared data "
                                    f"({manifest[key]}); re-run prepare-data or drop the flag")
            setattr(config, key, manifest[key])
        if manifest["eos_token"] != tokenizer.eos_token:
            raise TinymathError(f"--data {config.data} was tokenized for {manifest['model']}, "
                                f"not for --model {config.model}; run prepare-data with this model")
        splits = {name: [{"input_ids": ids, "labels": lab} for ids, lab in
                         zip(dataset[name]["input_ids"], dataset[name]["labels"])]
                  for name in ("train", "validation") if name in dataset}
        return splits, manifest["splits"]

    config.format = config.format or "chat"
    config.max_length = config.max_length or 512
    config.calc_annotations = config.calc_annotations or "strip"
    validate_prepare_options(config.format, config.max_length, config.calc_annotations, config.val_size, None)
    import random

    rows = read_gsm8k(config.data, "train")
    raw = {"train": rows}
    if config.val_size:
        n_val = int(config.val_size) if config.val_size >= 1 else int(round(config.val_size * len(rows)))
        chosen = set(random.Random(0).sample(range(len(rows)), n_val))
        raw = {"train": [r for i, r in enumerate(rows) if i not in chosen],
               "validation": [r for i, r in enumerate(rows) if i in chosen]}
    splits, stats = {}, {}
    for name, split_rows in raw.items():
        columns, stats[name] = tokenize_split(split_rows, tokenizer, config.format, config.system_prompt,
                                              config.max_length, config.calc_annotations)
        splits[name] = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    return splits, stats


# ---------------------------------------------------------------- the recipe


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("tinymath", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _check_out(config: TrainConfig) -> None:
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TinymathError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / RUN_FILE).exists() or (out / "metrics.jsonl").exists()
        if not config.overwrite:
            raise TinymathError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
        if not ours:
            raise TinymathError(f"--out {out} holds files that tinymath did not write; choose another --out")


def validation_loss(loss_model, examples: list[dict], config: TrainConfig, pad_id: int, device,
                    max_tokens: int | None) -> float:
    """Mean answer-token loss on held-out examples (same batching as training, no gradients)."""
    import torch

    total = 0.0
    loss_model.eval()
    with torch.no_grad():
        for batch in micro_batches(examples, config, pad_id, max_tokens):
            total += loss_model(**to_device(batch, device)).item()
    loss_model.train()
    return total / max(count_label_tokens(examples), 1)


def parse_memory(text: str) -> int:
    """``"6GB"``, ``"6GiB"``, ``"6000MB"`` -> bytes (GB and GiB both mean 2**30: what cards are sold as)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?\s*", text.lower())
    if not match:
        raise TinymathError(f"--max-memory {text!r} is not a size; write it like 6GB or 5500MB")
    unit = (match.group(2) or "gb")[0]
    return int(float(match.group(1)) * (2**30 if unit == "g" else 2**20))


def plan_micro_batch(loss_model, examples: list[dict], config: TrainConfig, device, budget: int,
                     set_checkpointing) -> tuple[int, bool, dict]:
    """The largest packed micro-batch (in tokens) whose peak memory stays within ``budget`` bytes.

    Measures instead of guessing: one forward/backward on a probe batch gives the bytes each token
    costs; if not even the longest example fits, gradient checkpointing is switched on and measured
    again. Returns (tokens, checkpointing, the measurements).
    """
    import torch

    longest = max(len(ex["input_ids"]) for ex in examples)
    probe = []
    for ex in examples:
        if sum(len(e["input_ids"]) for e in probe) >= 2048:
            break
        probe.append(ex)
    probe_tokens = sum(len(e["input_ids"]) for e in probe)
    step_tokens = config.batch_size * config.grad_accum * probe_tokens / len(probe)
    trainable = sum(p.numel() for p in loss_model.parameters() if p.requires_grad) * 4 * 3
    figures, fits = {}, {}
    for checkpointing in (False, True):
        set_checkpointing(checkpointing)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = loss_model(**to_device(pack_examples(probe), device))
        loss.backward()
        loss_model.zero_grad(set_to_none=True)
        del loss
        torch.cuda.synchronize(device)
        per_token = (torch.cuda.max_memory_allocated(device) - base) / probe_tokens
        # optimizer state (2 fp32 moments) and fp32 gradients of the LoRA weights come on top
        room = (budget - base - trainable) * 0.9
        fits[checkpointing] = int(room / per_token) if room > 0 else 0
        figures[f"bytes_per_token{'_ckpt' if checkpointing else ''}"] = round(per_token)
        if not checkpointing and fits[False] >= step_tokens:
            break  # a whole step fits without recomputation: nothing to gain from checkpointing
    figures.update(base_bytes=base, budget_bytes=budget, tokens=fits)
    # checkpointing recomputes the forward (~1/3 more work): worth it only for much larger micro-batches
    use_ckpt = fits.get(True, 0) >= 2 * fits[False] or fits[False] < longest
    tokens = fits[use_ckpt]
    if tokens < longest:
        need = (base + trainable + per_token * longest / 0.9) / 2**30
        raise TinymathError(f"--max-memory {config.max_memory or 'free memory'}: too small to train even one "
                            f"example of {longest} tokens; at least {need:.1f}GB is needed (or lower --max-length)")
    return min(tokens, 65536), use_ckpt, figures


def train(config: TrainConfig, show_progress: bool = False) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.out``; returns the run summary."""
    import json
    import random
    import shutil

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from tinymath.attention import register as register_packed_attention
    from tinymath.files import write_json
    from tinymath.lora import attach_lora, get_lora_config
    from tinymath.model import compute_dtype, default_device, load_base_model, load_tokenizer, model_fingerprint
    from tinymath.progress import progress_bar

    config.validate()
    budget = parse_memory(config.max_memory) if config.max_memory else None
    _check_out(config)
    if torch.cuda.is_available():
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > torch.cuda.device_count():
            raise TinymathError(f"accelerate launched {state.num_processes} processes but this machine has "
                                f"{torch.cuda.device_count()} GPU(s); use --num_processes {torch.cuda.device_count()}")
    device = default_device()
    dtype = compute_dtype(device)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    is_main = accelerator.is_main_process
    show_progress = show_progress and is_main

    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    splits, data_stats = load_training_data(config, tokenizer)
    train_examples = splits["train"]
    if not train_examples:
        raise TinymathError(f"--data {config.data} has no training examples")

    set_seed(config.seed)
    base = load_base_model(config.model, config.quant, dtype=dtype, device=device,
                           trust_remote_code=config.trust_remote_code)
    if config.packing:
        base.set_attn_implementation(register_packed_attention())
    fingerprint = model_fingerprint(base)
    model = attach_lora(base, get_lora_config(config.lora_r, config.lora_alpha, config.lora_dropout,
                                              config.target_modules), config.gradient_checkpointing)
    loss_model = build_loss_model(model, fast=config.packing)

    def set_checkpointing(on: bool):
        causal_lm = model.get_base_model()
        if on:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            causal_lm.gradient_checkpointing_disable()

    loss_model.train()  # checkpointing and dropout only act in training mode: plan in it
    max_tokens, memory_plan = config.micro_batch_tokens, {}
    if config.packing and max_tokens is None and device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
        budget = budget or int(torch.cuda.memory_allocated(device) + free * 0.9)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            max_tokens, checkpointing, memory_plan = plan_micro_batch(loss_model, train_examples, config, device,
                                                                      budget, set_checkpointing)
        config.gradient_checkpointing = config.gradient_checkpointing or checkpointing
        set_checkpointing(config.gradient_checkpointing)
    config.micro_batch_tokens = max_tokens

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.startswith("cuda"))
    world = accelerator.num_processes
    per_step = config.batch_size * config.grad_accum * world
    steps_per_epoch = max(1, len(train_examples) // per_step)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup_steps = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total_steps))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    loss_model, optimizer, scheduler = accelerator.prepare(loss_model, optimizer, scheduler)

    out = Path(config.out)
    if is_main:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    accelerator.wait_for_everyone()
    metrics_file = open(out / "metrics.jsonl", "a") if is_main else None
    pad_id = tokenizer.pad_token_id

    def step_examples(step: int) -> list[dict]:
        epoch, index = divmod(step, steps_per_epoch)
        order = list(range(len(train_examples)))
        random.Random(config.seed + epoch).shuffle(order)
        chosen = order[index * per_step:(index + 1) * per_step]
        return [train_examples[i] for i in chosen]

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    loss_model.train()
    start, last_loss, real_tokens_total = time.time(), float("nan"), 0
    fields_fmt = "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"
    try:
        with progress_bar("training", total_steps, show_progress, fields_fmt, loss=float("nan"), lr=0.0,
                          tps=0.0) as update:
            for step in range(total_steps):
                t0 = time.time()
                examples = step_examples(step)
                local = examples[accelerator.process_index::world]
                # normalise by the answer tokens of the whole step, across processes; DDP then
                # averages gradients over processes, hence the factor ``world``
                step_tokens = count_label_tokens(examples)
                batches = list(micro_batches(local, config, pad_id, max_tokens))
                loss_total = torch.zeros((), device=accelerator.device)
                for i, batch in enumerate(batches):
                    sync = i == len(batches) - 1
                    with nullcontext() if sync else accelerator.no_sync(loss_model):
                        micro_loss = loss_model(**to_device(batch, accelerator.device))
                        accelerator.backward(micro_loss * world / step_tokens)
                    loss_total += micro_loss.detach()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss = accelerator.reduce(loss_total, reduction="sum").item() / step_tokens
                if not math.isfinite(loss):
                    raise TinymathError(f"the loss became {loss} at step {step + 1}; lower --lr "
                                        f"(now {config.lr}) or use --quant none")
                real = sum(len(ex["input_ids"]) for ex in examples)
                real_tokens_total += real
                tps = real / max(time.time() - t0, 1e-9)
                last_loss = loss
                lr = scheduler.get_last_lr()[0]
                record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": round(loss, 6),
                          "lr": lr, "tokens_per_s": round(tps, 1), "tokens": real}
                if "validation" in splits and (step + 1 == total_steps):
                    record["val_loss"] = round(validation_loss(loss_model, splits["validation"], config, pad_id,
                                                               accelerator.device, max_tokens), 6)
                if metrics_file and ((step + 1) % config.log_every == 0 or step + 1 == total_steps):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                update(loss=loss, lr=lr, tps=tps)
    except torch.OutOfMemoryError:
        raise TinymathError("the GPU ran out of memory; pass --max-memory (e.g. 6GB) to size micro-batches, "
                            "--gradient-checkpointing, a smaller --batch-size or --max-length") from None
    finally:
        if metrics_file:
            metrics_file.close()

    seconds = time.time() - start
    accelerator.wait_for_everyone()
    summary = {"steps": total_steps, "final_loss": last_loss, "train_seconds": round(seconds, 2),
               "real_tokens_per_s": round(real_tokens_total / seconds, 1), "out": str(out),
               "micro_batch_tokens": max_tokens, "gradient_checkpointing": config.gradient_checkpointing}
    if device.startswith("cuda"):
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if is_main:
        run = asdict(config)
        run.update(dtype=str(dtype).removeprefix("torch."), base_fingerprint=fingerprint,
                   data_stats=data_stats, versions=_versions(), git_commit=_git_commit(),
                   num_processes=world, memory_plan=memory_plan, result=summary)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        write_json(out / RUN_FILE, run)  # last: its presence marks a complete run
    accelerator.wait_for_everyone()
    return summary
