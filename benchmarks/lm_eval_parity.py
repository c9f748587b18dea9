"""tinymath's `--protocol lm-eval-gsm8k` against lm-evaluation-harness itself, problem by problem:
how many prompts (tinymath's, rebuilt from the same data, against the harness's logged ones) and
completions are identical, and the paired scores (`tinymath eval --compare`).

    tinymath eval --model M --data gsm8k --split test --limit N --protocol lm-eval-gsm8k --out ours
    tinymath eval --backend lm-eval --model M --data gsm8k --limit N --out harness
    python benchmarks/lm_eval_parity.py --data gsm8k --ours ours --harness harness
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class _Text:
    """A stand-in tokenizer: the prompt text itself instead of its token ids."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": text})()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="GSM8K folder with train.jsonl and test.jsonl")
    parser.add_argument("--ours", required=True, help="`tinymath eval --protocol lm-eval-gsm8k --out` folder")
    parser.add_argument("--harness", required=True, help="`tinymath eval --backend lm-eval --out` folder")
    args = parser.parse_args()

    from tinymath.base.files import read_jsonl
    from tinymath.lib.gsm8k import read_gsm8k
    from tinymath.lib.scoring import lm_eval_prompts, paired_comparison

    ours = read_jsonl(Path(args.ours) / "predictions.jsonl")
    theirs = read_jsonl(Path(args.harness) / "predictions.jsonl")
    logged = {}  # the harness logs a document once per filter (strict, flexible): one is enough
    for sample in read_jsonl(Path(args.harness) / "samples.jsonl"):
        logged.setdefault(sample["doc_id"], sample)
    samples = [logged[i] for i in sorted(logged)]
    rows = read_gsm8k(args.data, "test", len(ours))
    prompts = lm_eval_prompts(_Text(), rows, read_gsm8k(args.data, "train"))
    same_prompt = sum(p == s["arguments"][0][0] for p, s in zip(prompts, samples))
    same_completion = sum(a["completion"] == b["completion"] for a, b in zip(ours, theirs))
    paired = paired_comparison([r["correct_strict"] for r in ours], [r["correct_strict"] for r in theirs])
    print(json.dumps({"problems": len(ours), "identical_prompts": same_prompt,
                      "identical_completions": same_completion,
                      "strict_ours": paired["accuracy_a"], "strict_harness": paired["accuracy_b"],
                      "flexible_ours": sum(r["correct"] for r in ours) / len(ours),
                      "flexible_harness": sum(r["correct"] for r in theirs) / len(theirs),
                      "discordant_strict": len(paired["only_a"]) + len(paired["only_b"])}))


if __name__ == "__main__":
    main()
