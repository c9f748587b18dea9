"""tinymath's own decode loop (`tinymath.lib.decode`) against transformers' ``generate``: the same
tokens, greedy and sampled, on padded batches; what it cannot do goes to ``generate``. (On a GPU
its steps replay from a CUDA graph: `test_gpu.py` checks that path.)"""

from __future__ import annotations

import pytest

QUESTIONS = ("What is 3 + 4?", "Leo had 30 stickers and gave away 12. How many stickers does he have left?",
             "A box holds 6 eggs. How many eggs are in 4 boxes?")


@pytest.fixture(scope="module")
def inference(tiny_model):
    from tinymath.lib.generate import load_for_inference

    return load_for_inference(model=str(tiny_model))


def _prompts(inference, questions=QUESTIONS):
    from tinymath.base.prompts import build_prompt, encode_prompt

    return [encode_prompt(inference.tokenizer, build_prompt(inference.tokenizer, q, "chat")) for q in questions]


def _both(inference, monkeypatch, seed=None, questions=QUESTIONS, **settings):
    """Each prompt's generated ids by tinymath's loop (``generate`` made to fail, so it is not
    used) and by ``generate``."""
    import torch

    from tinymath.lib.generate import GenerationSettings, generate_ids

    def run(static):
        if seed is not None:
            torch.manual_seed(seed)
        return [row.tolist() for row in generate_ids(inference, _prompts(inference, questions),
                                                     GenerationSettings(static_cache=static, **settings))]

    plain = run(False)
    with monkeypatch.context() as patch:
        patch.setattr(inference.model, "generate", lambda *a, **k: pytest.fail("generate was used"))
        own = run(True)
    return own, plain


def _trimmed(rows, pad):
    """Without the trailing padding (the loop checks for finished rows every few steps)."""
    out = []
    for row in rows:
        while row and row[-1] == pad:
            row = row[:-1]
        out.append(row)
    return out


def test_greedy_tokens_are_generates(inference, monkeypatch):
    own, plain = _both(inference, monkeypatch, max_new_tokens=30, batch_size=3)
    pad = inference.tokenizer.pad_token_id
    assert _trimmed(own, pad) == _trimmed(plain, pad)
    assert all(len(row) > 5 for row in _trimmed(own, pad))


def test_sampled_tokens_are_generates_with_the_same_seed(inference, monkeypatch):
    own, plain = _both(inference, monkeypatch, seed=3, max_new_tokens=20, batch_size=3, temperature=0.8, top_p=0.9)
    pad = inference.tokenizer.pad_token_id
    assert _trimmed(own, pad) == _trimmed(plain, pad)
    greedy, _ = _both(inference, monkeypatch, max_new_tokens=20, batch_size=3)
    assert _trimmed(own, pad) != _trimmed(greedy, pad)  # it did sample


def test_sampled_batches_after_rows_stop_early_are_generates(tiny_model, monkeypatch):
    """Several batches, rows ending at EOS early: every batch's samples are still `generate`'s with
    the same seed (the loop draws no random numbers after its batch is done)."""
    import torch

    from tinymath.lib.generate import load_for_inference

    eager = load_for_inference(model=str(tiny_model))
    eos = eager.tokenizer.eos_token_id
    with torch.no_grad():  # make EOS about as likely as the likeliest token
        hidden = eager.model.model(torch.tensor([_prompts(eager)[0]])).last_hidden_state[0]
        direction = hidden.mean(0) / hidden.mean(0).norm()
        top = eager.model.lm_head(hidden).max(-1).values.mean()
        eager.model.lm_head.weight[eos] = direction * 1.6 * top / (hidden @ direction).mean()
    own, plain = _both(eager, monkeypatch, seed=1, questions=QUESTIONS * 2, max_new_tokens=30, batch_size=2,
                       temperature=1.0)
    pad = eager.tokenizer.pad_token_id
    assert _trimmed(own, pad) == _trimmed(plain, pad)
    assert sum(eos in row[:20] for row in own) >= 3  # rows did stop early


def test_min_new_tokens_of_the_models_generation_config(inference, monkeypatch):
    """A model whose generation config forces a length (as the speed benchmarks' models do): EOS is
    held back until then, in both."""
    eos = inference.tokenizer.eos_token_id
    monkeypatch.setattr(inference.model.generation_config, "min_new_tokens", 12)
    monkeypatch.setattr(inference.model.generation_config, "eos_token_id", eos)
    own, plain = _both(inference, monkeypatch, max_new_tokens=16, batch_size=3)
    assert own == plain
    assert all(eos not in row[:12] for row in own)


def test_what_the_loop_does_not_do_goes_to_generate(inference, monkeypatch):
    from tinymath.lib.generate import GenerationSettings, compiles

    assert not compiles(inference.model, GenerationSettings())
    assert compiles(inference.model, GenerationSettings(stop=("Question:",)))
    assert not compiles(inference.model, GenerationSettings(calculator=True))  # the loop writes its results
    assert compiles(inference.model, GenerationSettings(), stopping=object())
    with monkeypatch.context() as patch:
        patch.setattr(inference.model.generation_config, "repetition_penalty", 1.3)
        assert compiles(inference.model, GenerationSettings())
    layers = inference.model.config.num_hidden_layers
    monkeypatch.setattr(inference.model.config, "layer_types", ["sliding_attention"] * layers, raising=False)
    assert compiles(inference.model, GenerationSettings())  # a window the loop's one mask would not keep


def test_compiled_steps_give_generates_tokens(inference, monkeypatch):
    """``--compile-steps``: each step compiled by torch.compile (on the CPU too), the same greedy
    tokens as ``generate``, also where filler rows pad a batch to its compiled row count (5 prompts,
    8 rows: the filler starts finished and never holds the batch up); the same shapes again compile
    nothing more."""
    import torch._dynamo

    import tinymath.lib.decode as decode
    from tinymath.lib.generate import STEP_ROW_BUCKET
    from tinymath.lib.speed import compile_seconds

    monkeypatch.setattr(decode, "_COMPILED", [])  # compiled here, whatever ran before in this process
    torch._dynamo.reset()
    questions = QUESTIONS + ("Halve 18.", "What is 10 - 3?")
    assert len(questions) % STEP_ROW_BUCKET  # so the batch has filler rows
    before = compile_seconds()
    own, plain = _both(inference, monkeypatch, questions=questions, max_new_tokens=30, compile_steps=True)
    pad = inference.tokenizer.pad_token_id
    assert _trimmed(own, pad) == _trimmed(plain, pad)
    compiled = compile_seconds()
    assert compiled > before and decode._COMPILED
    again, _ = _both(inference, monkeypatch, questions=questions, max_new_tokens=30, compile_steps=True)
    assert again == own and compile_seconds() == compiled


def test_filler_rows_start_finished(inference):
    """Rows past ``live`` only fill a batch to its shape: they generate nothing (padding), so a
    batch ends when its real rows do."""
    import torch

    from tinymath.lib.decode import decode

    prompt = _prompts(inference)[0]
    ids = torch.tensor([prompt, prompt])
    pad = inference.tokenizer.pad_token_id
    out = decode(inference.model, ids, torch.ones_like(ids), 12, inference.tokenizer.eos_token_id, pad, live=1)
    assert (out[1, len(prompt):] == pad).all() and not (out[0, len(prompt):] == pad).all()


def test_compiled_steps_are_refused_where_the_loop_does_not_run():
    from tinymath.base.errors import TinymathError
    from tinymath.lib.generate import GenerationSettings

    GenerationSettings(compile_steps=True).validate()
    GenerationSettings(compile_steps=True, calculator=True).validate()  # the loop writes the calculator's results
    for settings, said in ((GenerationSettings(compile_steps=True, static_cache=False), "--no-compile"),
                           (GenerationSettings(compile_steps=True, stop=("Question:",)), "lm-eval-gsm8k")):
        with pytest.raises(TinymathError, match=said):
            settings.validate()


def test_compiled_steps_see_one_width_from_min_width(inference, monkeypatch):
    """GRPO's --compile-steps pads every batch to the longest training prompt (``min_width``), rounded
    to the width bucket like any compiled batch: prompts on both sides of a bucket boundary give one
    shape (one compile), not one per bucket."""
    import tinymath.lib.generate as generate
    from tinymath.lib.generate import WIDTH_BUCKET, GenerationSettings, generate_ids

    shapes = []

    def fake_decode(model, ids, mask, new, eos, pad, sample=None, compiled=False, live=None, tool=None):
        shapes.append((tuple(ids.shape), compiled))
        import torch

        return torch.cat([ids, torch.full((ids.shape[0], new), pad)], dim=1)

    monkeypatch.setattr(generate, "decode", fake_decode)
    short, long = [5] * 10, [5] * (WIDTH_BUCKET + 6)  # either side of the first bucket boundary
    settings = GenerationSettings(max_new_tokens=3, batch_size=2, compile_steps=True, min_width=WIDTH_BUCKET + 6)
    generate_ids(inference, [short, short], settings)
    generate_ids(inference, [long, short, short], settings)
    assert {shape for shape, _ in shapes} == {(2, 2 * WIDTH_BUCKET)} and all(c for _, c in shapes)


def test_a_tool_writes_tokens_that_the_model_then_reads(inference, monkeypatch):
    """The calculator's way into the loop: after a trigger token, a row takes the tool's tokens
    instead of the model's, and goes on as the model would from the text with them in it (what
    ``generate`` gives from that text), while the other rows are untouched."""
    import torch

    import tinymath.lib.generate as generate
    from tinymath.lib.generate import GenerationSettings, generate_ids

    prompts = _prompts(inference)
    plain = [row.tolist() for row in generate_ids(inference, prompts, GenerationSettings(max_new_tokens=12,
                                                                                         static_cache=False))]
    trigger, written = plain[0][2], [100, 101]

    class Tool:  # writes once, into the first row whose token is the trigger
        triggers, calls = {trigger}, []

        def __call__(self, row, ids):
            self.calls.append((row, list(ids)))
            return written if len(self.calls) == 1 else []

    tool = Tool()
    monkeypatch.setattr(generate, "CalculatorTool", lambda tokenizer: tool)
    monkeypatch.setattr(inference.model, "generate", lambda *a, **k: pytest.fail("generate was used"))
    own = [row.tolist() for row in generate_ids(inference, prompts, GenerationSettings(
        max_new_tokens=12, static_cache=True, calculator=True))]
    monkeypatch.undo()
    ids = tool.calls[0][1]  # the tool is told the batch's row (prompts are sorted by length): find its prompt
    assert ids[-1] == trigger
    cut = len(ids)
    row = next(i for i in range(len(prompts)) if plain[i][:cut] == ids)
    assert own[row][:cut + 2] == ids + written
    text = prompts[row] + own[row][:cut + 2]
    after = generate_ids(inference, [text], GenerationSettings(max_new_tokens=12 - cut - 2, static_cache=False))[0]
    pad = inference.tokenizer.pad_token_id
    assert _trimmed([own[row][cut + 2:]], pad) == _trimmed([after.tolist()], pad)
    assert all(_trimmed([own[i]], pad) == _trimmed([plain[i]], pad) for i in range(len(prompts)) if i != row)
