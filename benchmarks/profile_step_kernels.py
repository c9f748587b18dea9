"""Where the GPU time of an uncompiled training step goes, by kernel: `tinymath train` (defaults,
NF4) on a prepared model under the PyTorch profiler, CUDA kernels only, after a short warm-up run
in the same process. The steps run eagerly (no CUDA graphs): a graph replays the same kernels,
so their summed time is what a replayed step costs the GPU. Prints the step times and the table by
GPU time; writes it to $OUT/prof_step_kernels.txt.

    OUT=/tmp/out python benchmarks/profile_step_kernels.py --model /tmp/tm_bench/tinyllama49k --data /tmp/prep_tiny
"""

from __future__ import annotations

import argparse
import json
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/tmp/tm_bench/tinyllama49k")
    parser.add_argument("--data", default="/tmp/prep_tiny", help="a prepare-data folder made for --model")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from tinymath import train
    from tinymath.base.config import TrainConfig

    def run(name: str, steps: int):
        out = f"/tmp/profile_step_{name}"
        train(TrainConfig(data=args.data, model=args.model, out=out, max_steps=steps, overwrite=True, compile=False,
                          cuda_graphs=False))
        metrics = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
        print(name, "step ms", [round(m["tokens"] / m["tokens_per_s"] * 1000) for m in metrics if "tokens_per_s" in m],
              flush=True)

    run("warm", 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run("profiled", args.steps)
    averages = prof.key_averages()
    total = sum(e.self_device_time_total for e in averages) / 1e3
    print(f"GPU kernel time {total:.1f} ms over {args.steps} steps and the run's set-up")
    table = averages.table(sort_by="self_device_time_total", row_limit=60)
    out = os.environ.get("OUT", "/tmp")
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/prof_step_kernels.txt", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
