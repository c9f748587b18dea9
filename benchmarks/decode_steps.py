"""Where a decode step's time goes: tinymath's decode loop on the real SmolLM2 (or any model) at
several batch sizes on one GPU. For each row count: whether the step graph was captured, the
prefill, the graph replay alone, the whole step (graph plus the sampling kernels around it), and
the GPU kernels of 24 eager steps (and their prefill) by total time. Answers "does a step scale with the rows?",
which decides how evaluation splits over several GPUs.

    OUT=/tmp/out python benchmarks/decode_steps.py --model SmolLM2.gguf --data gsm8k_dir [--rows 1319,660,330]
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
    args = parser.parse_args()

    import torch

    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib import decode as decode_mod
    from tinymath.lib.generate import load_for_inference

    inference = load_for_inference(model=args.model)
    model, tok = inference.model, inference.tokenizer
    questions = [json.loads(line)["question"] for line in open(Path(args.data) / "test.jsonl")]
    prompts = [encode_prompt(tok, build_prompt(tok, q, inference.format)) for q in questions]
    steps_seen = []
    original_init = decode_mod._Step.__init__

    def keep(self, *a, **k):
        original_init(self, *a, **k)
        steps_seen.append(self)

    decode_mod._Step.__init__ = keep
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    never = -1  # no EOS: every row runs every step
    for rows in (int(r) for r in args.rows.split(",")):
        chunk = sorted(prompts[:rows], key=len, reverse=True)
        width = len(chunk[0])
        ids = torch.full((rows, width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        timings = {}
        for n in (8, args.steps):
            sync()
            t = time.perf_counter()
            decode_mod.decode(model, ids, mask, n, never, tok.pad_token_id)
            sync()
            timings[n] = time.perf_counter() - t
        step = steps_seen[-1]
        per_step_ms = (timings[args.steps] - timings[8]) / (args.steps - 8) * 1000
        replay_ms = None
        if step.graph is not None:
            sync()
            t = time.perf_counter()
            for _ in range(50):
                step.graph.replay()
            sync()
            replay_ms = (time.perf_counter() - t) / 50 * 1000
        eager = {}
        for n in (8, 24):  # the same steps without graphs
            sync()
            t = time.perf_counter()
            decode_mod.decode(model, ids, mask, n, never, tok.pad_token_id, graphs=False)
            sync()
            eager[n] = time.perf_counter() - t
        eager_ms = (eager[24] - eager[8]) / 16 * 1000
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            decode_mod.decode(model, ids, mask, 24, never, tok.pad_token_id, graphs=False)
            sync()
        kernels = sorted(((e.key, (e.device_time_total if cuda else e.self_cpu_time_total) / 1000, e.count) for e in prof.key_averages()),
                         key=lambda k: -k[1])
        gpu_ms = sum(k[1] for k in kernels) / 24  # prefill included
        log(event="decode_steps", model=Path(args.model).name, rows=rows, width=width,
            cache_len=width + args.steps, graph_captured=step.graph is not None, capture_failed=step.failed,
            whole_decode_s={str(k): round(v, 3) for k, v in timings.items()}, per_step_ms=round(per_step_ms, 2),
            graph_replay_ms=replay_ms and round(replay_ms, 2), eager_step_ms=round(eager_ms, 2),
            kernel_ms_per_step_with_prefill=round(gpu_ms, 2),
            top_kernels=[(name[:70], round(ms, 3), count) for name, ms, count in kernels[:12]])


if __name__ == "__main__":
    main()
