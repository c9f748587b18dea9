"""Where a training step's time goes: `tinymath train` on the SmolLM2-135M architecture (random
weights, bf16 LoRA, `--quant none`) under the PyTorch profiler, after a short warm-up run in the
same process. Prints step times; writes the profiler's tables (by GPU time, CPU time, call count)
and a compressed Chrome trace to $OUT. `compile` or `eager` picks the decoder layers' mode.

    OUT=/tmp/out python benchmarks/profile_train.py compile --tokenizer DIR --data GSM8K_DIR
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, smollm2_with_data  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["compile", "eager"])
    parser.add_argument("--tokenizer", default=".dev/smol_tok", help="folder with SmolLM2's tokenizer")
    parser.add_argument("--data", default=".dev", help="GSM8K folder (train.jsonl)")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from tinymath import train
    from tinymath.base.config import TrainConfig

    smol, prep = smollm2_with_data(args.tokenizer, Path(args.data))

    def run(name: str, steps: int):
        out = f"/tmp/prof_{name}"
        summary = train(TrainConfig(data=str(prep), model=str(smol), out=out, max_steps=steps, overwrite=True,
                                    quant="none", compile=args.mode == "compile"))
        metrics = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
        print(name, "step ms", [round(m["tokens"] / m["tokens_per_s"] * 1000, 1) for m in metrics],
              "tok", [m["tokens"] for m in metrics][:5], summary["micro_batch_tokens"], flush=True)

    run("warm", 6)  # compiling happens here, not under the profiler
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.time()
        run("prof", 8)
        wall = time.time() - start
    averages = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in averages) / 1e3
    print(f"wall {wall:.2f}s, GPU self time total {gpu_ms:.1f} ms over 8 steps (+setup)")
    OUT.mkdir(parents=True, exist_ok=True)
    for name, key, rows in (("gpu", "self_device_time_total", 40), ("cpu", "self_cpu_time_total", 60),
                            ("calls", "count", 40)):
        (OUT / f"prof_{args.mode}_{name}.txt").write_text(averages.table(sort_by=key, row_limit=rows))
    trace = Path(f"/tmp/trace_{args.mode}.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(OUT / f"trace_{args.mode}.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)


if __name__ == "__main__":
    main()
