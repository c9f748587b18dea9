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
from tinymath.errors import TinymathError, raise_if_problems


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
    return summarize(rows, ACCURACY_STRICT_AND_INVALID)


ACCURACY_STRICT_AND_INVALID = {"accuracy_strict": lambda r: r["correct_strict"],
                               "invalid_rate": lambda r: r["extracted"] is None}


def summarize(rows: list[dict], means: dict) -> dict:
    """Rows plus their summary: accuracy (share of ``correct``) with its Wilson 95% interval, and
    the mean of each ``means`` function over the rows."""
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    low, high = wilson_interval(correct, n)
    summary = {"accuracy": correct / n if n else 0.0}
    summary.update({key: sum(f(r) for r in rows) / n if n else 0.0 for key, f in means.items()})
    summary.update(n=n, correct=correct, ci95=[round(low, 4), round(high, 4)])
    return {"rows": rows, "summary": summary}


PROTOCOLS = ("default", "lm-eval-gsm8k")
LM_EVAL_STOP = ("Question:", "</s>", "<|im_end|>")
LM_EVAL_SHOTS = 5
LM_EVAL_SEED = 1234


def _lm_eval_normalize(text: str) -> str:
    """lm-eval gsm8k's exact_match preprocessing (regexes_to_ignore, ignore_case)."""
    import re

    for pattern in (",", r"\$", r"(?s).*#### ", r"\.$"):
        text = re.sub(pattern, "", text)
    return text.strip().lower()


def lm_eval_score(completions: list[str], golds: list[str]) -> dict:
    """lm-eval's gsm8k filters: strict-match (first ``#### N``) and flexible-extract (last number)."""
    import re

    strict_re = re.compile(r"#### (\-?[0-9\.\,]+)")
    flexible_re = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
    rows = []
    for completion, gold in zip(completions, golds):
        target = _lm_eval_normalize(gold)
        strict = strict_re.findall(completion)
        strict = strict[0] if strict else "[invalid]"
        flexible = flexible_re.findall(completion)
        flexible = next((g for g in flexible[-1] if g), "[invalid]") if flexible else "[invalid]"
        rows.append({"extracted": _lm_eval_normalize(flexible) if flexible != "[invalid]" else None,
                     "correct": _lm_eval_normalize(flexible) == target,
                     "correct_strict": _lm_eval_normalize(strict) == target})
    return summarize(rows, ACCURACY_STRICT_AND_INVALID)


def lm_eval_prompts(tokenizer, rows: list[dict], shots_from: list[dict]) -> list[list[int]]:
    """lm-eval's gsm8k prompt: 5 random train examples as ``Question: ...\nAnswer: ...`` blocks, then
    the question, plain text (no chat template, no BOS: lm-eval's default for causal HF models)."""
    import random

    rng = random.Random(LM_EVAL_SEED)
    prompts = []
    for row in rows:
        pool = [s for s in rng.sample(shots_from, min(len(shots_from), LM_EVAL_SHOTS + 1))
                if s["question"] != row["question"]][:LM_EVAL_SHOTS]
        context = "\n\n".join(f"Question: {s['question']}\nAnswer: {s['answer']}" for s in pool)
        text = (context + "\n\n" if context else "") + f"Question: {row['question']}\nAnswer:"
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def self_consistency(samples: list[list[str]], golds: list[str]) -> dict:
    """maj@K (majority answer), pass@K (any sample right) and single-sample accuracy."""
    from collections import Counter

    from tinymath.prompts import extract_answer, is_correct

    rows = []
    for group, gold in zip(samples, golds):
        answers = [extract_answer(s) for s in group]
        counted = Counter(a for a in answers if a is not None)
        majority = counted.most_common(1)[0][0] if counted else None
        rows.append({"majority": majority, "votes": counted.get(majority, 0),
                     "correct": majority is not None and is_correct(f"#### {majority}", gold),
                     "any_correct": any(is_correct(s, gold) for s in group),
                     "sample_accuracy": sum(is_correct(s, gold) for s in group) / len(group)})
    return summarize(rows, {"maj_at_k": lambda r: r["correct"], "pass_at_k": lambda r: r["any_correct"],
                            "single_sample_accuracy": lambda r: r["sample_accuracy"]})


def evaluate(model: str | None = None, adapter: str | None = None, data: str = DEFAULT_DATA,
             split: str = "test", limit: int | None = None, out: str | Path | None = None,
             batch_size: int | None = None, max_new_tokens: int = 256, quant: str = "none", fmt: str | None = None,
             system_prompt: str | None = None, merge_base: str = "dequantized", overwrite: bool = False,
             trust_remote_code: bool = False, show_progress: bool = False, calculator: bool = False,
             samples: int = 1, temperature: float | None = None, seed: int = 0,
             protocol: str = "default") -> dict:
    """Evaluate on ``split`` of ``data``; returns the summary (also written to ``OUT/summary.json``).

    ``protocol="lm-eval-gsm8k"`` reproduces lm-eval's gsm8k task (5-shot, plain text, its stop
    strings and filters); ``samples=K`` with ``temperature>0`` scores the majority answer (maj@K).
    """
    import torch

    from tinymath.data import read_gsm8k
    from tinymath.files import atomic_output_dir, check_output_dir, write_json
    from tinymath.generate import GenerationSettings, generate_across_processes, load_for_inference, process_share
    from tinymath.model import process_state
    from tinymath.progress import progress_bar
    from tinymath.prompts import build_prompt, encode_prompt

    problems = []
    if limit is not None and limit <= 0:
        problems.append(f"--limit {limit} must be a positive number of problems")
    if protocol not in PROTOCOLS:
        problems.append(f"--protocol {protocol}: use one of {', '.join(PROTOCOLS)}")
    if samples < 1:
        problems.append(f"--samples {samples} must be at least 1")
    if samples > 1 and not temperature:
        problems.append(f"--samples {samples} needs sampling: add --temperature, e.g. 0.7")
    raise_if_problems(problems)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature or 0.0,
                                  calculator=calculator, stop=LM_EVAL_STOP if protocol == "lm-eval-gsm8k" else ())
    settings.validate()
    if out is not None:
        check_output_dir(out, overwrite, marker="summary.json")
    if adapter is not None:  # a wrong run folder is reported before any data is fetched
        from tinymath.lora import load_run

        load_run(adapter)
    rows = read_gsm8k(data, split, limit)
    inference = load_for_inference(model, adapter, quant, fmt, system_prompt, merge_base, trust_remote_code)
    tokenizer = inference.tokenizer
    if protocol == "lm-eval-gsm8k":
        prompts = lm_eval_prompts(tokenizer, rows, read_gsm8k(data, "train"))
    else:
        prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, r["question"], inference.format,
                                                         inference.system_prompt)) for r in rows]

    state = process_state()
    flat = [p for p in prompts for _ in range(samples)]
    torch.manual_seed(seed + state.process_index)
    start = time.time()
    share = len(process_share(len(flat)))
    with progress_bar("evaluating", share, show_progress and state.is_main_process) as update:
        generated = generate_across_processes(inference, flat, settings, update)
    seconds = time.time() - start

    completions = [text for text, _ in generated]
    golds = [r["answer"] for r in rows]
    if samples > 1:
        grouped = [completions[i * samples:(i + 1) * samples] for i in range(len(rows))]
        scored = self_consistency(grouped, golds)
        outputs = [{"completions": g} for g in grouped]
    else:
        scored = (lm_eval_score if protocol == "lm-eval-gsm8k" else score)(completions, golds)
        outputs = [{"completion": c} for c in completions]
    tokens = sum(n for _, n in generated)
    summary = dict(scored["summary"])
    summary.update(
        tokens_generated=tokens, generation_seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1) if seconds else None,
        settings={"data": data, "split": split, "limit": limit, "format": inference.format,
                  "system_prompt": inference.system_prompt, "batch_size": batch_size,
                  "max_new_tokens": max_new_tokens, "protocol": protocol, "calculator": calculator,
                  "samples": samples, "temperature": temperature, "seed": seed,
                  "processes": state.num_processes, **inference.source},
    )
    if out is not None and state.is_main_process:
        with atomic_output_dir(out) as tmp:
            with open(tmp / "predictions.jsonl", "w") as f:
                for row, output, s in zip(rows, outputs, scored["rows"]):
                    f.write(json.dumps({"question": row["question"], "gold": row["answer"], **output, **s}) + "\n")
            write_json(tmp / "summary.json", summary)
    return summary


def compare(first: str | Path, second: str | Path) -> dict:
    """Paired comparison of two eval outputs on the same problems: both accuracies, the difference
    with a 95% interval, McNemar's exact test, and the problems that flipped each way."""
    from math import comb, sqrt

    from tinymath.files import read_json

    runs = []
    for folder in (Path(first), Path(second)):
        path = folder / "predictions.jsonl"
        if not path.is_file() or not (folder / "summary.json").is_file():
            raise TinymathError(f"--compare {folder}: not a `tinymath eval --out` folder (no predictions.jsonl)")
        runs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    a, b = runs
    if [r["question"] for r in a] != [r["question"] for r in b]:
        raise TinymathError(f"--compare: {first} and {second} scored different problems (or in another order); "
                            "evaluate both on the same --data, --split and --limit")
    n = len(a)
    x = [int(r["correct"]) for r in a]
    y = [int(r["correct"]) for r in b]
    a_only = [i for i in range(n) if x[i] and not y[i]]
    b_only = [i for i in range(n) if y[i] and not x[i]]
    diff = (sum(y) - sum(x)) / n
    d = [yi - xi for xi, yi in zip(x, y)]
    variance = sum((di - diff) ** 2 for di in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * sqrt(variance / n) if n else 0.0
    k, m = len(a_only), len(a_only) + len(b_only)
    # exact two-sided McNemar: the discordant pairs are Binomial(m, 1/2) under "no difference"
    p_value = min(1.0, 2 * sum(comb(m, i) for i in range(0, min(k, m - k) + 1)) / 2 ** m) if m else 1.0
    return {"n": n, "accuracy_a": sum(x) / n, "accuracy_b": sum(y) / n, "difference": diff,
            "difference_ci95": [round(diff - half, 4), round(diff + half, 4)], "mcnemar_p": p_value,
            "only_a_correct": [a[i]["question"] for i in a_only], "only_b_correct": [b[i]["question"] for i in b_only],
            "a": str(first), "b": str(second), "summary_a": read_json(Path(first) / "summary.json").get("settings"),
            "summary_b": read_json(Path(second) / "summary.json").get("settings")}
