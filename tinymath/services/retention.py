"""eval --task retention: how far a tuned model (a run's adapter, or a merged model) drifted from
its base on general prompts, with a side-by-side ``retention.md``.

For a training run the verdict is on what fine-tuning changed: the adapter switched on vs off over
the base weights it was trained against (for QLoRA, the NF4-dequantized base).
``total_vs_original_base`` also counts what 4-bit quantization of the base changed, which on a
135M model is most of it (BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from tinymath.base.config import absolute_paths
from tinymath.base.errors import TinymathError
from tinymath.base.runs import SUMMARY
from tinymath.lib.drift import (
    DRIFTED_KL,
    DRIFTED_PPL,
    KEPT_KL,
    KEPT_PPL,
    SIDE_BY_SIDE,
    adapter_drift,
    base_replies,
    drift,
    encode_general_prompt,
    retention_prompts,
    verdict,
)


def evaluate_retention(model: str | None = None, adapter: str | None = None, base: str | None = None,
                       out: str | Path | None = None, limit: int | None = None, max_new_tokens: int = 64,
                       lm_eval_tasks: str | None = None, overwrite: bool = False,
                       trust_remote_code: bool = False) -> dict:
    """Drift of a tuned model (a run's ``adapter`` or a merged ``model``) from its ``base``."""
    from tinymath.base.files import atomic_output_dir, check_output_dir, write_json
    from tinymath.base.runs import load_run
    from tinymath.lib.generate import GenerationSettings, generate_batch, load_for_inference
    from tinymath.lib.model import load_base_model, model_fingerprint

    if lm_eval_tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise TinymathError("--lm-eval needs lm-evaluation-harness: pip install lm-eval (and internet access "
                                "for its datasets)")
    if limit is not None and limit <= 0:
        raise TinymathError(f"--limit {limit} must be a positive number of prompts")
    if out is not None:
        check_output_dir(out, overwrite, marker=SUMMARY)
    run = load_run(adapter) if adapter else None
    if base is None:
        if run is None:
            raise TinymathError("--task retention with --model needs --base (the model it was tuned from)")
        base = run.base_model
    tuned = load_for_inference(model, adapter, trust_remote_code=trust_remote_code)
    base_model = load_base_model(base, quant="none", trust_remote_code=trust_remote_code, flag="--base").eval()
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
        from tinymath.lib.lora import load_adapted_model

        numbers = adapter_drift(load_adapted_model(run, trust_remote_code=trust_remote_code), tokenizer, prompts, replies, tuned.format,
                                tuned.system_prompt)
    else:
        numbers = total
    summary = {**numbers, "verdict": verdict(numbers["kl"], numbers["ppl_ratio"]), "n": len(prompts),
               "measured": "adapter on vs off" if run is not None else "tuned vs --base",
               "total_vs_original_base": total,
               "thresholds": {"kept_kl": KEPT_KL, "kept_ppl_ratio": KEPT_PPL, "drifted_kl": DRIFTED_KL,
                              "drifted_ppl_ratio": DRIFTED_PPL},
               "settings": absolute_paths({"base": base, **tuned.source, "max_new_tokens": max_new_tokens})}
    if lm_eval_tasks:
        summary["lm_eval"] = _run_lm_eval(base, tuned, lm_eval_tasks)

    if out is not None:
        shown = prompts[:SIDE_BY_SIDE]
        encoded = [encode_general_prompt(tokenizer, p, tuned.format, tuned.system_prompt) for p in shown]
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
            write_json(Path(tmp) / SUMMARY, summary)
    return summary


def _weights_stamp(source: str) -> list:
    """Sizes and times of a local model's weight files, so cached base replies follow weight changes."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path.stat().st_size, int(path.stat().st_mtime)]
    return sorted([p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in path.glob("*.safetensors")) \
        if path.is_dir() else []


def _run_lm_eval(base: str, tuned, tasks: str) -> dict:
    """lm-evaluation-harness's own Python API on the base and the tuned model, side by side (its
    datasets come from the hub)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from tinymath.lib.model import load_base_model

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    results = {}
    for label, model in (("base", load_base_model(base, quant="none", flag="--base")), ("tuned", tuned.model)):
        try:
            out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tuned.tokenizer), tasks=names)
        except (OSError, ConnectionError, ValueError, KeyError) as exc:  # an unknown task, no hub, no dataset
            raise TinymathError(f"--lm-eval {tasks}: lm-evaluation-harness could not run "
                                f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); its tasks need "
                                "their datasets from the Hugging Face hub") from None
        results[label] = {task: out["results"][task] for task in names}
    return results
