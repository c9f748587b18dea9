"""Drift: how far fine-tuning moved a model away from its base on general, non-math prompts (the
numbers behind ``eval --task retention`` and ``train --retention-every``).

The package ships ~100 everyday prompts (writing, facts, advice, short code, summaries,
translation). The base model answers them greedily once (cached per base model); then both models
are scored teacher-forced on those base replies:

- ``kl``: mean per-token KL(base || tuned) in nats: how differently the two predict the same text;
- ``ppl_ratio``: perplexity of the base replies under the tuned model / under the base;
- ``top1_agreement``: how often both models' most likely next token is the same.

A model compared with itself gives 0, 1.0 and 100%; `verdict` turns the numbers into kept / mild
drift / drifted (thresholds measured in BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files

from tinymath.base.errors import TinymathError
from tinymath.base.files import read_json

# Thresholds (see BENCHMARKS.md: measured on SmolLM2 after the default recipe and after a 10x-lr run)
KEPT_KL = 0.10        # nats/token: below this the tuned model predicts general text almost like its base
DRIFTED_KL = 0.50     # above this, or a perplexity ratio above DRIFTED_PPL, general ability is visibly hurt
DRIFTED_PPL = 1.5
KEPT_PPL = 1.2        # ... and a perplexity ratio below this
SIDE_BY_SIDE = 6
RETENTION_SLICE = 12  # prompts scored by `tinymath train --retention-every N`


def retention_prompts() -> list[str]:
    """The general-ability prompts shipped with tinymath."""
    text = files("tinymath.lib").joinpath("retention_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def verdict(kl: float, ppl_ratio: float) -> str:
    if kl < KEPT_KL and ppl_ratio < KEPT_PPL:
        return "kept"
    if kl < DRIFTED_KL and ppl_ratio < DRIFTED_PPL:
        return "mild drift"
    return "drifted"


def encode_general_prompt(tokenizer, prompt: str, fmt: str, system_prompt: str | None) -> list[int]:
    from tinymath.base.prompts import build_prompt, encode_prompt

    return encode_prompt(tokenizer, build_prompt(tokenizer, prompt, fmt, system_prompt))


def base_replies(base, tokenizer, prompts: list[str], fmt: str, system_prompt: str | None, max_new_tokens: int,
                 cache_key: str | None = None) -> list[list[int]]:
    """Greedy reply token ids of the base model (EOS included when produced), cached on disk."""
    from tinymath.lib.model import cache_dir

    cache = None
    if cache_key:
        digest = hashlib.sha256(json.dumps([cache_key, prompts, fmt, system_prompt, max_new_tokens]).encode()).hexdigest()
        cache = cache_dir() / "retention" / f"{digest[:24]}.json"
        if cache.is_file():
            try:
                return read_json(cache)
            except TinymathError:
                pass  # a damaged cache entry is simply made again
    from tinymath.lib.generate import GenerationSettings, InferenceModel, generate_ids

    inference = InferenceModel(base, tokenizer, fmt, system_prompt, {})
    encoded = [encode_general_prompt(tokenizer, p, fmt, system_prompt) for p in prompts]
    replies = []
    for ids in generate_ids(inference, encoded, GenerationSettings(max_new_tokens=max_new_tokens, static_cache=False)):
        reply = ids.tolist()
        if tokenizer.eos_token_id in reply:
            reply = reply[:reply.index(tokenizer.eos_token_id) + 1]
        replies.append(reply)
    if cache is not None:
        from tinymath.base.files import write_json

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
                rows.append((encode_general_prompt(tokenizer, prompt, fmt, system_prompt), reply))
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
    return {"kl": round(kl, 5), "ppl_ratio": round(ppl_ratio, 4),
            "top1_agreement": round(agree / count, 4), "tokens": int(count),
            "base_ppl": round(math.exp(nll_base / count), 3), "tuned_ppl": round(math.exp(nll_tuned / count), 3)}
