"""eval: GSM8K accuracy of a model or a training run, with the shared answer contract.

Writes ``predictions.jsonl`` (question, gold, completion, extracted, correct) and ``summary.json``
(accuracy flexible and strict, n, invalid-answer rate, Wilson 95% interval, tokens, time, settings).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tinymath.data import DEFAULT_DATA
from tinymath.errors import TinymathError


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sane at 0 and at small n, unlike the normal one)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def score(completions: list[str], golds: list[str]) -> dict:
    """Per-problem extraction and correctness, and the summary numbers."""
    from tinymath.prompts import extract_answer, is_correct

    rows = []
    for completion, gold in zip(completions, golds):
        rows.append({"extracted": extract_answer(completion), "correct": is_correct(completion, gold),
                     "correct_strict": is_correct(completion, gold, strict=True)})
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, n)
    return {
        "rows": rows,
        "summary": {
            "accuracy": correct / n if n else 0.0,
            "accuracy_strict": sum(r["correct_strict"] for r in rows) / n if n else 0.0,
            "n": n,
            "correct": correct,
            "invalid_rate": sum(r["extracted"] is None for r in rows) / n if n else 0.0,
            "ci95": [round(low, 4), round(high, 4)],
        },
    }


def evaluate(model: str | None = None, adapter: str | None = None, data: str = DEFAULT_DATA,
             split: str = "test", limit: int | None = None, out: str | Path | None = None,
             batch_size: int | None = None, max_new_tokens: int = 256, quant: str = "none", fmt: str | None = None,
             system_prompt: str | None = None, merge_base: str = "dequantized", overwrite: bool = False,
             trust_remote_code: bool = False, show_progress: bool = False) -> dict:
    """Evaluate on ``split`` of ``data``; returns the summary (also written to ``OUT/summary.json``)."""
    from tinymath.data import read_gsm8k
    from tinymath.files import atomic_output_dir, check_output_dir, write_json
    from tinymath.generate import GenerationSettings, generate_batch, load_for_inference
    from tinymath.progress import progress_bar
    from tinymath.prompts import build_prompt, encode_prompt

    if limit is not None and limit <= 0:
        raise TinymathError(f"--limit {limit} must be a positive number of problems")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    settings.validate()
    if out is not None:
        check_output_dir(out, overwrite, marker="summary.json")
    rows = read_gsm8k(data, split, limit)
    inference = load_for_inference(model, adapter, quant, fmt, system_prompt, merge_base, trust_remote_code)
    tokenizer = inference.tokenizer
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, r["question"], inference.format,
                                                     inference.system_prompt)) for r in rows]

    start = time.time()
    with progress_bar("evaluating", len(rows), show_progress) as update:
        generated = generate_batch(inference, prompts, settings, update)
    seconds = time.time() - start

    completions = [text for text, _ in generated]
    scored = score(completions, [r["answer"] for r in rows])
    tokens = sum(n for _, n in generated)
    summary = dict(scored["summary"])
    summary.update(
        tokens_generated=tokens, generation_seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1) if seconds else None,
        settings={"data": data, "split": split, "limit": limit, "format": inference.format,
                  "system_prompt": inference.system_prompt, "batch_size": batch_size,
                  "max_new_tokens": max_new_tokens, **inference.source},
    )
    if out is not None:
        with atomic_output_dir(out) as tmp:
            with open(tmp / "predictions.jsonl", "w") as f:
                for row, completion, s in zip(rows, completions, scored["rows"]):
                    f.write(json.dumps({"question": row["question"], "gold": row["answer"],
                                        "completion": completion, **s}) + "\n")
            write_json(tmp / "summary.json", summary)
    return summary
