"""SFT speed against the anchors users would otherwise pick: `tinymath train`, TRL's ``SFTTrainer`` and
Unsloth, each in a fresh process of its own, on the same model, prepared tokens (tinymath's prepare-data
train split), LoRA (r 32, alpha 64, dropout 0, all seven Llama projections), NF4 base and lr 1e-3.

TRL runs its fastest configuration without flash-attn: sdpa, bf16, no gradient checkpointing,
``packing=True, packing_strategy="bfd"`` (padding-free rows of at most --max-length tokens), fed
tinymath's ``input_ids`` with ``completion_mask`` = its labels != -100. Unsloth runs ``FastLanguageModel``
(4-bit) and the same SFTTrainer set-up (its own packed path; gradient checkpointing off by default:
on an H200 20.5k tokens/s against 13.4k with its "unsloth" offloading, --unsloth-checkpointing unsloth).
Unsloth runs from its own site folder (trl 1.15, datasets 4.8) put first on PYTHONPATH; each worker's
output goes to $OUT/anchor_<system>.log. A step: tinymath's --batch-size (32)
examples, about 6.9k tokens; TRL/Unsloth one packed row of --max-length 8192, about 8.1k tokens
(8192 was TRL's fastest row size; the records give each one's tokens per step).

Per system: steady real tokens/s (non-padding tokens of the steps after --skip warm-up steps / their
seconds), the whole process's wall (start to exit), overhead_s = wall - all steps' tokens at the
steady rate (loading, quantizing, compiling, warm-up, saving), and est_full_run_s = overhead_s +
3 epochs of the train split at the steady rate; then one line of tinymath's ratios over each anchor.
A system that fails logs an error record and the others still run.

    python3 -m pip install --no-index --no-deps --target /tmp/unsloth_site .whl_unsloth/*.whl
    OUT=/tmp/out python benchmarks/anchors.py --model /tmp/tm_bench/tinyllama49k --data /tmp/prep_tiny \
        --steps 60 --unsloth-site /tmp/unsloth_site
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).parent.parent))  # tinymath from the checkout when not installed
from common import OUT, log  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_split(data: str) -> tuple[list[list[int]], list[list[int]]]:
    """input_ids and completion masks (1 where tinymath's labels count) of a prepare-data train split."""
    from tinymath.lib.gsm8k import load_prepared

    train = load_prepared(data)[0]["train"]
    ids, labels = train["input_ids"], train["labels"]
    return ids, [[int(t != -100) for t in row] for row in labels]


def sft_worker(args) -> dict:
    """TRL's SFTTrainer (or Unsloth's, with --worker unsloth): step times and real tokens per step."""
    unsloth = args.worker == "unsloth"
    if unsloth:  # before transformers/trl, as Unsloth requires
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        from unsloth import FastLanguageModel
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    ids, masks = train_split(args.data)
    dataset = Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    peft_config = None
    if unsloth:
        model, tokenizer = FastLanguageModel.from_pretrained(args.model, max_seq_length=args.max_length,
                                                             dtype=torch.bfloat16, load_in_4bit=True)
        checkpointing = {"false": False, "unsloth": "unsloth", "true": True}[args.unsloth_checkpointing]
        model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, lora_dropout=0, bias="none",
                                                 target_modules=PROJECTIONS, use_gradient_checkpointing=checkpointing,
                                                 random_state=42)
    else:
        quant = None if args.no_quant else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     quantization_config=quant, device_map={"": 0} if cuda else None)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        peft_config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=f"/tmp/anchor_{args.worker}", max_steps=args.steps, learning_rate=1e-3,
                       per_device_train_batch_size=args.rows, gradient_accumulation_steps=1,
                       packing=True, packing_strategy="bfd", max_length=args.max_length, completion_only_loss=True,
                       gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda, logging_steps=10**6,
                       save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
                       seed=42, data_seed=42)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    steps, tokens = [], [0]  # (seconds, real tokens) per step; tokens of the step in progress
    original = trainer.training_step

    def counted_step(model, inputs, *rest, **kw):
        mask = inputs.get("attention_mask")  # padding-free rows carry none: every token is real
        tokens[-1] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return original(model, inputs, *rest, **kw)

    trainer.training_step = counted_step
    first = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            first.append(time.time()) if not first else None
            self.started = time.time()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            steps.append((time.time() - self.started, tokens[-1]))
            tokens.append(0)

    trainer.add_callback(StepTimes())
    trainer.train()
    embeddings = trainer.model.get_input_embeddings().weight.shape[0]
    return {"step_s": [s for s, _ in steps], "step_tokens": [t for _, t in steps], "first_step_begin": first[0],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "embedding_rows": embeddings, "train_tokens": sum(map(len, ids))}


def tinymath_run(args, out: Path) -> tuple[list[str], callable]:
    """The `tinymath train` command, and a reader of its run folder into the workers' result shape."""
    cmd = [sys.executable, "-m", "tinymath", "train", "--model", args.model, "--data", args.data, "--out", str(out),
           "--max-steps", str(args.steps), "--overwrite", "--json"] + (["--quant", "none"] if args.no_quant else [])

    def read() -> dict:
        rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"tokens_per_s"' in line]
        run = json.loads((out / "run.json").read_text())
        result = run["result"]
        return {"step_s": [r["tokens"] / r["tokens_per_s"] for r in rows], "step_tokens": [r["tokens"] for r in rows],
                "peak_gib": result.get("peak_memory_gib"), "train_tokens": run["data_stats"]["train"]["tokens"],
                "batch_size": run["batch_size"], "compiled": result["compiled"], "cuda_graphs": result["cuda_graphs"],
                "micro_batch_tokens": result["micro_batch_tokens"], "run_setup_s": result["setup_seconds"],
                "fused_kernels": result.get("fused_kernels")}
    return cmd, read


def measure(name: str, args) -> dict:
    """Run one system in a fresh process; its figures, timed from process start to exit."""
    env = dict(os.environ)
    result_file = Path(f"/tmp/anchor_{name}.json")
    result_file.unlink(missing_ok=True)
    if name == "tinymath":
        cmd, read = tinymath_run(args, Path("/tmp/anchor_tinymath_run"))
    else:
        cmd = [sys.executable, __file__, "--worker", name, "--result", str(result_file)] + args.passthrough
        read = lambda: json.loads(result_file.read_text())  # noqa: E731
        if name == "unsloth":
            if not args.unsloth_site:
                raise SystemExit("--only unsloth needs --unsloth-site")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.unsloth_site, env.get("PYTHONPATH")]))
            env.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - started
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"anchor_{name}.log").write_text(proc.stdout)  # the worker's whole output
    if proc.returncode != 0:
        return {"system": name, "error": f"exit {proc.returncode}", "tail": proc.stdout[-3000:]}
    r = read()
    timed, timed_tokens = r["step_s"][args.skip:], r["step_tokens"][args.skip:]
    tps = sum(timed_tokens) / sum(timed)
    overhead = wall - sum(r["step_tokens"]) / tps
    record = {"system": name, "steps": len(r["step_s"]), "timed_steps": len(timed), "real_tokens_per_s": round(tps),
              "tokens_per_step": round(sum(r["step_tokens"]) / len(r["step_tokens"])),
              "wall_s": round(wall, 1), "overhead_s": round(overhead, 1),
              "first_step_s": round(r["step_s"][0], 2),
              "est_full_run_s": round(overhead + 3 * r["train_tokens"] / tps),
              **{k: v for k, v in r.items() if k not in ("step_s", "step_tokens", "first_step_begin")}}
    if "first_step_begin" in r:  # process start to the first step's beginning
        record["setup_s"] = round(r["first_step_begin"] - started, 1)
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a Llama folder (random weights will do)")
    parser.add_argument("--data", required=True, help="a tinymath prepare-data folder made for --model")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the steady rate")
    parser.add_argument("--only", default="tinymath,trl,unsloth")
    parser.add_argument("--max-length", type=int, default=8192, help="TRL/Unsloth: tokens per packed row")
    parser.add_argument("--rows", type=int, default=1, help="TRL/Unsloth: packed rows per step")
    parser.add_argument("--unsloth-site", help="folder with unsloth, unsloth_zoo, trl 1.15, datasets 4.8 and co.")
    parser.add_argument("--unsloth-checkpointing", default="false", choices=["false", "unsloth", "true"])
    parser.add_argument("--no-quant", action="store_true", help="bf16 base (CPU smoke tests only)")
    parser.add_argument("--worker", choices=["trl", "unsloth"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(sft_worker(args)))
        return
    args.passthrough = ["--model", args.model, "--data", args.data, "--steps", str(args.steps),
                        "--max-length", str(args.max_length), "--rows", str(args.rows),
                        "--unsloth-checkpointing", args.unsloth_checkpointing] + (["--no-quant"] * args.no_quant)
    results = {}
    for name in args.only.split(","):
        results[name] = measure(name, args)
        log(event="anchor", **results[name])
    tm = results.get("tinymath", {})
    ratios = {}
    for other in ("trl", "unsloth"):
        if "real_tokens_per_s" in tm and "real_tokens_per_s" in results.get(other, {}):
            ratios[f"tokens_per_s_vs_{other}"] = round(tm["real_tokens_per_s"] / results[other]["real_tokens_per_s"], 2)
            ratios[f"full_run_speedup_vs_{other}"] = round(results[other]["est_full_run_s"] / tm["est_full_run_s"], 2)
    log(event="anchor_ratios", steps=args.steps, skip=args.skip, max_length=args.max_length, rows=args.rows, **ratios)


if __name__ == "__main__":
    main()
