"""Where a training step's time goes: `tinymath train` on the SmolLM2-135M architecture (random
weights, bf16 LoRA, `--quant none`) under the PyTorch profiler, after a short warm-up run in the
same process. Writes step times to stdout and the profiler's tables (by GPU time, CPU time, call
count) to $OUT; `compile` or `eager` picks the decoder layers' mode.

    OUT=/tmp/out python benchmarks/profile_train.py compile   # after train_speed.py --only none
"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
from common import SMOLLM2, random_model
from tinymath.data import prepare_data
from tinymath.train import TrainConfig, train
OUT = Path(os.environ["OUT"])
work = Path("/tmp/tm_bench"); work.mkdir(exist_ok=True)
smol = random_model(work / "smollm2_rand", SMOLLM2, ".dev/smol_tok")
prep = work / "prep"
if not prep.exists():
    prepare_data(data=".dev", model=str(smol), out=prep)
compile_ = sys.argv[1] == "compile"
def run(name, steps, **kw):
    cfg = TrainConfig(data=str(prep), model=str(smol), out=f"/tmp/prof_{name}", max_steps=steps, overwrite=True,
                      quant="none", compile=compile_, **kw)
    s = train(cfg)
    m = [json.loads(l) for l in open(f"/tmp/prof_{name}/metrics.jsonl")]
    print(name, "step ms", [round(x["tokens"] / x["tokens_per_s"] * 1000, 1) for x in m], "tok", [x["tokens"] for x in m][:5], s["micro_batch_tokens"], flush=True)
run("warm", 6)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t = time.time(); run("prof", 8); wall = time.time() - t
ka = prof.key_averages()
gpu = sum(e.self_device_time_total for e in ka) / 1e3
print(f"wall {wall:.2f}s, GPU self time total {gpu:.1f} ms over 8 steps (+setup)")
tag = sys.argv[1]
(OUT / f"prof_{tag}_gpu.txt").write_text(ka.table(sort_by="self_device_time_total", row_limit=40))
(OUT / f"prof_{tag}_cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=60))
(OUT / f"prof_{tag}_calls.txt").write_text(ka.table(sort_by="count", row_limit=40))
prof.export_chrome_trace(f"/tmp/trace_{tag}.json")
os.system(f"gzip -c /tmp/trace_{tag}.json > {OUT}/trace_{tag}.json.gz")
