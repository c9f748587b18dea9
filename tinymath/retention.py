"""Retention: how far fine-tuning moved a model away from its base on general, non-math prompts.

The package ships ~100 everyday prompts (writing, facts, advice, short code, summaries,
translation). The base model answers them greedily once (cached per base model); then both models
are scored teacher-forced on those base replies:

- ``kl``: mean per-token KL(base || tuned) in nats: how differently the two predict the same text;
- ``ppl_ratio``: perplexity of the base replies under the tuned model / under the base;
- ``top1_agreement``: how often both models' most likely next token is the same.

A model compared with itself gives 0, 1.0 and 100%. For a training run the verdict is on what
fine-tuning changed: the adapter switched on vs off over the base weights it was trained against
(for QLoRA, the NF4-dequantized base). ``total_vs_original_base`` also counts what 4-bit
quantization of the base changed, which on a 135M model is most of it (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

from tinymath.errors import TinymathError

# Thresholds (see BENCHMARKS.md: measured on SmolLM2 after the default recipe and after a 10x-lr run)
KEPT_KL = 0.10        # nats/token: below this the tuned model predicts general text almost like its base
DRIFTED_KL = 0.50     # above this, or a perplexity ratio above DRIFTED_PPL, general ability is visibly hurt
DRIFTED_PPL = 1.5
SIDE_BY_SIDE = 6
RETENTION_SLICE = 12  # prompts scored by `tinymath train --retention-every N`


def retention_prompts() -> list[str]:
    """The general-ability prompts shipped with tinymath."""
    text = files("tinymath").joinpath("retention_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def verdict(kl: float, ppl_ratio: float) -> str:
    if kl < KEPT_KL and ppl_ratio < 1.2:
        return "kept"
    if kl < DRIFTED_KL and ppl_ratio < DRIFTED_PPL:
        return "mild drift"
    return "drifted"


def _encode(tokenizer, prompt: str, fmt: str, system_prompt: str | None) -> list[int]:
    from tinymath.prompts import build_prompt, encode_prompt

    return encode_prompt(tokenizer, build_prompt(tokenizer, prompt, fmt, system_prompt))


def base_replies(base, tokenizer, prompts: list[str], fmt: str, system_prompt: str | None, max_new_tokens: int,
                 cache_key: str | None = None) -> list[list[int]]:
    """Greedy reply token ids of the base model (EOS included when produced), cached on disk."""
    from tinymath.model import cache_dir

    cache = None
    if cache_key:
        digest = hashlib.sha256(json.dumps([cache_key, prompts, fmt, system_prompt, max_new_tokens]).encode()).hexdigest()
        cache = cache_dir() / "retention" / f"{digest[:24]}.json"
        if cache.is_file():
            try:
                return json.loads(cache.read_text())
            except json.JSONDecodeError:
                pass  # a damaged cache entry is simply made again
    from tinymath.generate import GenerationSettings, InferenceModel, generate_ids

    inference = InferenceModel(base, tokenizer, fmt, system_prompt, {})
    encoded = [_encode(tokenizer, p, fmt, system_prompt) for p in prompts]
    replies = []
    for ids in generate_ids(inference, encoded, GenerationSettings(max_new_tokens=max_new_tokens, static_cache=False)):
        reply = ids.tolist()
        if tokenizer.eos_token_id in reply:
            reply = reply[:reply.index(tokenizer.eos_token_id) + 1]
        replies.append(reply)
    if cache is not None:
        from tinymath.files import write_json

        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, replies)
    return replies


def drift(base, tuned, tokenizer, prompts: list[str], replies: list[list[int]], fmt: str,
          system_prompt: str | None, batch_size: int = 8) -> dict:
    """Teacher-forced comparison of ``tuned`` against ``base`` (two models) on the base's own replies."""
    return _drift(lambda ids, mask: _logits(base, ids, mask), lambda ids, mask: _logits(tuned, ids, mask),
                  tokenizer, prompts, replies, fmt, system_prompt, batch_size, next(tuned.parameters()).device)


def adapter_drift(peft_model, tokenizer, prompts, replies, fmt, system_prompt, batch_size: int = 8) -> dict:
    """Drift of a PEFT model from its own base (the adapter switched off), e.g. while training."""
    def base_logits(ids, mask):
        with peft_model.disable_adapter():
            return _logits(peft_model, ids, mask)

    return _drift(base_logits, lambda ids, mask: _logits(peft_model, ids, mask), tokenizer, prompts, replies, fmt,
                  system_prompt, batch_size, next(peft_model.parameters()).device)


def _logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def _drift(base_fn, tuned_fn, tokenizer, prompts, replies, fmt, system_prompt, batch_size, device) -> dict:
    import math

    import torch

    kl_sum = nll_base = nll_tuned = agree = count = 0.0
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, reply in zip(prompts[start:start + batch_size], replies[start:start + batch_size]):
            if reply:
                rows.append((_encode(tokenizer, prompt, fmt, system_prompt), reply))
        if not rows:
            continue
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)  # positions whose NEXT token is a reply token
        for i, (p, r) in enumerate(rows):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            mask[i, :len(p) + len(r)] = 1
            target[i, len(p) - 1:len(p) + len(r) - 1] = True
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        next_ids = ids[:, 1:][target[:, :-1]]
        log_base = torch.log_softmax(base_fn(ids, mask)[target], dim=-1)
        log_tuned = torch.log_softmax(tuned_fn(ids, mask)[target], dim=-1)
        kl_sum += (log_base.exp() * (log_base - log_tuned)).sum().item()
        nll_base -= log_base.gather(1, next_ids[:, None]).sum().item()
        nll_tuned -= log_tuned.gather(1, next_ids[:, None]).sum().item()
        agree += (log_base.argmax(-1) == log_tuned.argmax(-1)).sum().item()
        count += next_ids.numel()
    if not count:
        raise TinymathError("the base model produced no reply tokens to compare on")
    kl = kl_sum / count
    ppl_ratio = math.exp((nll_tuned - nll_base) / count)
    return {"kl": round(max(kl, 0.0), 5), "ppl_ratio": round(ppl_ratio, 4),
            "top1_agreement": round(agree / count, 4), "tokens": int(count),
            "base_ppl": round(math.exp(nll_base / count), 3), "tuned_ppl": round(math.exp(nll_tuned / count), 3)}


def evaluate_retention(model: str | None = None, adapter: str | None = None, base: str | None = None,
                       out: str | Path | None = None, limit: int | None = None, max_new_tokens: int = 64,
                       lm_eval_tasks: str | None = None, overwrite: bool = False,
                       trust_remote_code: bool = False) -> dict:
    """Drift of a tuned model (a run's ``adapter`` or a merged ``model``) from its ``base``."""
    from tinymath.files import atomic_output_dir, check_output_dir, write_json
    from tinymath.generate import GenerationSettings, generate_batch, load_for_inference
    from tinymath.lora import load_run
    from tinymath.model import load_base_model, model_fingerprint

    if lm_eval_tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise TinymathError("--lm-eval needs lm-evaluation-harness: pip install lm-eval (and internet access "
                                "for its datasets)")
    if limit is not None and limit <= 0:
        raise TinymathError(f"--limit {limit} must be a positive number of prompts")
    if out is not None:
        check_output_dir(out, overwrite, marker="summary.json")
    run = load_run(adapter) if adapter else None
    if base is None:
        if run is None:
            raise TinymathError("--task retention with --model needs --base (the model it was tuned from)")
        base = run.base_model
    tuned = load_for_inference(model, adapter, trust_remote_code=trust_remote_code)
    base_model = load_base_model(base, quant="none", trust_remote_code=trust_remote_code).eval()
    found = model_fingerprint(base_model)
    expected = run.config.get("base_fingerprint") if run else model_fingerprint(tuned.model)
    if expected and any(expected.get(k) != found.get(k) for k in expected):
        raise TinymathError(f"--base {base} is not the model that {adapter or model} was tuned from "
                            f"(tuned: {expected}, base: {found})")
    tokenizer = tuned.tokenizer
    prompts = retention_prompts()[:limit]
    replies = base_replies(base_model, tokenizer, prompts, tuned.format, tuned.system_prompt, max_new_tokens,
                           cache_key=json.dumps([base, found, _weights_stamp(base)]))
    total = drift(base_model, tuned.model, tokenizer, prompts, replies, tuned.format, tuned.system_prompt)
    if run is not None:
        # what fine-tuning changed: the adapter on vs off, over the base weights it was trained on
        # (for a QLoRA run the NF4-dequantized base; the rest of ``total`` is quantization)
        from tinymath.lora import load_adapted_model

        numbers = adapter_drift(load_adapted_model(run), tokenizer, prompts, replies, tuned.format,
                                tuned.system_prompt)
    else:
        numbers = total
    summary = {**numbers, "verdict": verdict(numbers["kl"], numbers["ppl_ratio"]), "n": len(prompts),
               "measured": "adapter on vs off" if run is not None else "tuned vs --base",
               "total_vs_original_base": total,
               "thresholds": {"kept_kl": KEPT_KL, "drifted_kl": DRIFTED_KL, "drifted_ppl_ratio": DRIFTED_PPL},
               "settings": {"base": base, **tuned.source, "max_new_tokens": max_new_tokens}}
    if lm_eval_tasks:
        summary["lm_eval"] = _run_lm_eval(base, tuned, lm_eval_tasks)

    if out is not None:
        shown = prompts[:SIDE_BY_SIDE]
        encoded = [_encode(tokenizer, p, tuned.format, tuned.system_prompt) for p in shown]
        tuned_text = [t for t, _ in generate_batch(tuned, encoded, GenerationSettings(max_new_tokens=max_new_tokens))]
        lines = [f"# Retention: {adapter or model} against {base}\n",
                 f"KL(base || tuned) {summary['kl']:.4f} nats/token, perplexity ratio {summary['ppl_ratio']:.3f}, "
                 f"top-1 agreement {summary['top1_agreement']:.1%} ({summary['measured']}): "
                 f"**{summary['verdict']}**; against the original base, KL {total['kl']:.4f}, "
                 f"perplexity ratio {total['ppl_ratio']:.3f}\n"]
        for prompt, reply, text in zip(shown, replies, tuned_text):
            lines += [f"## {prompt}\n", "**base**\n", tokenizer.decode(reply, skip_special_tokens=True).strip() + "\n",
                      "**tuned**\n", text.strip() + "\n"]
        with atomic_output_dir(out) as tmp:
            (Path(tmp) / "retention.md").write_text("\n".join(lines))
            write_json(Path(tmp) / "summary.json", summary)
    return summary


def _weights_stamp(source: str) -> list:
    """Sizes and times of a local model's weight files, so cached base replies follow weight changes."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path.stat().st_size, int(path.stat().st_mtime)]
    return sorted([p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in path.glob("*.safetensors")) \
        if path.is_dir() else []


def _run_lm_eval(base: str, tuned, tasks: str) -> dict:  # pragma: no cover - needs lm-eval and the internet
    """lm-evaluation-harness's own Python API on the base and the tuned model, side by side."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from tinymath.model import load_base_model

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    results = {}
    for label, model in (("base", load_base_model(base, quant="none")), ("tuned", tuned.model)):
        out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tuned.tokenizer), tasks=names)
        results[label] = {task: out["results"][task] for task in names}
    return results
