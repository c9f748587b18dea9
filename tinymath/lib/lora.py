"""Everything LoRA: the adapter config, attaching it for training, and loading a run's adapter back
(onto the base it was trained on) for eval, chat and merge-adapters; merged models for inference are
kept in tinymath's cache folder (`load_merged_model`).

`MERGE_BASES` is the one list of the base weights an adapter can be merged into. A run folder is
read by `tinymath.base.runs.load_run`; this module only puts its adapter on a model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tinymath.base.errors import TinymathError
from tinymath.base.files import MODEL_SUFFIXES, missing_local
from tinymath.base.runs import RUN_FILE, RunInfo


def merge_base_quant(run: RunInfo, merge_base: str) -> str:
    """The weights an adapter is merged into: the NF4-dequantized base it was trained against."""
    return run.quant


def original_base_quant(run: RunInfo, merge_base: str) -> str:
    """The base model's original 16/32-bit weights, which the adapter never saw."""
    return "none"


# ``--merge-base`` name -> how the base is loaded for the merge (the quantization to undo)
MERGE_BASES = {"dequantized": merge_base_quant, "original": original_base_quant}


def target_module_names(target_modules: str | list[str]) -> str | list[str]:
    """``--target-modules`` as PEFT takes it: ``all-linear``, or the list of comma-separated names."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return [name.strip() for name in target_modules.split(",") if name.strip()]
    return target_modules


def get_lora_config(r: int, alpha: float, dropout: float, target_modules: str | list[str]):
    """The PEFT LoraConfig; ``target_modules="all-linear"`` means every linear layer but the LM head."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_module_names(target_modules),
                      bias="none", task_type="CAUSAL_LM")


def check_target_modules(model, target_modules) -> None:
    """Every name in ``target_modules`` (a list or set; ``all-linear`` passes) names a layer of
    ``model``, as PEFT matches them (the module's name, or a dotted tail of it): PEFT itself only
    refuses a list where no name matches, and quietly skips a misspelt one among right ones (a
    layer of a kind LoRA cannot wrap is left to PEFT's own message). ``model`` may be
    `tinymath.lib.model.model_skeleton`'s weightless copy."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return
        target_modules = [target_modules]
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if getattr(getattr(module, "weight", None), "ndim", 0) == 2})  # Linear, Embedding, Conv1D
        raise TinymathError(f"--target-modules: the model has no layer named {', '.join(sorted(missing))}; "
                            f"its layers with weight matrices are {', '.join(layers)} (or give all-linear)")


def check_base_present(run: RunInfo) -> None:
    """A run's base model (`model` in its run.json), when a local path, is still there."""
    if missing_local(run.base_model, MODEL_SUFFIXES):
        raise TinymathError(f"the base model of run {run.path}, {run.base_model} (`model` in its {RUN_FILE}), is no "
                            f"longer there: put it back, or set `model` in {run.path / RUN_FILE} to where it is now "
                            "(the adapter is checked against it)")


def attach_lora(model, lora_config, gradient_checkpointing: bool = False, base_name: str | None = None):
    """Wrap a (quantized) base model with trainable LoRA adapters; everything else is frozen.
    ``base_name``: the base as the user gave it, recorded in ``adapter_config.json`` (PEFT would
    record the folder it was loaded from: for a .gguf, a conversion in tinymath's cache)."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    for module in model.modules():  # bitsandbytes' 4-bit layers, on a CPU with AVX512-BF16, repack their
        if hasattr(module, "support_avx512bf16_for_cpu"):  # weights at the first eval-mode call (validation)
            module.support_avx512bf16_for_cpu = False  # for a bf16 kernel with no gradient, and keep them so
    check_target_modules(model, lora_config.target_modules)
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as exc:  # e.g. target modules that the model does not have
        raise TinymathError(f"--target-modules: {exc}") from exc
    if base_name:
        for adapter in peft_model.peft_config.values():
            adapter.base_model_name_or_path = base_name
    return peft_model


def load_adapted_model(run: RunInfo, merge_base: str = "dequantized", dtype=None, device: str | None = None,
                       trust_remote_code: bool = False):
    """The run's base model (unquantized) with its adapter attached, not yet merged.

    ``dequantized``: the NF4-dequantized base weights, the weights the adapter was trained
    against (for a ``--quant none`` run this equals ``original``).
    ``original``: the base model's original 16/32-bit weights.
    """
    import torch
    from peft import PeftModel

    from tinymath.lib.model import compute_dtype, default_device, load_base_model

    if merge_base not in MERGE_BASES:
        raise TinymathError(f"--merge-base {merge_base} is unknown; use one of {', '.join(MERGE_BASES)}")
    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    quant = MERGE_BASES[merge_base](run, merge_base)
    # quantize exactly as training did (same dtype), so the dequantized weights are the trained-against ones
    load_dtype = getattr(torch, run.config.get("dtype", "float32")) if quant != "none" else dtype
    check_base_present(run)
    try:
        base = load_base_model(run.base_model, quant=quant, dtype=load_dtype, device=device,
                               trust_remote_code=trust_remote_code, flag=f"its {RUN_FILE}'s model")
    except TinymathError as exc:
        raise TinymathError(f"the base model of run {run.path} cannot be loaded: {exc}") from exc
    if quant != "none":
        base.dequantize()
        base.config.__dict__.pop("quantization_config", None)
        base.hf_quantizer = None
        base.is_quantized = False
    _cast_weights(base, dtype)
    check_adapter_matches(run, base)
    try:
        return PeftModel.from_pretrained(base, str(run.path)).eval()
    except (ValueError, KeyError, RuntimeError) as exc:
        raise TinymathError(f"the adapter in {run.path} does not fit its base model {run.base_model}: "
                            f"{(str(exc).splitlines() or [''])[0]}") from None


def _cast_weights(model, dtype) -> None:
    """The weights to ``dtype``, as ``from_pretrained(dtype=...)`` loads them: buffers that are
    computed, not saved (the rotary frequencies), stay as they are (fp32). ``model.to(dtype)``
    would round them too, and the in-memory merge would then compute what neither training nor
    the kept merged weights (loaded with ``dtype=``) compute."""
    computed = [(module, name, module._buffers[name]) for module in model.modules()
                for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None]
    model.to(dtype)
    for module, name, buffer in computed:
        module._buffers[name] = buffer


MERGED_KEPT = 2  # merged models kept in the cache (the most recently used); each is the model's size


def load_merged_model(run: RunInfo, merge_base: str = "dequantized", dtype=None, device: str | None = None,
                      trust_remote_code: bool = False):
    """The run's base with its adapter merged in, ready for fast generation (no LoRA, no 4-bit).

    Merging means loading the base, quantizing it as training did and dequantizing it again, then
    the adapter: most of an evaluation's start-up. The result is kept in tinymath's cache folder
    (``merged/KEY``, the `MERGED_KEPT` most recently used), keyed by the adapter's bytes, the base,
    the merge and the weights' dtype and device type, so the next ``eval``/``chat`` of the same run
    loads plain 16-bit weights (without peft or bitsandbytes). Written to a temporary folder and
    renamed, so two processes starting at once are safe."""
    from tinymath.lib.model import compute_dtype, default_device, load_base_model, touch

    if merge_base not in MERGE_BASES:
        raise TinymathError(f"--merge-base {merge_base} is unknown; use one of {', '.join(MERGE_BASES)}")
    device = device or default_device()
    dtype = dtype or compute_dtype(device)
    folder = _merged_cache_folder(run, merge_base, dtype, device)
    if (folder / "config.json").is_file():
        try:
            model = load_base_model(str(folder), quant="none", dtype=dtype, device=device,
                                    trust_remote_code=trust_remote_code).eval()
        except Exception:  # noqa: BLE001 - a damaged entry (a disk that filled up, say): merge again
            shutil.rmtree(folder, ignore_errors=True)
        else:
            touch(folder)  # most recently used
            return model
    model = load_adapted_model(run, merge_base, dtype, device, trust_remote_code).merge_and_unload().eval()
    _keep_merged(model, folder)
    return model


def _merged_cache_folder(run: RunInfo, merge_base: str, dtype, device: str):
    """The cache entry for this merge: the adapter's bytes, the base (for a local base also its
    files' sizes and times, so a replaced base is merged again), the merge and the weights' form."""
    import hashlib
    import json

    from tinymath.lib.model import cache_dir

    digest = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        path = run.path / name
        if path.is_file():
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    base = Path(run.base_model).expanduser()
    files = sorted(base.iterdir()) if base.is_dir() else [base] if base.is_file() else []
    stamps = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    digest.update(json.dumps({"base": run.base_model, "files": stamps, "fingerprint": run.config.get("base_fingerprint"),
                              "quant": run.quant, "trained_dtype": run.config.get("dtype"), "merge": merge_base,
                              "dtype": str(dtype), "device": str(device).split(":")[0]}, sort_keys=True).encode())
    return cache_dir() / "merged" / digest.hexdigest()[:24]


def _keep_merged(model, folder) -> None:
    """Save the merged model into the cache and keep the `MERGED_KEPT` most recently used entries.
    Best effort: any failure (a full disk) leaves nothing behind and only costs the next merge."""
    import tempfile

    from tinymath.lib.model import prune_cache

    staging = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=folder.parent, prefix=".writing-")
        model.save_pretrained(staging, safe_serialization=True)
        try:
            Path(staging).rename(folder)
            staging = None
        except OSError:  # another process kept the same merge first
            pass
        prune_cache(folder.parent, MERGED_KEPT, writing=staging)
    except Exception:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        pass
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def check_adapter_matches(run: RunInfo, base) -> None:
    """Refuse an adapter trained on a different base (its saved fingerprint must match)."""
    from tinymath.lib.model import model_fingerprint

    saved = run.config.get("base_fingerprint")
    found = model_fingerprint(base)
    if saved and any(saved.get(k) != found.get(k) for k in saved):
        raise TinymathError(f"run {run.path} was trained on a different base model than {run.base_model} "
                            f"now provides (saved {saved}, found {found})")
