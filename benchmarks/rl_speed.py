"""GRPO speed against the anchor users would otherwise pick: TRL's ``GRPOTrainer`` on the same model,
questions, samples per question, questions per step and longest completion, with TRL's default
generation (transformers ``generate``; vLLM is not on the GPU image).

The model is a tinymath run's adapter merged into its base (what ``tinymath train --method grpo
--init-adapter RUN`` starts from), in bf16, with a fresh LoRA of the run's shape; the prompts are
tinymath's own prompt texts for the run's format; the reward is tinymath's strict check. Prints
questions/s over the timed steps (the first is left out: warm-up) and the split of time between
generation and update; tinymath's own figures come from its run's metrics.jsonl
(``--tinymath-run``, written by ``tinymath train --method grpo``).

    OUT=/tmp/out python benchmarks/rl_speed.py --adapter /tmp/rl/sft --data gsm8k --steps 6 \
        --tinymath-run /tmp/rl/rl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import log  # noqa: E402


def tinymath_figures(run: Path, expected: dict, skip: int = 1) -> dict:
    """Questions/s and the generation/update split of a tinymath GRPO run, from its metrics (the
    first ``skip`` steps, which compile, and validation steps left out); its settings must be
    ``expected``."""
    config = json.loads((run / "run.json").read_text())
    differ = {k: (config[k], v) for k, v in expected.items() if config[k] != v}
    if differ:
        raise SystemExit(f"{run} ran with other settings than TRL's (run, TRL): {differ}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    rows = [r for r in rows if "generation_s" in r and "val_accuracy" not in r][skip:]
    generation, update = sum(r["generation_s"] for r in rows), sum(r["update_s"] for r in rows)
    return {"steps": len(rows), "questions_per_s": round(len(rows) * config["batch_size"] / (generation + update), 3),
            "generation_s_per_step": round(generation / len(rows), 2), "update_s_per_step": round(update / len(rows), 2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", required=True, help="a tinymath SFT run folder (GRPO's starting point)")
    parser.add_argument("--data", required=True, help="GSM8K folder with train.jsonl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--questions", type=int, default=16, help="questions per step")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tinymath-run", help="a tinymath GRPO run with the same settings, to compare")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from tinymath.base.files import read_jsonl
    from tinymath.base.prompts import build_prompt, is_correct
    from tinymath.base.runs import load_run
    from tinymath.lib.generate import load_for_inference

    run = load_run(args.adapter)
    inference = load_for_inference(adapter=args.adapter)
    model, tokenizer = inference.model.to(torch.bfloat16), inference.tokenizer
    tokenizer.padding_side = "left"
    rows = read_jsonl(Path(args.data) / "train.jsonl")[: args.questions * (args.steps + 1)]
    prompts = [build_prompt(tokenizer, r["question"], inference.format, inference.system_prompt) for r in rows]
    dataset = Dataset.from_dict({"prompt": prompts, "gold": [r["answer"] for r in rows]})

    def strict_reward(completions, gold, **_):
        return [float(is_correct(c, g, strict=True)) for c, g in zip(completions, gold)]

    lora = run.config
    config = GRPOConfig(output_dir="/tmp/trl_grpo", per_device_train_batch_size=args.questions * args.samples,
                        gradient_accumulation_steps=1, num_generations=args.samples,
                        max_completion_length=args.max_new_tokens, temperature=args.temperature, learning_rate=1e-4,
                        beta=0.0, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[],
                        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                        gradient_checkpointing=False, shuffle_dataset=False, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[strict_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=lora["lora_r"], lora_alpha=lora["lora_alpha"], lora_dropout=0.0,
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    generation, steps = [], []
    original = trainer._generate_and_score_completions

    def timed_generation(inputs):
        started = time.time()
        out = original(inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        generation.append(time.time() - started)
        return out

    trainer._generate_and_score_completions = timed_generation
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.time()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps.append(time.time() - self.started)

    trainer.add_callback(StepTimes())
    trainer.train()
    timed, gen = steps[1:], generation[1:len(steps)]
    trl = {"steps": len(timed), "questions_per_s": round(len(timed) * args.questions / sum(timed), 3),
           "generation_s_per_step": round(sum(gen) / len(gen), 2),
           "update_s_per_step": round((sum(timed) - sum(gen)) / len(timed), 2)}
    record = {"event": "rl_speed", "questions": args.questions, "samples": args.samples,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "trl": trl}
    if args.tinymath_run:
        record["tinymath"] = tinymath_figures(Path(args.tinymath_run), {
            "batch_size": args.questions, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature})
        record["ratio"] = round(record["tinymath"]["questions_per_s"] / trl["questions_per_s"], 2)
    log(**record)


if __name__ == "__main__":
    main()
