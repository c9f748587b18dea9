"""Where a decode step's time goes: tinymath's decode loop on the real SmolLM2 (or any model) at
several batch sizes on one GPU. For each row count: whether the step graph was captured, the
prefill, a whole step (graph replay plus the sampling kernels around it, from the difference of two
forced-length decodes), an eager step, and a natural-stopping decode of 256 tokens as eval runs it
(``--profile``: the kernels of 24 eager steps by GPU time). Answers "does a step scale with the
rows?", which decides how evaluation splits over several GPUs. ``--fused``: then the same again
with Liger's fused RMSNorm, rotary and SwiGLU kernels swapped in (`tinymath.lib.speed.fuse_kernels`),
and how many of ``--equal`` problems get the same greedy answer both ways. ``--compiled``: then
again with each step compiled before its capture (eval's ``--compile-steps``; ``first_decode_s`` is
its first decode of 256 steps, compiling included, and 8 steps for the others), with Liger's kernels
too when ``--fused`` ran.

    OUT=/tmp/out python benchmarks/decode_steps.py --model SmolLM2.gguf --data gsm8k_dir [--rows 1319,660,330] [--fused] [--compiled]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import log  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="folder with GSM8K test.jsonl")
    parser.add_argument("--rows", default="1319,660,330")
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--profile", action="store_true", help="also the kernels of 24 eager steps")
    parser.add_argument("--fused", action="store_true", help="then again with Liger's fused kernels")
    parser.add_argument("--compiled", action="store_true",
                        help="then again with each decode step compiled (eval's --compile-steps)")
    parser.add_argument("--equal", type=int, default=256, help="--fused: problems whose greedy answers are compared")
    args = parser.parse_args()

    import torch

    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib import decode as decode_mod
    from tinymath.lib.generate import load_for_inference

    inference = load_for_inference(model=args.model)
    model, tok = inference.model, inference.tokenizer
    questions = [json.loads(line)["question"] for line in open(Path(args.data) / "test.jsonl")]
    vocab = model.config.vocab_size  # a random-weight architecture may carry a larger tokenizer
    prompts = [[t % vocab for t in encode_prompt(tok, build_prompt(tok, q, inference.format))] for q in questions]
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    never = -1  # no EOS: every row runs every step

    def batch(rows):
        chunk = sorted(prompts[:rows], key=len, reverse=True)
        width = len(chunk[0])
        ids = torch.full((rows, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        return ids.to(model.device), mask.to(model.device), width

    variants = ["plain"] + (["fused"] if args.fused else []) + (["compiled"] if args.compiled else [])
    answers = {}
    for variant in variants:
        if variant == "fused":
            from tinymath.lib.speed import fuse_kernels

            fuse_kernels(model)
        ids, mask, _ = batch(min(args.equal, len(prompts)))
        answers[variant] = decode_mod.decode(model, ids, mask, 256, tok.eos_token_id, tok.pad_token_id,
                                             compiled=variant == "compiled").cpu()
        for rows in (int(r) for r in args.rows.split(",")):
            measure(model, tok, decode_mod, batch, rows, variant, args, sync, never)
    for other in variants[1:]:
        plain, fused = answers["plain"], answers[other]
        width = max(plain.shape[1], fused.shape[1])  # each stops when its own rows have all finished
        plain, fused = (torch.nn.functional.pad(t, (0, width - t.shape[1]), value=tok.pad_token_id)
                        for t in (plain, fused))
        same = sum(bool((a == b).all()) for a, b in zip(plain, fused))
        log(event=f"decode_{other}_equal", problems=args.equal, identical_greedy_rows=same)


def measure(model, tok, decode_mod, batch, rows, variant, args, sync, never):
    ids, mask, width = batch(rows)

    def timed(n, eos=never, graphs=None):
        sync()
        t = time.perf_counter()
        decode_mod.decode(model, ids, mask, n, eos, tok.pad_token_id, graphs=graphs, compiled=variant == "compiled")
        sync()
        return time.perf_counter() - t

    if variant == "compiled":  # one cache length (each length is a compile of its own)
        first = timed(256)
        prefill = timed(1)
        before = decode_mod.totals()
        per_step = (timed(256) - prefill) / 255 * 1000
        after = decode_mod.totals()
        natural = timed(256, eos=tok.eos_token_id)
        eager_step = None
    else:
        first = timed(8)  # warm-up (cuBLAS, the first capture)
        prefill = timed(1)
        short, long = timed(32), timed(32 + args.steps)
        per_step = (long - short) / args.steps * 1000
        natural = timed(256, eos=tok.eos_token_id)  # what eval does: rows stop at EOS
        before = decode_mod.totals()
        timed(16)
        after = decode_mod.totals()
        eager_short, eager_long = timed(8, graphs=False), timed(8 + 32, graphs=False)
        eager_step = round((eager_long - eager_short) / 32 * 1000, 2)
    captured = after["replayed_steps"] > before["replayed_steps"]
    record = dict(event="decode_steps", variant=variant, model=Path(args.model).name, rows=rows, width=width,
                  graph_captured=captured, failed_captures=after["failed_captures"],
                  first_decode_s=round(first, 2), prefill_s=round(prefill, 3), per_step_ms=round(per_step, 2), eager_step_ms=eager_step,
                  natural_stop_256_s=round(natural, 3))
    if args.profile and variant != "compiled":
        from torch.profiler import ProfilerActivity, profile

        cuda = model.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            decode_mod.decode(model, ids, mask, 24, never, tok.pad_token_id, graphs=False)
            sync()
        kernels = sorted(((e.key, (e.device_time_total if cuda else e.self_cpu_time_total) / 1000, e.count)
                          for e in prof.key_averages()), key=lambda k: -k[1])
        record["kernels_per_eager_step"] = round(sum(count for _, _, count in kernels) / 24, 1)
        record["top_kernels_24_eager_steps_ms"] = [(name[:70], round(ms, 3), count) for name, ms, count in kernels[:12]]
    log(**record)


if __name__ == "__main__":
    main()
