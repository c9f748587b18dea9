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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from tinymath.checkpoint import BEST
from tinymath.config import CONFIG_FILE, RUN_FILE, TrainConfig, parse_memory
from tinymath.errors import TinymathError


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


CPU_MICRO_BATCH_TOKENS = 4096  # fp32 activations of SmolLM2-135M for 4k tokens: about 6 GB


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

        def forward(self, input_ids, labels, all_positions=False, **kwargs):
            """``all_positions``: the loss over every position, unlabelled ones ignored, instead of
            over the selected labelled ones (the same sum; a fixed shape for `tinymath.graphs`)."""
            if not fast:
                logits = self.peft_model(input_ids=input_ids, use_cache=False, **kwargs).logits[:, :-1]
                return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")
            causal_lm = self.peft_model.get_base_model()
            hidden = causal_lm.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
            hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
            if not all_positions:
                keep = targets != -100
                hidden, targets = hidden[keep], targets[keep]
            head = causal_lm.get_output_embeddings()
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, targets.shape[0], chunk_tokens):
                h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
                # no random numbers in the loss: nothing to save (and no RNG state read under a CUDA graph)
                total = total + (checkpoint(chunk_loss, head, h, t, use_reentrant=False, preserve_rng_state=False)
                                 if torch.is_grad_enabled()
                                 else chunk_loss(head, h, t))
            return total

    return CausalLMLoss(model)


# ---------------------------------------------------------------- data


def load_training_data(config: TrainConfig, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Tokenized train (and validation) examples: a prepare-data folder, or raw data prepared now."""
    from tinymath.data import (is_prepared, load_prepared, read_gsm8k, split_validation, tokenize_split,
                               validate_prepare_options)

    if is_prepared(config.data):
        dataset, manifest = load_prepared(config.data)
        for key in ("format", "system_prompt", "max_length", "calc_annotations"):
            given = getattr(config, key)
            if given is not None and given != manifest[key]:
                raise TinymathError(f"--{key.replace('_', '-')} {given} contradicts the prepared data "
                                    f"({manifest[key]}); re-run prepare-data or drop the flag")
            setattr(config, key, manifest[key])
        if manifest["eos_token"] != tokenizer.eos_token or manifest.get("vocab_size", len(tokenizer)) != len(tokenizer):
            raise TinymathError(f"--data {config.data} was tokenized for {manifest['model']}, "
                                f"not for --model {config.model}; run prepare-data with this model")
        if "train" not in dataset:
            raise TinymathError(f"--data {config.data} has no train split (has {', '.join(dataset)})")
        splits = {name: _examples(dataset[name].to_dict()) for name in ("train", "validation") if name in dataset}
        return splits, manifest["splits"]

    config.format = config.format or "chat"
    config.max_length = config.max_length or 512
    config.calc_annotations = config.calc_annotations or "keep"
    validate_prepare_options(config.format, config.max_length, config.calc_annotations, config.val_size, None)
    raw = split_validation(read_gsm8k(config.data, "train"), config.val_size)
    splits, stats = {}, {}
    for name, split_rows in raw.items():
        columns, stats[name] = tokenize_split(split_rows, tokenizer, config.format, config.system_prompt,
                                              config.max_length, config.calc_annotations)
        splits[name] = _examples(columns)
    return splits, stats


def _examples(columns: dict) -> list[dict]:
    """Tokenized columns (question, answer, input_ids, labels) as one dict per example."""
    keys = ("question", "answer", "input_ids", "labels")
    return [dict(zip(keys, values)) for values in zip(*(columns[k] for k in keys))]


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


def _check_out(config: TrainConfig, resume: bool) -> None:
    from tinymath.checkpoint import check_unlocked

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise TinymathError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        check_unlocked(out)
    if resume or not (out.is_dir() and any(out.iterdir())):
        return
    ours = any((out / name).exists() for name in (RUN_FILE, "metrics.jsonl", CONFIG_FILE, ".lock"))
    if not config.overwrite:
        hint = f", or --resume {out} to continue it" if (out / CONFIG_FILE).exists() else ""
        raise TinymathError(f"--out {out} already exists and is not empty; pass --overwrite to replace it{hint}")
    if not ours:
        raise TinymathError(f"--out {out} holds files that tinymath did not write; choose another --out")


def validation_loss(loss_model, examples: list[dict], config: TrainConfig, pad_id: int, device,
                    max_tokens: int | None) -> float:
    """Mean answer-token loss on held-out examples (same batching as training, no gradients)."""
    import torch

    total = 0.0
    loss_model.eval()
    with torch.no_grad(), eager():
        for batch in micro_batches(examples, config, pad_id, max_tokens):
            total += loss_model(**to_device(batch, device)).item()
    loss_model.train()
    return total / max(count_label_tokens(examples), 1)


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


def compile_layers(peft_model) -> None:
    """Regional compilation: each decoder layer goes through ``torch.compile``. Every layer runs the
    same code, so one graph, compiled once for any token count (dynamic shapes), serves them all.
    The embeddings' output is marked as requiring gradients so that the first layer sees the same
    inputs as the others (else it alone compiles again). Fused norms, rotary, activations and LoRA
    adds, and far fewer kernel launches: small models are otherwise launch-bound. Generation and
    validation run the layers eagerly (`eager`)."""
    causal_lm = peft_model.get_base_model()
    layers = getattr(causal_lm.get_decoder(), "layers", None)
    if layers is None:
        raise TinymathError(f"--compile: {type(causal_lm).__name__} keeps its decoder layers elsewhere than "
                            "`.layers`; pass --no-compile")
    if not hasattr(causal_lm, "_require_grads_hook"):  # gradient checkpointing may have set it already
        causal_lm.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)


def compile_by_default(device: str, config: TrainConfig) -> bool:
    """Compile the packed path on GPUs that torch.compile's Triton kernels support (compute
    capability 7.0 and newer); never the plain reference path, never on CPU."""
    if not (device.startswith("cuda") and config.packing):
        return False
    import torch
    from torch.utils._triton import has_triton

    return torch.cuda.get_device_capability(device) >= (7, 0) and has_triton()


@contextmanager
def eager():
    """The compiled layers' plain Python forward (other shapes and attention implementations)."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield


@contextmanager
def inference_mode(peft_model):
    """Eval mode with masked SDPA attention (generation and padded scoring need attention masks,
    which the packed training attention does not take); training mode again afterwards."""
    base = peft_model.get_base_model()
    attn = base.config._attn_implementation
    base.set_attn_implementation("sdpa")
    peft_model.eval()
    try:
        with eager():
            yield
    finally:
        base.set_attn_implementation(attn)
        peft_model.train()


def validation_accuracy(peft_model, tokenizer, rows: list[dict], config: TrainConfig) -> float:
    """GSM8K accuracy of the model being trained on held-out train-split rows (greedy, batched)."""
    from tinymath.evaluate import score
    from tinymath.generate import GenerationSettings, InferenceModel, generate_batch
    from tinymath.prompts import build_prompt, encode_prompt

    with inference_mode(peft_model):
        inference = InferenceModel(peft_model, tokenizer, config.format, config.system_prompt, {})
        prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, r["question"], config.format, config.system_prompt))
                   for r in rows]
        completions = [text for text, _ in generate_batch(inference, prompts, GenerationSettings(max_new_tokens=256))]
    return score(completions, [r["answer"] for r in rows])["summary"]["accuracy"]


def dry_run_report(config: TrainConfig) -> dict:
    """The resolved config and what the data amounts to, without loading the model."""
    from tinymath.model import load_tokenizer

    from accelerate import PartialState

    config.validate()
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    splits, stats = load_training_data(config, tokenizer)
    per_step = config.batch_size * config.grad_accum * PartialState().num_processes
    steps_per_epoch = max(1, len(splits["train"]) // per_step)
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    return {"config": asdict(config),
            "data": {name: {"examples": len(rows), "tokens": sum(len(r["input_ids"]) for r in rows),
                            "answer_tokens": count_label_tokens(rows)} for name, rows in splits.items()},
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "examples_per_step": per_step}


def train(config: TrainConfig, show_progress: bool = False, resume: bool = False) -> dict:
    """Fine-tune ``config.model`` on ``config.data`` into ``config.out``; returns the run summary.

    ``resume``: continue the run in ``config.out`` from its latest checkpoint.
    """
    import functools
    import json
    import random
    import shutil

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from tinymath.attention import register as register_packed_attention
    from tinymath.checkpoint import (latest_checkpoint, load_checkpoint, restore_best, run_lock, save_checkpoint,
                                     stop_on_signals)
    from tinymath.curves import plot_curves
    from tinymath.files import write_json
    from tinymath.graphs import GraphCaptureError, GraphedMicroBatches, use_cuda_graphs
    from tinymath.lora import attach_lora, get_lora_config
    from tinymath.model import (compute_dtype, default_device, load_base_model, load_tokenizer, model_fingerprint,
                                process_state)
    from tinymath.progress import progress_bar

    config.validate()
    budget = parse_memory(config.max_memory) if config.max_memory else None
    _check_out(config, resume)
    out = Path(config.out)
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise TinymathError(f"--resume {out}: no checkpoint to resume from (train with --save-every N, "
                            "or Ctrl-C a run: it saves one)")
    process_state()
    device = default_device()
    dtype = compute_dtype(device)
    log_with = None
    if config.report_to:
        import importlib.util

        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[config.report_to]
        if importlib.util.find_spec(module) is None:
            raise TinymathError(f"--report-to {config.report_to}: {module} is not installed (pip install {module})")
        log_with = config.report_to
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    # the schedule counts optimizer steps; accelerate would otherwise step it once per process
    accelerator = Accelerator(mixed_precision=precision, log_with=log_with, step_scheduler_with_optimizer=False,
                              project_dir=str(out / "logs") if log_with else None)
    is_main = accelerator.is_main_process
    show_progress = show_progress and is_main

    with accelerator.main_process_first():  # a .gguf is converted once, by the main process
        tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    splits, data_stats = load_training_data(config, tokenizer)
    train_examples = splits["train"]
    if not train_examples:
        raise TinymathError(f"--data {config.data} has no training examples")
    val_rows = splits.get("validation", [])[:config.eval_limit] if config.eval_every else []

    set_seed(config.seed)
    with accelerator.main_process_first():
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
    elif config.packing and max_tokens is None:  # no planner off the GPU: a size that fits in RAM
        max_tokens = CPU_MICRO_BATCH_TOKENS
    config.micro_batch_tokens = max_tokens
    # the choice made for this machine is recorded in the result, not in the config: a run resumed
    # elsewhere decides again
    compiling = config.compile if config.compile is not None else compile_by_default(device, config)
    if compiling:  # after planning: the planner's eager measurement is the larger (safe) one
        compile_layers(model)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.startswith("cuda"))
    world = accelerator.num_processes
    per_step = config.batch_size * config.grad_accum * world
    steps_per_epoch = max(1, len(train_examples) // per_step)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup_steps = int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total_steps))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)

    start_step, best, saved_state = 0, {"accuracy": None, "step": None}, {}
    if checkpoint is not None:
        saved_state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        start_step, best = saved_state["step"], saved_state.get("best", best)
        if start_step >= total_steps:
            raise TinymathError(f"--resume {out}: the checkpoint is at step {start_step}, the run ends at step "
                                f"{total_steps}; pass a larger --max-steps or --epochs to train further")
    loss_model, optimizer, scheduler = accelerator.prepare(loss_model, optimizer, scheduler)
    graphed = None
    lengths = [len(ex["input_ids"]) for ex in train_examples]
    local_examples = math.ceil(per_step / world)
    room = (max_tokens or 0) / (sum(lengths) / len(lengths) * local_examples)  # in average steps
    if use_cuda_graphs(config, device, world, accelerator.scaler is not None, room):
        graphed = GraphedMicroBatches(loss_model, trainable, tokenizer.pad_token_id or 0, max_examples=local_examples,
                                      max_seq_len=max(lengths), device=accelerator.device)

    if is_main:
        if not resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, asdict(config))
        if resume:  # forget what was logged after the checkpoint: those steps run again
            metrics_path = out / "metrics.jsonl"
            kept = [line for line in metrics_path.read_text().splitlines()
                    if _parses(line) and json.loads(line)["step"] <= start_step] if metrics_path.exists() else []
            metrics_path.write_text("".join(line + "\n" for line in kept))
            (out / RUN_FILE).unlink(missing_ok=True)
            restore_best(checkpoint, out, saved_state)
    accelerator.wait_for_everyone()
    if log_with:
        accelerator.init_trackers("tinymath", config={k: v for k, v in asdict(config).items()
                                                      if isinstance(v, (int, float, str, bool))})
    pad_id = tokenizer.pad_token_id

    @functools.lru_cache(maxsize=1)  # one shuffle per epoch
    def epoch_order(epoch: int) -> list[int]:
        order = list(range(len(train_examples)))
        random.Random(config.seed + epoch).shuffle(order)
        return order

    def step_examples(step: int) -> list[dict]:
        epoch, index = divmod(step, steps_per_epoch)
        return [train_examples[i] for i in epoch_order(epoch)[index * per_step:(index + 1) * per_step]]

    def step_batches(step: int):
        """A step's examples, its answer-token count and this process's micro-batches."""
        examples = step_examples(step)
        local = examples[accelerator.process_index::world]
        return examples, count_label_tokens(examples), list(micro_batches(local, config, pad_id, max_tokens))

    def save(step: int):
        if is_main:
            save_checkpoint(out, step, accelerator.unwrap_model(loss_model).peft_model, optimizer, scheduler,
                            {"best": best}, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    retention = None
    if config.retention_every and is_main:
        from tinymath.retention import RETENTION_SLICE, adapter_drift, base_replies, retention_prompts

        slice_prompts = retention_prompts()[:RETENTION_SLICE]
        with inference_mode(model), model.disable_adapter():
            slice_replies = base_replies(model, tokenizer, slice_prompts, config.format, config.system_prompt, 32)

        def retention():
            with inference_mode(model):
                return adapter_drift(model, tokenizer, slice_prompts, slice_replies, config.format,
                                     config.system_prompt)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start, last_loss, real_tokens_total = time.time(), float("nan"), 0
    fields_fmt = "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"
    lock = run_lock(out) if is_main else nullcontext()
    try:
        with lock, stop_on_signals() as stop, open(out / "metrics.jsonl", "a") if is_main else nullcontext() as metrics_file, \
                progress_bar("training", total_steps, show_progress, fields_fmt, loss=float("nan"), lr=0.0,
                             tps=0.0) as update:
            update(advance=start_step)
            upcoming = step_batches(start_step)
            for step in range(start_step, total_steps):
                t0 = time.time()
                # normalise by the answer tokens of the whole step, across processes; DDP then
                # averages gradients over processes, hence the factor ``world``
                examples, step_tokens, batches = upcoming
                loss_total = torch.zeros((), device=accelerator.device)
                for i, batch in enumerate(batches):
                    if graphed is not None:
                        try:
                            micro_loss = graphed.step(batch, world / step_tokens)
                            loss_total += micro_loss
                            continue
                        except GraphCaptureError as exc:  # a model or library that graphs cannot hold
                            if config.lora_dropout:  # a failed capture can leave the CUDA RNG unusable
                                raise TinymathError(f"CUDA graphs could not capture this model ({exc}); "
                                                    "train with --no-cuda-graphs") from exc
                            accelerator.print(f"tinymath: training without CUDA graphs ({exc})")
                            graphed = None
                    sync = i == len(batches) - 1
                    with nullcontext() if sync else accelerator.no_sync(loss_model):
                        micro_loss = loss_model(**to_device(batch, accelerator.device))
                        accelerator.backward(micro_loss * world / step_tokens)
                    loss_total += micro_loss.detach()
                if step + 1 < total_steps:  # the next step's batches, built while the GPU works on this one
                    upcoming = step_batches(step + 1)
                # one collective per step: the loss, and whether any rank was asked to stop (all
                # ranks must agree to stop at the same step, or they deadlock)
                totals = torch.stack([loss_total, torch.tensor(float(bool(stop["signal"])), device=accelerator.device)])
                loss_sum, stop_votes = (accelerator.reduce(totals, reduction="sum") if world > 1 else totals).tolist()
                loss = loss_sum / step_tokens
                if not math.isfinite(loss):  # checked before the update: the weights stay good
                    last = latest_checkpoint(out)
                    kept = f"the last good checkpoint is {last}; " if last else ""
                    raise TinymathError(f"the loss became {loss} at step {step + 1}; stopped. {kept}lower --lr "
                                        f"(now {config.lr}) and start again (or --resume {out})")
                lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=graphed is None)  # graphs keep adding into the same buffers
                real = sum(len(ex["input_ids"]) for ex in examples)
                real_tokens_total += real
                tps = real / max(time.time() - t0, 1e-9)
                last_loss = loss
                done = step + 1
                record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": round(loss, 6),
                          "lr": lr, "tokens_per_s": round(tps, 1), "tokens": real}
                if "validation" in splits and done == total_steps:
                    record["val_loss"] = round(validation_loss(loss_model, splits["validation"], config, pad_id,
                                                               accelerator.device, max_tokens), 6)
                evaluating = config.eval_every and (done % config.eval_every == 0 or done == total_steps)
                if evaluating and is_main:
                    record["val_accuracy"] = validation_accuracy(model, tokenizer, val_rows, config)
                    if best["accuracy"] is None or record["val_accuracy"] > best["accuracy"]:
                        best = {"accuracy": record["val_accuracy"], "step": done}
                        if config.keep == "best":
                            model.save_pretrained(str(out / BEST))
                if retention and (done % config.retention_every == 0 or done == total_steps):
                    numbers = retention()
                    record.update(retention_kl=numbers["kl"], retention_top1=numbers["top1_agreement"])
                    evaluating = True
                if metrics_file and (done % config.log_every == 0 or done == total_steps or evaluating):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if log_with:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
                if evaluating and is_main:
                    plot_curves(out)
                update(loss=loss, lr=lr, tps=tps)
                if config.save_every and done % config.save_every == 0 and done < total_steps:
                    save(done)
                if world == 1:
                    stopping = stop["signal"]
                else:  # only the agreed vote counts: a signal that came after it waits for the next step
                    stopping = (stop["signal"] or "a signal") if stop_votes else None
                if stopping:
                    stop["signal"] = stopping
                    save(done)
                    raise TinymathError(f"stopped by {stop['signal']} after step {done} of {total_steps}; "
                                        f"a checkpoint is saved. Continue with: tinymath train --resume {out}")
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        cause = exc.inner_exception
        first_line = (str(cause).splitlines() or [""])[0]
        raise TinymathError(f"torch.compile could not compile the model on this machine "
                            f"({type(cause).__name__}: {first_line}); train with --no-compile") from exc
    except torch.OutOfMemoryError:
        raise TinymathError("the GPU ran out of memory; pass --max-memory (e.g. 6GB) to size micro-batches, "
                            "--gradient-checkpointing, a smaller --batch-size or --max-length") from None
    finally:
        if log_with:
            accelerator.end_training()

    seconds = time.time() - start
    accelerator.wait_for_everyone()
    summary = {"steps": total_steps, "final_loss": last_loss, "train_seconds": round(seconds, 2),
               "real_tokens_per_s": round(real_tokens_total / seconds, 1), "out": str(out),
               "micro_batch_tokens": max_tokens, "gradient_checkpointing": config.gradient_checkpointing,
               "compiled": compiling, "cuda_graphs": graphed is not None,
               "resumed_from_step": start_step or None, "best_val_accuracy": best["accuracy"],
               "best_step": best["step"]}
    if device.startswith("cuda"):
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if is_main:
        run = asdict(config)
        run.update(dtype=str(dtype).removeprefix("torch."), base_fingerprint=fingerprint,
                   data_stats=data_stats, versions=_versions(), git_commit=_git_commit(),
                   num_processes=world, memory_plan=memory_plan, result=summary)
        model.save_pretrained(str(out))
        if config.keep == "best" and (out / BEST / "adapter_model.safetensors").exists():
            shutil.copy(out / BEST / "adapter_model.safetensors", out / "adapter_model.safetensors")
        tokenizer.save_pretrained(str(out))
        plot_curves(out)
        write_json(out / RUN_FILE, run)  # last: its presence marks a complete run
    accelerator.wait_for_everyone()
    return summary


def _parses(line: str) -> bool:
    """A complete metrics line (a run killed mid-write can leave a torn last line)."""
    import json

    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return bool(line.strip())
