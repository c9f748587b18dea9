"""Scoring GSM8K answers: per-problem correctness under each evaluation protocol, the summary
numbers (accuracy, Wilson interval), self-consistency (maj@K, pass@K) and the paired comparison
of two evaluations (difference with its interval, McNemar's exact test).

`PROTOCOLS` is the one list of evaluation protocols: name -> how prompts are built and how
completions are scored. The CLI's ``--protocol`` choices come from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tinymath.base.prompts import build_prompt, encode_prompt, extract_answer, is_correct


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


def lm_eval_prompts(tokenizer, rows: list[dict], shots_from: list[dict], same_split: bool = False) -> list[list[int]]:
    """lm-eval's gsm8k prompt: 5 random train examples as ``Question: ...\nAnswer: ...`` blocks, then
    the question, plain text (no chat template, no BOS: lm-eval's default for causal HF models).

    The shots are the harness's own: one ``Random(1234)`` draws 5 train examples per problem, in
    problem order (its sampler; only when ``rows`` come from the shots' own split, ``same_split``,
    does it draw one more and drop the evaluated problem)."""
    import random

    rng = random.Random(LM_EVAL_SEED)
    prompts = []
    for row in rows:
        if same_split:  # the harness's eval_doc path: one more draw, the problem itself removed
            pool = [s for s in rng.sample(shots_from, min(len(shots_from), LM_EVAL_SHOTS + 1))
                    if s["question"] != row["question"]][:LM_EVAL_SHOTS]
        else:
            pool = rng.sample(shots_from, min(len(shots_from), LM_EVAL_SHOTS))
        context = "\n\n".join(f"Question: {s['question']}\nAnswer: {s['answer']}" for s in pool)
        text = (context + "\n\n" if context else "") + f"Question: {row['question']}\nAnswer:"
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def self_consistency(samples: list[list[str]], golds: list[str]) -> dict:
    """maj@K (majority answer), pass@K (any sample right) and single-sample accuracy."""
    from collections import Counter


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




def default_prompts(tokenizer, rows: list[dict], fmt: str, system_prompt: str | None, shots_from=None,
                    split: str = "test"):
    """Zero-shot, in the run's own prompt format: what the model was trained on."""
    return [encode_prompt(tokenizer, build_prompt(tokenizer, r["question"], fmt, system_prompt)) for r in rows]


def lm_eval_protocol_prompts(tokenizer, rows: list[dict], fmt: str, system_prompt: str | None, shots_from=None,
                             split: str = "test"):
    """lm-eval's gsm8k prompt (its own format: the run's format and system prompt do not apply);
    its shots come from the train split."""
    return lm_eval_prompts(tokenizer, rows, shots_from(), same_split=split == "train")


@dataclass(frozen=True)
class Protocol:
    """How one evaluation protocol asks and scores: ``prompts(tokenizer, rows, fmt, system_prompt,
    shots_from, split)`` (``shots_from``: a function giving the train rows, called only if needed),
    ``score(completions, golds)``, the stop strings that end a completion, and whether its prompts
    are its own text (``own_format``: the model's prompt format and system prompt do not apply)."""

    prompts: object
    score: object
    stop: tuple[str, ...] = ()
    own_format: bool = False


PROTOCOLS = {"default": Protocol(default_prompts, score),
             "lm-eval-gsm8k": Protocol(lm_eval_protocol_prompts, lm_eval_score, LM_EVAL_STOP, own_format=True)}


def paired_comparison(correct_a: list[bool], correct_b: list[bool]) -> dict:
    """Two evaluations of the same problems: both accuracies, the difference B - A with its 95%
    interval, McNemar's exact two-sided p-value, and the indices right in only one of them."""
    n = len(correct_a)
    x, y = [int(c) for c in correct_a], [int(c) for c in correct_b]
    a_only = [i for i in range(n) if x[i] and not y[i]]
    b_only = [i for i in range(n) if y[i] and not x[i]]
    diff = (sum(y) - sum(x)) / n if n else 0.0
    d = [yi - xi for xi, yi in zip(x, y)]
    variance = sum((di - diff) ** 2 for di in d) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(variance / n) if n else 0.0
    k, m = len(a_only), len(a_only) + len(b_only)
    # the discordant pairs are Binomial(m, 1/2) under "no difference"
    p_value = min(1.0, 2 * sum(math.comb(m, i) for i in range(0, min(k, m - k) + 1)) / 2 ** m) if m else 1.0
    return {"n": n, "accuracy_a": sum(x) / n if n else 0.0, "accuracy_b": sum(y) / n if n else 0.0,
            "difference": diff, "difference_ci95": [round(diff - half, 4), round(diff + half, 4)],
            "mcnemar_p": p_value, "only_a": a_only, "only_b": b_only}
