"""Training speed: the seed-style baseline and `tinymath train` defaults in ONE run on one GPU.

TinyLlama-1.1B architecture (random weights) and SmolLM2-135M architecture on the real GSM8K train
set; prints real (non-padding) tokens/s, peak GPU memory and the ratio against the baseline; also
`--max-memory 6GB`, and the first 20 losses of the fast path against the plain reference path.

    OUT=/tmp/out python benchmarks/train_speed.py --tokenizer DIR --train gsm8k/train.jsonl
    python benchmarks/train_speed.py ... --only multi   # under accelerate launch: tinymath on N GPUs
    python benchmarks/train_speed.py ... --only fused   # Liger's fused kernels against the plain layers
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import TINYLLAMA, WORK, log, random_model, remap_prepared, smollm2_with_data  # noqa: E402


def seed_style_baseline(model_dir: Path, texts: list[str], tokenizer, steps: int = 30) -> dict:
    """The seed's recipe: HF Trainer, pad to 512, batch 4 x accumulation 4, LoRA r=8 on q/v, NF4,
    gradient checkpointing (as in shared/baselines/seed_style_qlora.py)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    n = steps * 16
    vocab = model.config.vocab_size
    enc = tokenizer(texts[:n], truncation=True, max_length=512, padding="max_length")["input_ids"]
    ds = [{"input_ids": [i % vocab for i in x]} for x in enc]
    real = sum(min(len(tokenizer(t).input_ids), 512) for t in texts[:n])
    args = TrainingArguments(output_dir="/tmp/seed_out", per_device_train_batch_size=4, gradient_accumulation_steps=4,
                             learning_rate=2e-4, bf16=True, logging_steps=10, save_strategy="no", report_to=[],
                             max_steps=steps, dataloader_num_workers=2)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    torch.cuda.synchronize()
    t = time.time()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.time() - t
    result = {"real_tokens_per_s": round(real / seconds), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "seconds": round(seconds, 1), "examples": n}
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def tinymath_run(name: str, model_dir: Path, data: Path, steps: int, **overrides) -> dict:
    """`tinymath train` with its defaults (plus overrides); steady-state tokens/s after 3 warm-up steps."""
    import torch

    from tinymath import train
    from tinymath.base.config import TrainConfig

    torch.cuda.reset_peak_memory_stats()
    # the compiled path's steady rate (the defaults compile runs of 10M tokens or more); --compile False to compare
    overrides.setdefault("compile", True)
    config = TrainConfig(data=str(data), model=str(model_dir), out=f"/tmp/tm_{name}", max_steps=steps, overwrite=True,
                         **overrides)
    summary = train(config)
    metrics = [json.loads(line) for line in open(f"/tmp/tm_{name}/metrics.jsonl")]
    steady = metrics[3:] or metrics
    seconds = sum(m["tokens"] / m["tokens_per_s"] for m in steady)
    result = {"real_tokens_per_s": round(sum(m["tokens"] for m in steady) / seconds),
              "overall_tokens_per_s": summary["real_tokens_per_s"],
              # a step once its CUDA graph exists (the steady figure above includes the captures)
              "median_step_tokens_per_s": round(sorted(m["tokens_per_s"] for m in steady)[len(steady) // 2]), "peak_gib": summary.get("peak_memory_gib"),
              "micro_batch_tokens": summary["micro_batch_tokens"],
              "gradient_checkpointing": summary["gradient_checkpointing"], "steps": steps,
              "compiled": summary["compiled"], "cuda_graphs": summary["cuda_graphs"],
              "first_step_s": round(metrics[0]["tokens"] / metrics[0]["tokens_per_s"], 1),  # compiling included
              "losses": [m["loss"] for m in metrics]}
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True, help="folder with a tokenizer (SmolLM2's)")
    parser.add_argument("--train", required=True, help="GSM8K train.jsonl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--only", default="seed,tiny,mem6,losses,smol")
    parser.add_argument("--loss-paths", help="with --only losses: which fast paths to compare (default: all)")
    args = parser.parse_args()
    which = set(args.only.split(","))

    from accelerate import PartialState
    from transformers import AutoTokenizer

    from tinymath.lib.distributed import end_processes

    with PartialState().main_process_first():  # under accelerate launch: rank 0 builds, the others wait
        smol, prep = smollm2_with_data(args.tokenizer, Path(args.train).parent)
        tiny = random_model(WORK / "tinyllama_rand", TINYLLAMA, args.tokenizer)
        prep_tiny = remap_prepared(prep, WORK / "prep_tiny", TINYLLAMA["vocab_size"])

    if "multi" in which:  # run under `accelerate launch --num_processes N`
        state = PartialState()
        n = state.num_processes
        # --batch-size is per GPU: same work per GPU; graphs in every process (their default with one)
        r = tinymath_run(f"multi{n}", tiny, prep_tiny, args.steps, cuda_graphs=True)
        if state.is_main_process:
            log(event="train", name=f"tinymath_defaults_{n}gpu", arch="tinyllama", processes=n,
                **{k: v for k, v in r.items() if k != "losses"})
        end_processes(state)
        return

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in open(args.train)]
    texts = [f"### Instruction:\n{r['question']}\n\n### Response:\n{r['answer']}{tokenizer.eos_token}" for r in rows]

    if "seed" in which:
        seed = seed_style_baseline(tiny, texts, tokenizer)
        log(event="train", name="seed_style_baseline", arch="tinyllama", **seed)
    if "tiny" in which:
        fast = tinymath_run("tiny", tiny, prep_tiny, args.steps)
        extra = {"ratio_vs_seed": round(fast["real_tokens_per_s"] / seed["real_tokens_per_s"], 2)} if "seed" in which else {}
        log(event="train", name="tinymath_defaults", arch="tinyllama", **extra,
            **{k: v for k, v in fast.items() if k != "losses"})
    if "tiny_eager" in which:  # what torch.compile and CUDA graphs add
        for name, extra in (("no_compile", {"compile": False}), ("no_graphs", {"cuda_graphs": False})):
            r = tinymath_run(f"tiny_{name}", tiny, prep_tiny, args.steps, **extra)
            log(event="train", name=f"tinymath_defaults_{name}", arch="tinyllama",
                **{k: v for k, v in r.items() if k != "losses"})
    if "fused" in which:  # Liger's fused kernels against the plain layers (both uncompiled, CUDA graphs)
        runs = {}
        for name, flag in (("unfused", False), ("fused", True)):  # plain first: Liger's rotary swap is process-wide
            runs[name] = tinymath_run(f"tiny_{name}", tiny, prep_tiny, args.steps, compile=False, cuda_graphs=True,
                                      fused_kernels=flag, lora_dropout=0.0, lr=1e-4)
        diff = max(abs(a - b) / abs(b) for a, b in zip(runs["fused"]["losses"], runs["unfused"]["losses"]))
        log(event="train", name="tinymath_fused_kernels", arch="tinyllama", steps=args.steps,
            **{f"{name}_{key}": r[key] for name, r in runs.items()
               for key in ("real_tokens_per_s", "median_step_tokens_per_s", "overall_tokens_per_s", "peak_gib")},
            ratio=round(runs["fused"]["real_tokens_per_s"] / runs["unfused"]["real_tokens_per_s"], 3),
            max_rel_loss_diff=round(diff, 6))
    if "mem6" in which:
        low = tinymath_run("mem6", tiny, prep_tiny, args.steps, max_memory="6GB")
        extra = {"ratio_vs_seed": round(low["real_tokens_per_s"] / seed["real_tokens_per_s"], 2)} if "seed" in which else {}
        log(event="train", name="tinymath_max_memory_6GB", arch="tinyllama", **extra,
            **{k: v for k, v in low.items() if k != "losses"})
    if "losses" in which:
        # the same examples per step (the default batch), cut differently; LoRA dropout off. At
        # lr 1e-4: at the default 1e-3 random weights train chaotically (loss spikes), and bf16
        # rounding alone then moves losses by percents after ~8 steps, whichever path computes them
        from tinymath.base.config import TrainConfig

        batch = TrainConfig().batch_size
        runs = {}
        only = set(args.loss_paths.split(",")) if args.loss_paths else None
        for name, extra in (("fast", {}), ("fast_no_compile", {"compile": False}),
                            ("fast_no_compile_no_graphs", {"compile": False, "cuda_graphs": False}),
                            # several graphed micro-batches a step, their gradients accumulated
                            ("graphs_micro_2048", {"compile": False, "micro_batch_tokens": 2048, "cuda_graphs": True}),
                            ("plain", {"packing": False, "compile": False, "batch_size": 8, "grad_accum": batch // 8})):
            if only and name not in only | {"plain"}:
                continue
            runs[name] = tinymath_run(f"loss_{name}", tiny, prep_tiny, 20, lora_dropout=0.0, lr=1e-4, **extra)["losses"]
        diff = {name: round(max(abs(a - b) / abs(b) for a, b in zip(runs[name], runs["plain"])), 6)
                for name in runs if name != "plain"}
        log(event="loss_agreement", arch="tinyllama", lr=1e-4, **runs, max_rel_diff_vs_plain=diff)
    if "smol" in which:
        variants = {"plain": dict(packing=False, compile=False, cuda_graphs=False),  # the plain loop
                    "no_compile_no_graphs": dict(compile=False, cuda_graphs=False),
                    "compiled_no_graphs": dict(cuda_graphs=False),
                    "graphs_no_compile": dict(compile=False),
                    "defaults": {}}
        runs = {}
        for name, extra in variants.items():
            runs[name] = tinymath_run(f"smol_{name}", smol, prep, args.steps, quant="none", **extra)
            log(event="train", name=f"smollm2_{name}", arch="smollm2",
                **{k: v for k, v in runs[name].items() if k != "losses"})
        plain, fast = runs["plain"]["real_tokens_per_s"], runs["defaults"]
        log(event="train", name="smollm2_lora", arch="smollm2", plain_loop_tokens_per_s=plain,
            tinymath_tokens_per_s=fast["real_tokens_per_s"], peak_gib=fast["peak_gib"],
            micro_batch_tokens=fast["micro_batch_tokens"], first_step_s=fast["first_step_s"],
            overall_tokens_per_s=fast["overall_tokens_per_s"],
            **{f"{name}_tokens_per_s": r["real_tokens_per_s"] for name, r in runs.items()},
            ratio_vs_plain=round(fast["real_tokens_per_s"] / plain, 2))

if __name__ == "__main__":
    main()
