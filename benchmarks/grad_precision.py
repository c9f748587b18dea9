"""Gradient precision on the GPU: the LoRA gradients of the bf16 fast path, with eager and with
compiled decoder layers, each measured against an fp32 reference (same weights and batches; fp32
runs the packed attention example by example with SDPA). SmolLM2-135M architecture, random
weights, LoRA B made non-zero so that every LoRA weight has a gradient; three batches of 32 real
GSM8K train examples. Answers: does compiling change the math more than bf16 itself does?

    python benchmarks/train_speed.py --tokenizer DIR --train gsm8k/train.jsonl --only none  # builds /tmp/tm_bench
    python benchmarks/grad_precision.py
"""
import sys, time
sys.path.insert(0, "benchmarks")
import torch
from pathlib import Path
from tinymath.attention import register
from tinymath.lora import attach_lora, get_lora_config
from tinymath.model import load_base_model, load_tokenizer
from tinymath.train import TrainConfig, build_loss_model, compile_layers, load_training_data, pack_examples, to_device
work = Path("/tmp/tm_bench")
model_dir, prep = work / "smollm2_rand", work / "prep"
ex = load_training_data(TrainConfig(data=str(prep), model=str(model_dir)), load_tokenizer(str(model_dir)))[0]["train"]
chunks = [ex[i * 32:(i + 1) * 32] for i in range(3)]
torch.manual_seed(0)
base = load_base_model(str(model_dir), "none", dtype=torch.float32, device="cuda")
base.set_attn_implementation(register())
model = attach_lora(base, get_lora_config(32, 64, 0.0, "all-linear"))
for n, p in model.named_parameters():
    if "lora_B" in n:
        torch.nn.init.normal_(p, std=0.02)
loss_model = build_loss_model(model)
params = {n: p for n, p in model.named_parameters() if p.requires_grad}
def run(bf16):
    out = []
    for c in chunks:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_model(**to_device(pack_examples(c), "cuda"))
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in params.items()}))
        model.zero_grad(set_to_none=True)
    return out
def err(name, a, ref):
    for i, ((la, ga), (lr, gr)) in enumerate(zip(a, ref)):
        rels = sorted(((ga[n] - gr[n]).norm() / gr[n].norm()).item() for n in ga)
        cos = min(torch.nn.functional.cosine_similarity(ga[n].flatten(), gr[n].flatten(), dim=0).item() for n in ga)
        print(f"{name} batch{i}: loss rel err {abs(la-lr)/lr:.2e}; grad rel err median {rels[len(rels)//2]:.2e} "
              f"p90 {rels[int(len(rels)*.9)]:.2e} max {rels[-1]:.2e}; min cosine {cos:.5f}", flush=True)
truth = run(False)
err("eager bf16 vs fp32", run(True), truth)
err("eager bf16 again vs fp32", run(True), truth)
t = time.time(); compile_layers(model); comp = run(True); print(f"compiled in {time.time()-t:.0f}s")
err("compiled bf16 vs fp32", comp, truth)
err("compiled bf16 again vs fp32", run(True), truth)
