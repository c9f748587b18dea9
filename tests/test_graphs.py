"""CUDA-graph training (tinymath.lib.graphs): the fixed-shape padding it replays must change no loss and
no gradient, and graphs are only used by default where they are safe. The graphs themselves need
a GPU: benchmarks/train_speed.py compares whole graphed runs with the plain path there."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_cli

from tinymath import train
from tinymath.base.config import TrainConfig
from tinymath.base.errors import TinymathError
from tinymath.lib.batching import build_loss_model, pack_examples
from tinymath.lib.graphs import BUCKET, pad_packed
from tinymath.lib.gsm8k import load_training_data


def _loss_model(tiny_model):
    from tinymath.lib.attention import register
    from tinymath.lib.lora import attach_lora, get_lora_config
    from tinymath.lib.model import load_base_model

    base = load_base_model(str(tiny_model), "none", dtype=torch.float32, device="cpu")
    base.set_attn_implementation(register())
    model = attach_lora(base, get_lora_config(8, 16, 0.0, "all-linear"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; give A's gradients something to flow through
            p.data.normal_(0, 0.05)
    return build_loss_model(model)


def _loss_and_grads(loss_model, batch, **kwargs):
    loss_model.zero_grad(set_to_none=True)
    loss = loss_model(**batch, **kwargs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in loss_model.named_parameters() if p.requires_grad}


def test_padding_for_graphs_changes_no_loss_or_gradient(tiny_model, gsm8k_dir):
    from tinymath.lib.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    examples = load_training_data(TrainConfig(data=str(gsm8k_dir), model=str(tiny_model)), tokenizer)[0]["train"][:5]
    batch = pack_examples(examples)
    n = batch["input_ids"].shape[1]
    size = BUCKET * math.ceil(n / BUCKET)
    padded = pad_packed(batch, size, slots=len(examples) + 4, pad_id=tokenizer.pad_token_id)
    assert padded["input_ids"].shape == (1, size) and size > n
    assert padded["cu_seq_lens"].tolist()[-4:] == [n, size, size, size]  # padding segment, then empty ones

    loss_model = _loss_model(tiny_model)
    loss, grads = _loss_and_grads(loss_model, batch)
    padded_loss, padded_grads = _loss_and_grads(loss_model, padded, all_positions=True)
    assert padded_loss == pytest.approx(loss, rel=1e-5)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_A" in name)
    for name, grad in grads.items():  # fp32; larger matmuls only sum in another order
        assert (padded_grads[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_padding_refuses_too_many_examples(tiny_model, gsm8k_dir):
    from tinymath.lib.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    examples = load_training_data(TrainConfig(data=str(gsm8k_dir), model=str(tiny_model)), tokenizer)[0]["train"][:5]
    with pytest.raises(ValueError, match="6 segments do not fit in 4"):
        pad_packed(pack_examples(examples), 2 * BUCKET, slots=5, pad_id=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_graphs_asked_for_without_a_gpu_is_a_clear_error(tiny_model, gsm8k_dir, tmp_path):
    config = TrainConfig(data=str(gsm8k_dir), model=str(tiny_model), out=str(tmp_path / "run"), quant="none",
                         max_steps=1, batch_size=2, cuda_graphs=True)
    with pytest.raises(TinymathError, match="--cuda-graphs needs a GPU"):
        train(config)
    assert not (tmp_path / "run").exists()  # refused before the folder was claimed or the model loaded
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--cuda-graphs", "--dry-run")
    assert result.exit_code == 1 and "--cuda-graphs needs a GPU" in result.stderr  # the dry run says so too


def test_graphs_by_default_only_where_they_are_safe():
    from tinymath.lib.graphs import use_cuda_graphs

    config = TrainConfig()
    assert use_cuda_graphs(config, "cuda:0", world=1, loss_scaling=False, room=5)
    assert use_cuda_graphs(config, "cuda:0", world=2, loss_scaling=False, room=5)  # several processes too
    assert use_cuda_graphs(TrainConfig(cuda_graphs=True), "cuda:0", world=2, loss_scaling=False, room=5)
    assert not use_cuda_graphs(config, "cpu", world=1, loss_scaling=False, room=5)
    assert not use_cuda_graphs(config, "cuda:0", world=1, loss_scaling=True, room=5)  # fp16 GPUs
    assert not use_cuda_graphs(config, "cuda:0", world=1, loss_scaling=False, room=1.5)  # memory-bound
    assert not use_cuda_graphs(TrainConfig(gradient_checkpointing=True), "cuda:0", 1, False, 5)
    assert use_cuda_graphs(TrainConfig(cuda_graphs=True), "cuda:0", 1, False, 1.5)  # asked for: honoured


def test_compiling_and_graphs_only_where_they_pay():
    """A 3-step run, a chat answer or a 4-problem check never waits for compiling; asked for, it happens."""
    from tinymath.lib.generate import GenerationSettings, use_static_cache
    from tinymath.lib.graphs import use_cuda_graphs
    from tinymath.lib.speed import compile_by_default

    config = TrainConfig()
    assert not compile_by_default("cuda:0", config, total_tokens=5e6)  # the default GSM8K run: not worth it
    assert not compile_by_default("cpu", config, total_tokens=1e9)
    assert not use_cuda_graphs(config, "cuda:0", 1, False, 5, total_steps=3)
    assert use_cuda_graphs(config, "cuda:0", 1, False, 5, total_steps=699)
    assert use_cuda_graphs(TrainConfig(cuda_graphs=True), "cuda:0", 1, False, 5, total_steps=3)
    assert not use_static_cache(GenerationSettings(), "cuda", prompts=4)
    assert use_static_cache(GenerationSettings(), "cuda", prompts=1319)
    assert not use_static_cache(GenerationSettings(), "cpu", prompts=1319)
    assert use_static_cache(GenerationSettings(static_cache=True), "cuda", prompts=1)
    assert not use_static_cache(GenerationSettings(static_cache=False), "cuda", prompts=1319)


def test_compiled_decoding_pads_to_few_shapes_with_the_same_answers(tiny_model):
    """Compiled decoding (transformers' ``generate``, here because of a stop string) pads every batch
    to bucketed widths and row counts (so one compiled decoder serves an evaluation's last, smaller
    batch, the next GRPO step and the next process); the filler changes no answer and comes back
    for no prompt."""
    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.generate import (
        ROW_BUCKET,
        WIDTH_BUCKET,
        GenerationSettings,
        _batch_shape,
        generate_batch,
        load_for_inference,
    )

    inference = load_for_inference(model=str(tiny_model))
    tok = inference.tokenizer
    questions = ["What is 3 + 4?", "Leo had 30 stickers and gave away 12. How many are left?", "Halve 18.",
                 "A box holds 6 eggs. How many eggs are in 7 boxes?", "What is 10 - 3?"]
    prompts = [encode_prompt(tok, build_prompt(tok, q, "chat")) for q in questions]
    stop = ("Question:",)
    plain = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=12, batch_size=2, static_cache=False,
                                                                  stop=stop))
    padded = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=12, batch_size=2, static_cache=True,
                                                                   stop=stop))
    assert padded == plain and len(padded) == len(prompts)
    assert all(len(p) < WIDTH_BUCKET for p in prompts)  # so the padded batches really were wider
    # every batch of a multi-batch run has the batch size's rows; a single batch a bucketed count
    assert _batch_shape([4], prompts, 2, ROW_BUCKET) == [4, 4]
    assert _batch_shape([0, 1, 2], prompts, 128, ROW_BUCKET) == [0, 1, 2] + [2] * (ROW_BUCKET - 3)
    assert _batch_shape([0, 1, 2], prompts, 8, ROW_BUCKET) == [0, 1, 2] + [2] * 5  # never above the batch size
    assert _batch_shape([0, 1, 2], prompts, 8, 0) == [0, 1, 2]


def test_compiled_code_is_kept_in_tinymaths_cache_per_torch_version(monkeypatch, tmp_path):
    """Compiled artefacts go to tinymath's cache folder (a second process on the machine reuses them),
    one folder per torch build, even once Inductor has written its own default into the
    environment; a folder the user chose is kept."""
    import torch

    import tinymath.lib.speed as speed

    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "_USER_INDUCTOR_CACHE", None)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_default")  # Inductor's, once used
    folder = speed.use_compile_cache()
    assert folder.startswith(str(tmp_path / "cache" / "compile")) and torch.__version__.split("+")[0] in folder
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
    monkeypatch.setattr(speed, "_USER_INDUCTOR_CACHE", str(tmp_path / "mine"))
    assert speed.use_compile_cache() == str(tmp_path / "mine")


def test_fused_kernels_only_where_they_run():
    """Liger's kernels: by default on a GPU for uncompiled packed layers (when installed); asked for
    where they cannot run, one message that says why."""
    import importlib.util
    from types import SimpleNamespace

    from tinymath.lib.speed import use_fused_kernels

    llama = SimpleNamespace(get_base_model=lambda: SimpleNamespace(config=SimpleNamespace(model_type="llama")))
    assert not use_fused_kernels(TrainConfig(), "cpu", compiled=False, peft_model=llama)
    assert not use_fused_kernels(TrainConfig(), "cuda:0", compiled=True, peft_model=llama)
    assert not use_fused_kernels(TrainConfig(packing=False), "cuda:0", compiled=False, peft_model=llama)
    assert not use_fused_kernels(TrainConfig(fused_kernels=False), "cuda:0", compiled=False, peft_model=llama)
    asked = TrainConfig(fused_kernels=True)
    with pytest.raises(TinymathError, match="--fused-kernels: they run on a GPU only"):
        use_fused_kernels(asked, "cpu", compiled=False, peft_model=llama)
    with pytest.raises(TinymathError, match="pass --no-compile"):
        use_fused_kernels(asked, "cuda:0", compiled=True, peft_model=llama)
    with pytest.raises(TinymathError, match="SFT only"):
        use_fused_kernels(TrainConfig(method="grpo", fused_kernels=True), "cuda:0", compiled=False, peft_model=llama)
    if importlib.util.find_spec("liger_kernel") is None:  # as in CI: the [gpu] extra is not installed
        assert not use_fused_kernels(TrainConfig(), "cuda:0", compiled=False, peft_model=llama)
        with pytest.raises(TinymathError, match="pip install liger-kernel"):
            use_fused_kernels(asked, "cuda:0", compiled=False, peft_model=llama)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_fused_kernels_asked_for_without_a_gpu_is_a_clear_error(tiny_model, gsm8k_dir, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tinymath", "train", "--data", str(gsm8k_dir), "--model",
                           str(tiny_model), "--out", str(tmp_path / "run"), "--max-steps", "1", "--fused-kernels"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode != 0
    assert "--fused-kernels: they run on a GPU only; without the flag they run wherever they can" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
    # refused before anything is loaded: a model that is not there is not even looked for
    for dry_run in ((), ("--dry-run",)):  # and a dry run says what the run would
        result = run_cli("train", "--data", gsm8k_dir, "--model", tmp_path / "missing", "--out", tmp_path / "run",
                         "--fused-kernels", *dry_run)
        assert result.exit_code == 1 and "--fused-kernels: they run on a GPU only" in result.stderr


def test_compiling_pays_later_where_fused_kernels_can_run():
    """Where Liger's kernels could run instead, compiling waits for a longer run than against the
    plain layers: a 10-epoch GSM8K run (~17M tokens) stays uncompiled."""
    from unittest import mock

    from tinymath.lib.speed import compile_by_default

    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), \
            mock.patch("torch.utils._triton.has_triton", return_value=True):
        assert compile_by_default("cuda:0", TrainConfig(), total_tokens=17e6)
        assert not compile_by_default("cuda:0", TrainConfig(), total_tokens=17e6, fusable=True)
        assert compile_by_default("cuda:0", TrainConfig(), total_tokens=40e6, fusable=True)


def test_layers_planned_from_what_was_asked_and_what_pays(monkeypatch):
    """Liger's kernels where they can run (SFT on a GPU, installed), compiling only for runs long
    enough to beat them; a flag wins; GRPO and the plain path keep plain layers."""
    from unittest import mock

    from tinymath.lib import speed

    monkeypatch.setattr(speed, "liger_supports", lambda model: True)  # as with the [gpu] extra on a GPU
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), \
            mock.patch("torch.utils._triton.has_triton", return_value=True):
        def plan(tokens, **settings):
            return speed.plan_layers(TrainConfig(**settings), "cuda:0", tokens, peft_model=object())

        assert plan(5e6) == (False, True)  # the default GSM8K run: fused, not compiled
        assert plan(17e6) == (False, True)  # compiling would beat the plain layers here, not the fused ones
        assert plan(40e6) == (True, False)
        assert plan(40e6, fused_kernels=True) == (False, True)
        assert plan(5e6, compile=True) == (True, False)
        assert plan(17e6, fused_kernels=False) == (True, False)
        assert plan(5e6, method="grpo") == (False, False)
        assert plan(5e6, packing=False) == (False, False)
        assert speed.plan_layers(TrainConfig(), "cpu", 5e6, object()) == (False, False)
        with pytest.raises(TinymathError, match="pass --no-compile"):
            plan(5e6, compile=True, fused_kernels=True)


def test_fused_kernels_are_undone_for_the_rest_of_the_process(tiny_model, monkeypatch):
    """What Liger swaps in the architecture's module (its rotary function, norm and MLP classes) is
    put back by the function `fuse_kernels` returns; the model itself keeps its fused layers."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    from tinymath.lib.lora import attach_lora, get_lora_config
    from tinymath.lib.model import load_base_model
    from tinymath.lib.speed import fuse_kernels

    def fake_liger(model, **kinds):  # what liger-kernel's instance patch does to a Llama, in miniature
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (), {})
        model.model.norm.forward = lambda x: x

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake._apply_liger_kernel_to_instance = fake_liger
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    originals = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", originals[0])  # restored after the test anyway
    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", originals[1])
    model = attach_lora(load_base_model(str(tiny_model), "none", dtype=torch.float32, device="cpu"),
                        get_lora_config(8, 16, 0.0, "all-linear"))
    restore = fuse_kernels(model)
    assert modeling_llama.apply_rotary_pos_emb is not originals[0]
    restore()
    assert (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm) == originals
    assert "forward" in vars(model.get_base_model().model.norm)  # the run's own model stays fused
