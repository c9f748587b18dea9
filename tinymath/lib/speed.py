"""Speed and memory policy of training: how many tokens one packed micro-batch holds (measured
against the GPU memory budget, with gradient checkpointing when that buys much larger
micro-batches), whether decoder layers are compiled or run Liger's fused kernels, running them
eagerly where compiled code does not fit (generation, validation), and where compiled code is
kept between processes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from tinymath.base.config import TrainConfig
from tinymath.base.errors import TinymathError
from tinymath.lib.batching import pack_examples, to_device

_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # as the user started the process


def use_compile_cache() -> str:
    """Keep torch.compile's artefacts (Inductor's FX-graph and AOTAutograd caches, Triton kernels)
    under tinymath's cache folder, ``compile/torch-VERSION``, beside the converted models, rather
    than in a temporary folder that a reboot or a /tmp clean-up empties. Inductor keys each artefact
    by the graph, the GPU, the Triton and torch builds and its own settings, so another model or GPU
    never reuses a wrong one; it writes each entry to a temporary file and renames it, so two
    processes may start at once. A ``$TORCHINDUCTOR_CACHE_DIR`` the user set is left as it is.
    Returns the folder."""
    import torch

    from tinymath.lib.model import cache_dir

    folder = _USER_INDUCTOR_CACHE  # not os.environ: Inductor writes its own default there once used
    if folder is None:
        folder = str(cache_dir() / "compile" / f"torch-{torch.__version__.replace('+', '-')}")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


# PyTorch's compile-time metrics: Dynamo's compile of a frame (forward graph and Inductor included),
# and AOTAutograd's lazy compile of the backward graph, which happens in the first backward
COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")


def compile_seconds() -> float:
    """Seconds this process has spent in ``torch.compile`` (Dynamo tracing, Inductor, the backward
    compiled at the first backward; cache hits included), from PyTorch's own compile-time metrics;
    0 when nothing was compiled."""
    import sys

    if "torch._dynamo.utils" not in sys.modules:
        return 0.0
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(compilation_time_metrics.get(timer, [])) for timer in COMPILE_TIMERS))


CPU_MICRO_BATCH_TOKENS = 4096  # fp32 activations of SmolLM2-135M for 4k tokens: about 6 GB


def plan_micro_batch(loss_model, examples: list[dict], config: TrainConfig, device, budget: int,
                     set_checkpointing) -> tuple[int, bool, dict]:
    """The largest packed micro-batch (in tokens) whose peak memory stays within ``budget`` bytes.

    Measures instead of guessing: one forward/backward on a probe batch gives the bytes each token
    costs; if not even the longest example fits, gradient checkpointing is switched on and measured
    again. Returns (tokens, checkpointing, the measurements).
    """
    import torch

    longest = max(len(ex["input_ids"]) for ex in examples)
    probe = []
    for ex in examples:
        if sum(len(e["input_ids"]) for e in probe) >= 2048:
            break
        probe.append(ex)
    probe_tokens = sum(len(e["input_ids"]) for e in probe)
    step_tokens = config.batch_size * config.grad_accum * probe_tokens / len(probe)
    trainable = sum(p.numel() for p in loss_model.parameters() if p.requires_grad) * 4 * 3
    figures, fits = {}, {}
    for checkpointing in (False, True):
        set_checkpointing(checkpointing)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = loss_model(**to_device(pack_examples(probe), device))
        loss.backward()
        loss_model.zero_grad(set_to_none=True)
        del loss
        torch.cuda.synchronize(device)
        per_token = (torch.cuda.max_memory_allocated(device) - base) / probe_tokens
        # optimizer state (2 fp32 moments) and fp32 gradients of the LoRA weights come on top
        room = (budget - base - trainable) * 0.9
        fits[checkpointing] = int(room / per_token) if room > 0 else 0
        figures[f"bytes_per_token{'_ckpt' if checkpointing else ''}"] = round(per_token)
        if not checkpointing and fits[False] >= step_tokens:
            break  # a whole step fits without recomputation: nothing to gain from checkpointing
    figures.update(base_bytes=base, budget_bytes=budget, tokens=fits)
    # checkpointing recomputes the forward (~1/3 more work): worth it only for much larger micro-batches
    use_ckpt = fits.get(True, 0) >= 2 * fits[False] or fits[False] < longest
    tokens = fits[use_ckpt]
    if tokens < longest:
        need = (base + trainable + per_token * longest / 0.9) / 2**30
        raise TinymathError(f"--max-memory {config.max_memory or 'free memory'}: too small to train even one "
                            f"example of {longest} tokens; at least {need:.1f}GB is needed (or lower --max-length)")
    return min(tokens, 65536), use_ckpt, figures


def compile_layers(peft_model) -> None:
    """Regional compilation: each decoder layer goes through ``torch.compile``. Every layer runs the
    same code, so one graph, compiled once for any token count (dynamic shapes), serves them all.
    The embeddings' output is marked as requiring gradients so that the first layer sees the same
    inputs as the others (else it alone compiles again). Fused norms, rotary, activations and LoRA
    adds, and far fewer kernel launches: small models are otherwise launch-bound. Generation and
    validation run the layers eagerly (`eager`)."""
    causal_lm = peft_model.get_base_model()
    layers = getattr(causal_lm.get_decoder(), "layers", None)
    if layers is None:
        raise TinymathError(f"--compile: {type(causal_lm).__name__} keeps its decoder layers elsewhere than "
                            "`.layers`; pass --no-compile")
    if not hasattr(causal_lm, "_require_grads_hook"):  # gradient checkpointing may have set it already
        causal_lm.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)


# Compiling the layers costs about a minute in every new process (53 s even with Inductor's cache
# warm: loading the cached kernels is most of it) and then trains TinyLlama's architecture at ~64k
# real tokens/s on an H200 (CUDA graphs), against ~42k for the plain layers and ~54k with Liger's
# fused kernels (`use_fused_kernels`): it wins back its cost after ~10M tokens against the plain
# layers, ~22M against the fused ones. The default 3-epoch GSM8K run is ~5M tokens.
MIN_COMPILED_TOKENS = 10_000_000
MIN_COMPILED_TOKENS_OVER_FUSED = 25_000_000


def compile_by_default(device: str, config: TrainConfig, total_tokens: float | None = None,
                       fusable: bool = False) -> bool:
    """Compile the packed path on GPUs that torch.compile's Triton kernels support (compute
    capability 7.0 and newer), for runs with enough tokens to pay for it (`MIN_COMPILED_TOKENS`,
    or `MIN_COMPILED_TOKENS_OVER_FUSED` where Liger's fused kernels can run instead: ``fusable``);
    never the plain reference path, never on CPU. ``--compile`` / ``--no-compile`` decide otherwise."""
    if not (device.startswith("cuda") and config.packing):
        return False
    if total_tokens is not None and total_tokens < (MIN_COMPILED_TOKENS_OVER_FUSED if fusable else MIN_COMPILED_TOKENS):
        return False
    import torch
    from torch.utils._triton import has_triton

    return torch.cuda.get_device_capability(device) >= (7, 0) and has_triton()


def liger_supports(peft_model) -> bool:
    """Whether liger-kernel is installed and has fused kernels for this model's architecture."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:  # not installed, or no Triton (a CPU-only torch)
        return False
    return getattr(peft_model.get_base_model().config, "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def check_fused_kernels_asked(config: TrainConfig, device: str) -> None:
    """``--fused-kernels`` where they cannot run, refused before anything is loaded (what needs the
    model, its architecture, is checked again once it is loaded)."""
    if config.fused_kernels:
        reason = _fused_kernels_refusal(config, device, bool(config.compile), peft_model=None)
        if reason:
            raise TinymathError(f"--fused-kernels: {reason}; without the flag they run wherever they can")


def use_fused_kernels(config: TrainConfig, device: str, compiled: bool, peft_model) -> bool:
    """Liger's fused RMSNorm, rotary and SwiGLU kernels: by default for SFT on a GPU with --packing
    when the layers are not compiled (compiling fuses them itself) and liger-kernel supports the
    model; ``--fused-kernels`` where they cannot run is refused with the reason."""
    if config.fused_kernels is False:
        return False
    reason = _fused_kernels_refusal(config, device, compiled, peft_model)
    if reason and config.fused_kernels:
        raise TinymathError(f"--fused-kernels: {reason}")
    return reason is None


def _fused_kernels_refusal(config: TrainConfig, device: str, compiled: bool, peft_model) -> str | None:
    """Why Liger's kernels cannot run (None: they can); ``peft_model`` None: installed is enough."""
    import importlib.util

    reason = None
    if config.method != "sft":
        reason = "SFT only (GRPO samples from a copy of the model, which must run the same layers)"
    elif not device.startswith("cuda"):
        reason = "they run on a GPU only"
    elif not config.packing:
        reason = "they are part of the --packing path"
    elif compiled:
        reason = "the compiled layers fuse these operations themselves; pass --no-compile"
    elif peft_model is not None and liger_supports(peft_model):
        pass  # installed, and it has kernels for this architecture
    elif importlib.util.find_spec("liger_kernel") is None:
        reason = "liger-kernel is not installed (pip install liger-kernel: the gpu extra)"
    elif peft_model is not None:
        reason = "liger-kernel has no kernels for this model's architecture (or cannot load: it needs Triton)"
    return reason


def plan_layers(config: TrainConfig, device: str, total_tokens: float, peft_model) -> tuple[bool, bool]:
    """(compiled, fused kernels) for a run of ``total_tokens`` training tokens: what was asked for,
    else compiling where it pays (`compile_by_default`; later where Liger's kernels can run
    instead), else Liger's kernels where they can run. Refuses a combination that cannot run."""
    if config.compile is not None:
        compiled = config.compile
    else:  # asked-for fused kernels replace compiling
        fusable = config.fused_kernels is None and use_fused_kernels(config, device, False, peft_model)
        compiled = config.fused_kernels is not True and compile_by_default(device, config, total_tokens, fusable)
    return compiled, use_fused_kernels(config, device, compiled, peft_model)


def fuse_kernels(model):
    """Swap the decoder layers' RMSNorm, rotary embedding and SwiGLU for Liger's Triton kernels
    (each a single fused kernel forward and backward, instead of several PyTorch ones) in this
    model (a PEFT model or a plain one). Liger swaps them in the architecture's module too (its rotary function, which the
    layers look up there, and its norm and MLP classes), so for the process; returns the function
    that puts that module back as it was (the run calls it when it ends, so that a model built
    later in the process, an evaluation's say, is plain). The LM head and loss stay tinymath's
    (`tinymath.lib.batching`)."""
    import logging
    import sys

    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules[type(causal_lm).__module__]  # e.g. transformers.models.llama.modeling_llama
    before = dict(vars(module))
    logging.getLogger("liger_kernel").setLevel(logging.WARNING)
    _apply_liger_kernel_to_instance(model=causal_lm, rope=True, rms_norm=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    swapped = {name: value for name, value in before.items() if vars(module).get(name) is not value}

    def restore() -> None:
        for name, value in swapped.items():
            setattr(module, name, value)

    return restore


@contextmanager
def eager():
    """The compiled layers' plain Python forward (other shapes and attention implementations)."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield


@contextmanager
def inference_mode(peft_model):
    """Eval mode with masked SDPA attention (generation and padded scoring need attention masks,
    which the packed training attention does not take); training mode again afterwards."""
    base = peft_model.get_base_model()
    attn = base.config._attn_implementation
    base.set_attn_implementation("sdpa")
    peft_model.eval()
    try:
        with eager():
            yield
    finally:
        base.set_attn_implementation(attn)
        peft_model.train()
