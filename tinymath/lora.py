"""Everything LoRA: the adapter config, attaching it for training, and loading a run's adapter back
(onto the base it was trained on) for eval, chat and merge-adapters.

A run folder (``tinymath train --out RUN``) holds the PEFT adapter and ``run.json``; `load_run`
reads it so that later commands need only the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinymath.errors import TinymathError

MERGE_BASES = ("dequantized", "original")


def get_lora_config(r: int, alpha: float, dropout: float, target_modules: str | list[str]):
    """The PEFT LoraConfig; ``target_modules="all-linear"`` means every linear layer but the LM head."""
    from peft import LoraConfig

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")


def attach_lora(model, lora_config, gradient_checkpointing: bool = False):
    """Wrap a (quantized) base model with trainable LoRA adapters; everything else is frozen."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    try:
        return get_peft_model(model, lora_config)
    except ValueError as exc:  # e.g. target modules that the model does not have
        raise TinymathError(f"--target-modules: {exc}") from exc


@dataclass
class RunInfo:
    """What a run folder says about itself (from its run.json)."""

    path: Path
    config: dict

    @property
    def base_model(self) -> str:
        return self.config["model"]

    @property
    def quant(self) -> str:
        return self.config["quant"]

    @property
    def prompt_format(self) -> str:
        return self.config["format"]

    @property
    def system_prompt(self) -> str | None:
        return self.config.get("system_prompt")

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.config.get("trust_remote_code", False))


def load_run(path: str | Path) -> RunInfo:
    """Read and check a training run folder; a clear error if it is not one."""
    from tinymath.files import read_json

    path = Path(path)
    if not path.is_dir():
        raise TinymathError(f"{path} does not exist or is not a folder; give a `tinymath train` output folder")
    missing = [name for name in ("run.json", "adapter_config.json", "adapter_model.safetensors")
               if not (path / name).exists()]
    if missing:
        raise TinymathError(f"{path} is not a tinymath training run (missing {', '.join(missing)}); "
                            "give the --out folder of `tinymath train`")
    return RunInfo(path=path, config=read_json(path / "run.json"))


def load_adapted_model(run: RunInfo, merge_base: str = "dequantized", dtype=None, device: str | None = None):
    """The run's base model (unquantized) with its adapter attached, not yet merged.

    ``dequantized``: the NF4-dequantized base weights, the weights the adapter was trained
    against (for a ``--quant none`` run this equals ``original``).
    ``original``: the base model's original 16/32-bit weights.
    """
    import torch
    from peft import PeftModel

    from tinymath.model import compute_dtype, default_device, load_base_model

    if merge_base not in MERGE_BASES:
        raise TinymathError(f"--merge-base {merge_base} is unknown; use one of {', '.join(MERGE_BASES)}")
    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    quant = run.quant if merge_base == "dequantized" else "none"
    # quantize exactly as training did (same dtype), so the dequantized weights are the trained-against ones
    load_dtype = getattr(torch, run.config.get("dtype", "float32")) if quant != "none" else dtype
    try:
        base = load_base_model(run.base_model, quant=quant, dtype=load_dtype, device=device,
                               trust_remote_code=run.trust_remote_code)
    except TinymathError as exc:
        raise TinymathError(f"the base model of run {run.path} cannot be loaded: {exc}") from exc
    if quant != "none":
        base.dequantize()
        base.config.__dict__.pop("quantization_config", None)
        base.hf_quantizer = None
        base.is_quantized = False
    base = base.to(dtype)
    check_adapter_matches(run, base)
    return PeftModel.from_pretrained(base, str(run.path)).eval()


def load_merged_model(run: RunInfo, merge_base: str = "dequantized", dtype=None, device: str | None = None):
    """The run's base with its adapter merged in, ready for fast generation (no LoRA, no 4-bit)."""
    return load_adapted_model(run, merge_base, dtype, device).merge_and_unload().eval()


def check_adapter_matches(run: RunInfo, base) -> None:
    """Refuse an adapter trained on a different base (its saved fingerprint must match)."""
    from tinymath.model import model_fingerprint

    saved = run.config.get("base_fingerprint")
    found = model_fingerprint(base)
    if saved and any(saved.get(k) != found.get(k) for k in saved):
        raise TinymathError(f"run {run.path} was trained on a different base model than {run.base_model} "
                            f"now provides (saved {saved}, found {found})")
