"""Gradient precision on the GPU: the LoRA gradients of the bf16 fast path, with eager and with
compiled decoder layers, each measured against an fp32 reference (same weights and batches; fp32
runs the packed attention example by example with SDPA). SmolLM2-135M architecture, random
weights, LoRA B made non-zero so that every LoRA weight has a gradient; three batches of 32 real
GSM8K train examples. Answers: does compiling change the math more than bf16 itself does?

    python benchmarks/grad_precision.py --tokenizer DIR --data GSM8K_DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import smollm2_with_data  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", default=".dev/smol_tok", help="folder with SmolLM2's tokenizer")
    parser.add_argument("--data", default=".dev", help="GSM8K folder (train.jsonl)")
    args = parser.parse_args()

    import torch

    from tinymath.base.config import TrainConfig
    from tinymath.lib.attention import register
    from tinymath.lib.batching import build_loss_model, pack_examples, to_device
    from tinymath.lib.gsm8k import load_training_data
    from tinymath.lib.lora import attach_lora, get_lora_config
    from tinymath.lib.model import load_base_model, load_tokenizer
    from tinymath.lib.speed import compile_layers

    model_dir, prep = smollm2_with_data(args.tokenizer, Path(args.data))
    config = TrainConfig(data=str(prep), model=str(model_dir))
    examples = load_training_data(config, load_tokenizer(str(model_dir)))[0]["train"]
    batches = [pack_examples(examples[i * 32:(i + 1) * 32]) for i in range(3)]
    torch.manual_seed(0)
    base = load_base_model(str(model_dir), "none", dtype=torch.float32, device="cuda")
    base.set_attn_implementation(register())
    model = attach_lora(base, get_lora_config(32, 64, 0.0, "all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    loss_model = build_loss_model(model)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def losses_and_grads(bf16: bool) -> list[tuple[float, dict]]:
        out = []
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_model(**to_device(batch, "cuda"))
            loss.backward()
            out.append((loss.item(), {name: p.grad.clone() for name, p in params.items()}))
            model.zero_grad(set_to_none=True)
        return out

    def report(label: str, runs, reference):
        for i, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(runs, reference)):
            rels = sorted(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads)
            cos = min(torch.nn.functional.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0).item()
                      for n in grads)
            print(f"{label} batch{i}: loss rel err {abs(loss - ref_loss) / ref_loss:.2e}; grad rel err median "
                  f"{rels[len(rels) // 2]:.2e} p90 {rels[int(len(rels) * .9)]:.2e} max {rels[-1]:.2e}; "
                  f"min cosine {cos:.5f}", flush=True)

    truth = losses_and_grads(bf16=False)
    report("eager bf16 vs fp32", losses_and_grads(bf16=True), truth)
    report("eager bf16 again vs fp32", losses_and_grads(bf16=True), truth)
    start = time.time()
    compile_layers(model)
    compiled = losses_and_grads(bf16=True)
    print(f"compiled in {time.time() - start:.0f}s")
    report("compiled bf16 vs fp32", compiled, truth)
    report("compiled bf16 again vs fp32", losses_and_grads(bf16=True), truth)


if __name__ == "__main__":
    main()
