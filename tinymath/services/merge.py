"""merge-adapters: a run's LoRA adapter merged into a standalone Hugging Face model (safetensors).

The merged folder holds the weights, tokenizer, chat template, a generation config whose EOS is
the one training taught, and ``tinymath.json`` (prompt format and system prompt), so
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``tinymath eval --model DIR`` both just work.

The merge is checked: logits of base+adapter (unmerged) and of the merged model, both fp32, are
compared on a few prompts; merging only reorders float32 arithmetic (W x + s B A x versus
(W + s B A) x), so anything beyond 1e-3 of the logit scale means a broken merge.
"""

from __future__ import annotations

from pathlib import Path

from tinymath.base.errors import TinymathError, choice, raise_if_problems
from tinymath.base.runs import MERGE_MARKER
from tinymath.lib.lora import MERGE_BASES

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype name -> torch dtype name
CHECK_QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "Sara had 20 dollars and spent a quarter of it. How much is left?",
]
RELATIVE_TOLERANCE = 1e-3


def _logits(model, tokenizer, prompts):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p], device=model.device)).logits.float() for p in prompts]


def merge_adapters(run_dir: str | Path, out: str | Path, dtype: str = "bf16", merge_base: str = "dequantized",
                   overwrite: bool = False, trust_remote_code: bool = False, gguf: str | None = None) -> dict:
    """Merge ``run_dir``'s adapter into its base and save to ``out``; returns the check's figures.

    ``gguf`` (a `GGUF_TYPES` name): also write ``OUT/model-<type>.gguf`` for llama.cpp and an Ollama
    ``OUT/Modelfile``, from the merged fp32 weights.
    """
    import torch

    from tinymath.base.files import atomic_output_dir, check_output_dir, write_json
    from tinymath.base.runs import load_run
    from tinymath.lib.gguf_export import GGUF_TYPES
    from tinymath.lib.lora import load_adapted_model
    from tinymath.lib.model import load_tokenizer

    problems = choice("--dtype", dtype, DTYPES) + choice("--merge-base", merge_base, MERGE_BASES)
    raise_if_problems(problems + (choice("--gguf", gguf, GGUF_TYPES) if gguf is not None else []))
    run = load_run(run_dir)
    check_output_dir(out, overwrite, marker=MERGE_MARKER)
    tokenizer = load_tokenizer(str(run.path), trust_remote_code, run=True)
    adapted = load_adapted_model(run, merge_base=merge_base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if gguf is not None:  # before any work: an architecture, tokenizer or prompt the files cannot take
        from tinymath.lib.gguf_export import check_exportable, modelfile

        check_exportable(adapted.get_base_model(), tokenizer)
        ollama = modelfile(_gguf_file(gguf), tokenizer, run.prompt_format, run.system_prompt)
    merged, figures = _merge_checked(adapted, tokenizer, run)
    report = {"run": str(Path(run.path).absolute()), "base_model": run.base_model, "merge_base": merge_base, "dtype": dtype,
              **figures, "format": run.prompt_format, "system_prompt": run.system_prompt,
              "calculator": bool(run.config.get("calculator", False))}
    with atomic_output_dir(out) as tmp:
        tokenizer.save_pretrained(str(tmp))
        if gguf is not None:
            report["gguf"] = _write_gguf(merged, tokenizer, Path(tmp), gguf, run, ollama)
        merged = merged.to(getattr(torch, DTYPES[dtype]))
        merged.generation_config.eos_token_id = tokenizer.eos_token_id
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(str(tmp))
        write_json(Path(tmp) / MERGE_MARKER, report)
    return {**report, "out": str(Path(out).expanduser().absolute())}


def _merge_checked(adapted, tokenizer, run) -> tuple[object, dict]:
    """Merge, and check that the merged model computes what base+adapter computed (fp32 logits)."""
    import math

    from tinymath.base.prompts import build_prompt, encode_prompt

    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, q, run.prompt_format, run.system_prompt))
               for q in CHECK_QUESTIONS]
    reference = _logits(adapted, tokenizer, prompts)
    with adapted.disable_adapter():
        base_logits = _logits(adapted, tokenizer, prompts)
    merged = adapted.merge_and_unload().eval()
    merged_logits = _logits(merged, tokenizer, prompts)

    max_diff = max((a - b).abs().max().item() for a, b in zip(reference, merged_logits))
    scale = max(1.0, max(r.abs().max().item() for r in reference))
    adapter_effect = max((a - b).abs().max().item() for a, b in zip(reference, base_logits))
    tolerance = RELATIVE_TOLERANCE * scale
    if not math.isfinite(max_diff) or not math.isfinite(adapter_effect):
        raise TinymathError(f"merge check failed: the logits are not finite (largest difference {max_diff}); "
                            f"the adapter in {run.path} holds NaN or infinite weights")
    if max_diff > tolerance:
        raise TinymathError(f"merge check failed: merged logits differ from base+adapter by {max_diff:.3g} "
                            f"(tolerance {tolerance:.3g}); the adapter does not fit this base model")
    return merged, {"max_logit_diff": max_diff, "tolerance": tolerance, "adapter_effect": adapter_effect}


def _gguf_file(gguf_type: str) -> str:
    """The name of the ``.gguf`` written into a merge's folder."""
    return f"model-{gguf_type}.gguf"


def _write_gguf(merged, tokenizer, folder: Path, gguf_type: str, run, ollama: str) -> dict:
    """``model-<type>.gguf`` and the Ollama ``Modelfile`` (``ollama``) in ``folder`` (which holds the
    tokenizer)."""
    from tinymath.lib.gguf_export import write_gguf

    name = _gguf_file(gguf_type)
    write_gguf(merged, tokenizer, folder, folder / name, gguf_type, title=f"tinymath {run.path.name}")
    (folder / "Modelfile").write_text(ollama, encoding="utf-8")
    return {"file": name, "type": gguf_type, "modelfile": "Modelfile"}
