"""The CUDA-only paths, checked against their plain references on a GPU (skipped elsewhere):
variable-length packed attention against per-example SDPA, CUDA-graph replay against eager
forward/backward, static-cache decoding against plain ``generate``; on two GPUs, training and resuming
against their one-process references. Run with ``pytest -m gpu``."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_model

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    """The tiny test model with head dim 64 (what flash kernels are built for)."""
    return build_tiny_model(tmp_path_factory.mktemp("gpu") / "model", hidden_size=256, intermediate_size=512,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _examples(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return out


def _lora_loss_model(path, attn: str):
    from tinymath.lib.attention import register
    from tinymath.lib.batching import build_loss_model
    from tinymath.lib.lora import attach_lora, get_lora_config
    from tinymath.lib.model import load_base_model

    torch.manual_seed(0)
    base = load_base_model(str(path), "none", dtype=torch.bfloat16, device="cuda")
    base.set_attn_implementation(register() if attn == "packed" else attn)
    model = attach_lora(base, get_lora_config(8, 16, 0.0, "all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return build_loss_model(model).train()


def test_varlen_packed_attention_matches_per_example_sdpa(gpu_model):
    from tinymath.lib.attention import _varlen
    from tinymath.lib.batching import pack_examples, to_device

    assert _varlen()[0] is not None, "this torch has no varlen attention: the packed path would fall back"
    examples = _examples([37, 130, 23, 64], vocab=300)
    packed = _lora_loss_model(gpu_model, "packed")
    decoder = packed.peft_model.get_base_model().get_decoder()
    batch = to_device(pack_examples(examples), "cuda")
    with torch.no_grad():
        hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         cu_seq_lens=batch["cu_seq_lens"], max_seq_len=batch["max_seq_len"]).last_hidden_state[0]
        packed.peft_model.get_base_model().set_attn_implementation("sdpa")
        start = 0
        for ex in examples:  # each example alone, causal SDPA
            n = len(ex["input_ids"])
            alone = decoder(input_ids=torch.tensor([ex["input_ids"]], device="cuda")).last_hidden_state[0]
            cosine = torch.nn.functional.cosine_similarity(hidden[start:start + n].float(), alone.float(), dim=-1)
            assert cosine.min() > 0.999, (n, cosine.min().item())  # bf16 rounding only; leaks give far less
            start += n


def test_graph_replay_matches_eager(gpu_model):
    from tinymath.lib.batching import pack_examples, to_device
    from tinymath.lib.graphs import GraphedMicroBatches

    examples = _examples([61, 140, 33], vocab=300, seed=1)
    batch = pack_examples(examples)
    loss_model = _lora_loss_model(gpu_model, "packed")
    params = [p for p in loss_model.parameters() if p.requires_grad]
    loss = loss_model(**to_device(batch, "cuda"))
    loss.backward()
    eager_loss, eager_grads = loss.item(), [p.grad.clone() for p in params]
    del loss  # its autograd graph, made on the default stream, must not outlive into the capture
    for p in params:
        p.grad = None
    graphed = GraphedMicroBatches(loss_model, params, pad_id=0, max_examples=len(examples), max_seq_len=256,
                                  device=torch.device("cuda"))
    for replay in range(2):  # the capture, then a replay into the same buffers
        for p in params:
            p.grad.zero_()
        graph_loss = graphed.step(batch, 1.0).item()
        assert graph_loss == pytest.approx(eager_loss, rel=2e-2), replay
        for p, g in zip(params, eager_grads):
            assert (p.grad - g).norm() <= 5e-2 * g.norm() + 1e-6, replay


def test_a_later_length_captured_without_warm_up_matches_eager(gpu_model):
    """The first padded length is warmed up before its capture; a later one is captured at once."""
    from tinymath.lib.batching import pack_examples, to_device
    from tinymath.lib.graphs import BUCKET, GraphedMicroBatches

    loss_model = _lora_loss_model(gpu_model, "packed")
    params = [p for p in loss_model.parameters() if p.requires_grad]
    batches = [pack_examples(_examples([61, 140, 33], vocab=300, seed=2)),
               pack_examples(_examples([250, 240, 230], vocab=300, seed=3))]
    assert len({-(-b["input_ids"].shape[1] // BUCKET) for b in batches}) == 2  # two padded lengths
    eager = []
    for batch in batches:
        loss = loss_model(**to_device(batch, "cuda"))
        loss.backward()
        eager.append((loss.item(), [p.grad.clone() for p in params]))
        del loss
        for p in params:
            p.grad = None
    graphed = GraphedMicroBatches(loss_model, params, pad_id=0, max_examples=3, max_seq_len=256,
                                  device=torch.device("cuda"))
    passes = []  # forward/backward passes run by Python (warm-ups and captures; replays run none)
    original = graphed._forward_backward
    graphed._forward_backward = lambda inputs: passes.append(1) or original(inputs)
    for batch, (eager_loss, eager_grads) in zip(batches * 2, eager * 2):  # captures, then replays
        for p in params:
            p.grad.zero_()
        assert graphed.step(batch, 1.0).item() == pytest.approx(eager_loss, rel=2e-2)
        for p, g in zip(params, eager_grads):
            assert (p.grad - g).norm() <= 5e-2 * g.norm() + 1e-6
    assert len(graphed.graphs) == 2
    assert len(passes) == 2 + 1 + 1  # two warm-ups and a capture for the first length, a capture for the second


@pytest.mark.parametrize("compile_steps", [False, True], ids=["replayed", "compiled_and_replayed"])
def test_static_cache_decoding_matches_plain_generate(gpu_model, monkeypatch, compile_steps):
    """tinymath's decode loop, its steps replayed from a CUDA graph (compiled first with
    ``--compile-steps``): plain ``generate``'s answers."""
    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib import decode
    from tinymath.lib.generate import GenerationSettings, generate_batch, load_for_inference
    from tinymath.lib.speed import compile_seconds

    replayed = []  # whether each decode step ran from a captured graph (not the eager fallback)
    step = decode._Step.__call__

    def spy(self, *args, **kwargs):
        logits = step(self, *args, **kwargs)
        replayed.append(self.graph is not None and not self.failed)
        return logits

    monkeypatch.setattr(decode._Step, "__call__", spy)

    inference = load_for_inference(str(gpu_model))
    inference.model.to(torch.float32)
    questions = ["What is 3 + 4?", "A box holds 6 eggs. How many eggs are in 4 boxes?", "Tom has 5 apples."]
    prompts = [encode_prompt(inference.tokenizer, build_prompt(inference.tokenizer, q)) for q in questions]
    compiled_before = compile_seconds()
    static = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=24, static_cache=True,
                                                                   compile_steps=compile_steps))
    plain = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=24, static_cache=False))
    assert static == plain
    assert replayed and all(replayed[decode._Step.EAGER_STEPS:])  # tinymath's loop ran, from a graph
    assert (compile_seconds() > compiled_before) == compile_steps


def test_decode_steps_use_the_faster_kernel_timed_once():
    """In tinymath's decode loop a step's attention runs on the memory-efficient kernel only where it
    was timed clearly faster than SDPA's own choice: timed once per shape, then remembered; outside
    the loop (``generate``'s growing cache) nothing is timed. Either way, SDPA's attention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tinymath.lib import attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(300, 2, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(300, 2, 200, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    mask = torch.ones(300, 1, 1, 200, dtype=torch.bool, device="cuda")
    mask[::2, :, :, :50] = False  # left padding on every other row

    class Module:  # what decode_attention reads of an attention layer
        num_key_value_groups = 2

    query = q.reshape(300, 4, 1, 64)  # [rows, heads, one new token, dim]
    shape = (tuple(q.shape), 200, q.dtype, q.device, False)
    attention.decode_attention(Module(), query, k, v, mask, scaling=0.125)
    assert shape not in attention._FASTEST  # plain generate: SDPA chooses, nothing timed
    with attention.choosing_decode_kernels():
        out, _ = attention.decode_attention(Module(), query, k, v, mask, scaling=0.125)
    kernel = attention._FASTEST[shape]
    assert kernel in (SDPBackend.EFFICIENT_ATTENTION, None)
    calls = []
    real = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        with attention.choosing_decode_kernels():
            assert attention.fastest_decode_kernel(q, k, v, mask, 0.125) is kernel
    finally:
        F.scaled_dot_product_attention = real
    assert not calls  # remembered, not timed again
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.125)
    torch.testing.assert_close(out.float(), ref.reshape(300, 4, 1, 64).transpose(1, 2), atol=2e-2, rtol=2e-2)
    if kernel is not None:
        with sdpa_kernel([kernel]):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)


def _train_subprocess(args: list[str], out) -> tuple[list[float], dict]:
    """`python ARGS --out OUT` (a tinymath train command line): its per-step losses and run.json's result."""
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, *args, "--out", str(out)], capture_output=True, text=True,
                          env=os.environ, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    return losses, json.loads((out / "run.json").read_text())["result"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_graphs_train_like_two_gpus_with_ddp(gpu_model, tmp_path):
    """Under `accelerate launch` on two GPUs, CUDA-graph replays with the gradients averaged after
    them take the same steps as DDP's own (eager) averaging (with Liger's kernels where installed)."""
    import importlib.util
    from pathlib import Path

    data = Path(__file__).parent / "fixtures"
    common = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinymath", "train",
              "--data", str(data / "gsm8k"), "--model", str(gpu_model), "--quant", "none",
              "--lr", "0.02", "--warmup", "0", "--batch-size", "4", "--max-steps", "4", "--no-compile", "--json"]
    losses, graphs = {}, {}
    for flag in ("--cuda-graphs", "--no-cuda-graphs"):
        losses[flag], result = _train_subprocess([*common, flag], tmp_path / flag.strip("-"))
        graphs[flag] = result["cuda_graphs"]
        assert result["fused_kernels"] == (importlib.util.find_spec("liger_kernel") is not None)  # the default
    assert graphs == {"--cuda-graphs": True, "--no-cuda-graphs": False}
    assert losses["--cuda-graphs"] == pytest.approx(losses["--no-cuda-graphs"], rel=2e-2)
    assert losses["--cuda-graphs"][-1] < losses["--cuda-graphs"][0]  # it learns


def test_fused_kernels_train_like_the_plain_layers(gpu_model, tmp_path):
    """Liger's fused RMSNorm, rotary and SwiGLU kernels, replayed from CUDA graphs, take the same
    steps as the plain layers (each run in its own process: the rotary swap is process-wide)."""
    from pathlib import Path

    pytest.importorskip("liger_kernel")
    data = Path(__file__).parent / "fixtures"
    common = ["-m", "tinymath", "train", "--data", str(data / "gsm8k"), "--model", str(gpu_model), "--quant", "none",
              "--lr", "0.002", "--warmup", "0", "--batch-size", "4", "--max-steps", "6", "--cuda-graphs", "--json"]
    losses, fused = {}, {}
    for flag in ("--fused-kernels", "--no-fused-kernels"):
        losses[flag], result = _train_subprocess([*common, flag], tmp_path / flag.strip("-"))
        fused[flag] = result["fused_kernels"]
    assert fused == {"--fused-kernels": True, "--no-fused-kernels": False}
    assert losses["--fused-kernels"][0] == pytest.approx(losses["--no-fused-kernels"][0], rel=2e-3)  # same weights
    assert losses["--fused-kernels"] == pytest.approx(losses["--no-fused-kernels"], rel=2e-2)
    assert losses["--fused-kernels"][-1] < losses["--fused-kernels"][0]  # it learns


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_resume_like_the_run_went_on(gpu_model, tmp_path):
    """Two processes (NCCL), LoRA dropout on: resumed from the step-3 checkpoint (every process's
    random numbers put back), steps 4-6 are what the uninterrupted run took."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = Path(__file__).parent / "fixtures"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinymath", "train"]
    out = tmp_path / "run"
    whole, _ = _train_subprocess([*launch, "--data", str(data / "gsm8k"), "--model", str(gpu_model), "--quant", "none",
                                  "--lr", "0.002", "--warmup", "0", "--batch-size", "4", "--max-steps", "6",
                                  "--save-every", "3", "--lora-dropout", "0.1", "--no-compile", "--json"], out)
    assert sorted(p.name for p in (out / "checkpoints" / "step-000003").glob("rng*.pt")) == ["rng-rank1.pt", "rng.pt"]
    (out / "run.json").unlink()
    again = subprocess.run([sys.executable, *launch, "--resume", str(out), "--json"], capture_output=True, text=True,
                           env=os.environ, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    assert resumed == pytest.approx(whole, rel=1e-3)
