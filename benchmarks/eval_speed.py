"""Evaluation speed: the seed-style baseline and `tinymath eval` defaults in ONE run on one GPU.

TinyLlama-1.1B architecture (random weights) with a forced generation length of 256 new tokens
(both paths do the same work), and the real SmolLM2-135M weights with natural stopping on the full
GSM8K test set. Prints wall time, generated tokens/s and the ratio. Model load is reported apart.

    OUT=/tmp/out python benchmarks/eval_speed.py --tokenizer DIR --data gsm8k_dir [--gguf SmolLM2.gguf]
    accelerate launch --num_processes 2 benchmarks/eval_speed.py ... --only tiny,smol   (the split eval)

``--compile-steps``: tinymath's paths with each decode step compiled (eval's ``--compile-steps``).
``--only smolgen``: SmolLM2's generation twice on one loaded model (the second pass compiles nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import TINYLLAMA, WORK, log, random_model  # noqa: E402

NEW_TOKENS = 256


def seed_style_generation(model_dir: Path, prompts: list[list[int]], sample: int = 4) -> dict:
    """The seed's way: NF4 model, HF generate one problem at a time; extrapolated from a sample."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True))
    torch.cuda.synchronize()
    t = time.time()
    for ids in prompts[:sample]:
        x = torch.tensor([ids], device="cuda")
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    seconds = time.time() - t
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"sample": sample, "sample_seconds": round(seconds, 2), "tokens_per_s": round(sample * NEW_TOKENS / seconds, 1),
            "est_full_test_s": round(seconds * len(prompts) / sample, 1)}


def tinymath_generation(model_dir: Path, prompts: list[list[int]], **settings) -> dict:
    """`tinymath eval`'s generation path with its defaults (16-bit weights, auto batch size)."""
    import torch

    from tinymath.lib.generate import (
        GenerationSettings,
        generate_across_processes,
        load_for_inference,
    )

    t = time.time()
    inference = load_for_inference(model=str(model_dir))
    load_s = time.time() - t
    torch.cuda.synchronize()
    t = time.time()
    # under `accelerate launch` each process generates its share (as `tinymath eval` does)
    out = generate_across_processes(inference, prompts, GenerationSettings(max_new_tokens=NEW_TOKENS, **settings))
    torch.cuda.synchronize()
    seconds = time.time() - t
    if settings.get("static_cache") is not False:  # a second pass: compiled graphs are warm now
        first = seconds
        t = time.time()
        out = generate_across_processes(inference, prompts, GenerationSettings(max_new_tokens=NEW_TOKENS, **settings))
        torch.cuda.synchronize()
        seconds = time.time() - t
        load_s += first - seconds  # the first pass's extra time is compilation: reported with the load
    tokens = sum(n for _, n in out)
    del inference
    gc.collect()
    torch.cuda.empty_cache()
    return {"load_s": round(load_s, 1), "generation_s": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "outputs": [text for text, _ in out]}


def smol_eval(args, name: str, main_process: bool) -> None:
    """`tinymath eval` defaults on the real SmolLM2, full test set, natural stopping; run twice (the
    first run pays for compilation), the second is the figure."""
    from tinymath.services.evaluate import evaluate

    for attempt in ("cold", "warm"):
        t = time.time()
        summary = evaluate(model=args.gguf, data=args.data, split="test", out=f"/tmp/tm_eval_smol_{attempt}",
                           overwrite=True, compile_steps=args.compile_steps)
        if main_process:
            log(event="eval", name=f"{name}_{attempt}", wall_s=round(time.time() - t, 1),
                **{k: summary[k] for k in ("accuracy", "accuracy_strict", "n", "tokens_generated",
                                           "generation_seconds", "tokens_per_s", "compile_seconds")})


def smol_generation(args, name: str, main_process: bool) -> None:
    """The generation of `tinymath eval` on the real SmolLM2 (its own prompts, natural stopping),
    twice on one loaded model: the second pass is the figure (with ``--compile-steps``, the first
    pays for compiling the steps unless an earlier pass in the process did)."""
    import torch

    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.generate import GenerationSettings, generate_across_processes, load_for_inference

    inference = load_for_inference(model=args.gguf)
    tok = inference.tokenizer
    rows = [json.loads(line) for line in open(Path(args.data) / "test.jsonl")]
    prompts = [encode_prompt(tok, build_prompt(tok, r["question"], inference.format)) for r in rows]
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, compile_steps=args.compile_steps)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for attempt in ("first", "second"):
        sync()
        t = time.time()
        out = generate_across_processes(inference, prompts, settings)
        sync()
        if main_process:
            log(event="eval", name=f"{name}_{attempt}", generation_s=round(time.time() - t, 2),
                tokens=sum(n for _, n in out), problems=len(prompts))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True, help="folder with GSM8K test.jsonl")
    parser.add_argument("--gguf", default=None, help="real SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--only", default="seed,tiny,smol,equal")
    parser.add_argument("--equal-sample", type=int, default=16)
    parser.add_argument("--compile-steps", action="store_true", help="each decode step compiled")
    args = parser.parse_args()
    steps = {"compile_steps": True} if args.compile_steps else {}
    named = "_compiled_steps" if args.compile_steps else ""
    which = set(args.only.split(","))

    from transformers import AutoTokenizer

    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.distributed import end_processes, process_state

    state = process_state()  # under accelerate launch: rank 0 builds the model, the others wait
    WORK.mkdir(exist_ok=True)
    fixed = WORK / "tinyllama_rand_fixed256"
    with state.main_process_first():
        if not fixed.exists():
            random_model(fixed, TINYLLAMA, args.tokenizer)
            cfg = json.loads((fixed / "generation_config.json").read_text())
            cfg["min_new_tokens"] = NEW_TOKENS  # forced length: every problem generates exactly 256 tokens
            (fixed / "generation_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = [json.loads(line) for line in open(Path(args.data) / "test.jsonl")]
    prompts = [[t % TINYLLAMA["vocab_size"] for t in encode_prompt(tok, build_prompt(tok, r["question"], "chat"))]
               for r in rows]

    if state.num_processes > 1:  # accelerate launch: the split paths only, rank 0 logs
        gpus = f"{state.num_processes}gpu"
        if "tiny" in which:
            fast = tinymath_generation(fixed, prompts, **steps)
            fast.pop("outputs")
            if state.is_main_process:
                log(event="eval", name=f"tinymath_eval_defaults{named}_{gpus}", arch="tinyllama", problems=len(prompts), **fast)
        if "smol" in which and args.gguf:
            smol_eval(args, f"smollm2_real_natural_stop{named}_{gpus}", state.is_main_process)
        if "smolgen" in which and args.gguf:
            smol_generation(args, f"smollm2_generation{named}_{gpus}", state.is_main_process)
        end_processes(state)
        return

    if "seed" in which:
        seed = seed_style_generation(fixed, prompts)
        log(event="eval", name="seed_style_bs1_nf4", arch="tinyllama", **seed)
    if "dynamic" in which:
        plain = tinymath_generation(fixed, prompts, static_cache=False)
        plain.pop("outputs")
        log(event="eval", name="tinymath_eval_dynamic_cache", arch="tinyllama", problems=len(prompts), **plain)
    if "tiny" in which:
        fast = tinymath_generation(fixed, prompts, **steps)
        ref = fast.pop("outputs")
        extra = {"ratio_vs_seed": round(seed["est_full_test_s"] / fast["generation_s"], 1)} if "seed" in which else {}
        log(event="eval", name=f"tinymath_eval_defaults{named}", arch="tinyllama", problems=len(prompts), **extra, **fast)
    if "smol" in which and args.gguf:
        smol_eval(args, f"smollm2_real_natural_stop{named}", True)
    if "smolgen" in which and args.gguf:
        smol_generation(args, f"smollm2_generation{named}", True)
    if "equal" in which and args.gguf:
        # greedy equality with plain HF generate (batch 1, no padding, SDPA attention) on a sample, in
        # fp32: the same computation (static cache, batching, padding, stopping, decode attention)
        # without bf16 rounding near-ties
        import torch

        from tinymath.base.prompts import extract_answer
        from tinymath.lib.generate import (
            GenerationSettings,
            generate_batch,
            load_for_inference,
        )

        inference = load_for_inference(model=args.gguf)
        inference.model.to(torch.float32)
        tk = inference.tokenizer
        sample = [encode_prompt(tk, build_prompt(tk, r["question"], "chat")) for r in rows[:args.equal_sample]]
        fast = [text for text, _ in generate_batch(inference, sample, GenerationSettings(max_new_tokens=NEW_TOKENS, static_cache=True))]
        inference.model.set_attn_implementation("sdpa")  # the reference: transformers' own attention
        plain = []
        for ids in sample:
            x = torch.tensor([ids], device=inference.model.device)
            out = inference.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                           do_sample=False, pad_token_id=tk.pad_token_id, eos_token_id=tk.eos_token_id)
            plain.append(tk.decode(out[0, len(ids):], skip_special_tokens=True))
        log(event="greedy_equality", dtype="float32", sample=len(sample),
            same_text=sum(a == b for a, b in zip(fast, plain)),
            same_answer=sum(extract_answer(a) == extract_answer(b) for a, b in zip(fast, plain)))


if __name__ == "__main__":
    main()
