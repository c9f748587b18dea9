"""What compiling the decoder layers costs in a fresh process, the first time and again with
Inductor's caches warm: trains a few compiled steps of the TinyLlama architecture and prints the
run's compile seconds, the first step, PyTorch's compile-time breakdown and its cache counters
(FX-graph and AOTAutograd hits and misses). Run it twice with the same TINYMATH_CACHE.

    TINYMATH_CACHE=/tmp/tmc python benchmarks/compile_cost.py cold 16 --model M --data PREP
    TINYMATH_CACHE=/tmp/tmc python benchmarks/compile_cost.py warm 16 --model M --data PREP
"""

from __future__ import annotations

import argparse
import json
import time

START = time.time()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("label")
    parser.add_argument("steps", type=int)
    parser.add_argument("--model", default="/tmp/tm_bench/tinyllama49k")
    parser.add_argument("--data", default="/tmp/prep_tiny")
    args = parser.parse_args()

    import torch._dynamo.utils as dynamo_utils

    from tinymath import train
    from tinymath.base.config import TrainConfig

    out = f"/tmp/compile_cost_{args.label}"
    summary = train(TrainConfig(data=args.data, model=args.model, out=out, max_steps=args.steps, overwrite=True,
                                compile=True))
    print("LABEL", args.label, "wall", round(time.time() - START, 1))
    print({k: summary.get(k) for k in ("compile_seconds", "graph_capture_seconds", "first_step_seconds",
                                       "train_seconds", "real_tokens_per_s", "setup_seconds", "compiled",
                                       "cuda_graphs")})
    print(dynamo_utils.compile_times())
    print({k: dict(v) for k, v in dynamo_utils.counters.items() if v})
    metrics = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    print("step ms", [round(m["tokens"] / m["tokens_per_s"] * 1000) for m in metrics if "tokens_per_s" in m])


if __name__ == "__main__":
    main()
