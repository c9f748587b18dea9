"""GRPO (train --method grpo): the reward and advantages, the weighted loss being the policy
gradient, an update moving the policy towards rewarded solutions, exact resume, the run folder
working with eval and merge, and clear refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model, run_cli

SFT = ["--quant", "none", "--batch-size", "2", "--lr", "0.02", "--warmup", "0", "--lora-r", "8"]
RL = ["--batch-size", "2", "--samples", "3", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def sft_run(tiny_model, gsm8k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", out, *SFT, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def varied_rewards(monkeypatch):
    """A random model never solves GSM8K: reward a property of the sampled text instead, so that
    groups differ and every step learns (the reward is a pure function of the sample)."""
    import tinymath.lib.grpo as grpo

    monkeypatch.setattr(grpo, "reward", lambda text, gold, format_reward=0.0: float(len(text) % 2))


def test_reward_and_group_advantages():
    from tinymath.lib.grpo import group_advantages, reward, solution_ids

    assert reward("so 3 + 4 = 7\n#### 7", "... #### 7") == 1.0
    assert reward("#### 8", "#### 7") == 0.0
    assert reward("the answer is 7", "#### 7") == 0.0  # strict: no marker, no reward
    assert reward("#### 8", "#### 7", format_reward=0.1) == pytest.approx(0.1)
    assert reward("#### 7", "#### 7", format_reward=0.1) == pytest.approx(1.1)
    assert group_advantages([1, 0, 0, 0, 1, 1], 3) == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    assert group_advantages([1, 1, 0, 0], 2) == [0, 0, 0, 0]  # nothing to learn from a unanimous group
    assert solution_ids([5, 6, 2, 0, 0], eos=2, pad=0) == [5, 6, 2]
    assert solution_ids([5, 6, 7], eos=2, pad=0) == [5, 6, 7]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_weighted_loss_is_the_policy_gradient_loss(tiny_model, temperature):
    """sum over solution tokens of -advantage x log p(token), in both the packed and the padded path;
    p: the distribution sampled from at ``temperature`` (the logits divided by it)."""
    import torch

    from tinymath.lib.attention import register
    from tinymath.lib.batching import build_loss_model, pack_examples, pad_examples
    from tinymath.lib.lora import attach_lora, get_lora_config
    from tinymath.lib.model import load_base_model

    base = load_base_model(str(tiny_model), "none", dtype=torch.float32, device="cpu")
    base.set_attn_implementation(register())
    model = attach_lora(base, get_lora_config(8, 16, 0.0, "all-linear"))
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9], "weights": [0, 0, 0.5, 0.5, 0.5]},
                {"input_ids": [11, 12, 13, 14], "labels": [-100, 12, 13, 14], "weights": [0, -1.0, -1.0, -1.0]}]
    expected = 0.0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1].float()
            logp = torch.log_softmax(logits / temperature, -1)
            for pos, (label, weight) in enumerate(zip(ex["labels"][1:], ex["weights"][1:])):
                if label != -100:
                    expected += -weight * logp[pos, label].item()
        packed = build_loss_model(model, fast=True, temperature=temperature)(**pack_examples(examples)).item()
        padded = build_loss_model(model, fast=False, temperature=temperature)(**pad_examples(examples, pad_id=0)).item()
    assert packed == pytest.approx(expected, rel=1e-4)
    assert padded == pytest.approx(expected, rel=1e-4)
    # an unweighted loss (a validation loss on reference solutions) stays the model's own at any temperature
    plain = [{k: v for k, v in ex.items() if k != "weights"} for ex in examples]
    with torch.no_grad():
        for fast in (True, False):
            batch = pack_examples(plain) if fast else pad_examples(plain, pad_id=0)
            assert (build_loss_model(model, fast=fast, temperature=temperature)(**batch).item()
                    == pytest.approx(build_loss_model(model, fast=fast)(**batch).item(), rel=1e-6))


def test_an_update_moves_the_policy_towards_rewarded_solutions(tiny_model, gsm8k_dir, sft_run, tmp_path,
                                                               monkeypatch):
    import torch

    import tinymath.lib.grpo as grpo
    from tinymath import train
    from tinymath.base.config import resolve_train_config
    from tinymath.lib.lora import load_adapted_model
    from tinymath.base.runs import load_run

    good, bad = [40, 41, 42, 2], [50, 51, 52, 2]

    def fixed_rollout(self, questions):  # two solutions per question: one rewarded, one not
        examples, rewards = [], []
        for _ in questions:
            for solution, r in ((good, 1.0), (bad, 0.0)):
                examples.append({"input_ids": [1, 30, 31] + solution, "labels": [-100] * 3 + solution,
                                 "weights": [0.0] * 3 + [r - 0.5] * len(solution), "teaches": True})
                rewards.append(r)
        return examples, rewards

    monkeypatch.setattr(grpo.GRPOTrainer, "rollout", fixed_rollout)
    config = resolve_train_config({"method": "grpo", "init_adapter": str(sft_run), "data": str(gsm8k_dir),
                                   "out": str(tmp_path / "rl"), "samples": 2, "batch_size": 2, "lr": 0.02,
                                   "max_steps": 3})
    train(config)

    def margin(run_dir):
        model = load_adapted_model(load_run(run_dir), dtype=torch.float32, device="cpu")
        with torch.no_grad():
            logp = [torch.log_softmax(model(input_ids=torch.tensor([[1, 30, 31] + s])).logits[0, 2:-1], -1)
                    .gather(1, torch.tensor(s[:-1])[:, None]).sum().item() for s in (good, bad)]
        return logp[0] - logp[1]

    assert margin(tmp_path / "rl") > margin(sft_run) + 0.5


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_the_loss_of_a_run_is_taken_at_its_sampling_temperature(gsm8k_dir, sft_run, tmp_path, monkeypatch,
                                                                temperature):
    """A run's first-step loss: the solution tokens' -advantage x log-probability under the starting
    adapter's logits divided by --temperature (the distribution they were sampled from), per token."""
    import torch

    import tinymath.lib.grpo as grpo
    from tinymath.base.runs import load_run
    from tinymath.lib.lora import load_adapted_model

    prompt, solutions = [1, 30, 31], {1.0: [40, 41, 42, 2], 0.0: [50, 51, 52, 2]}

    def fixed_rollout(self, questions):
        examples = [{"input_ids": prompt + s, "labels": [-100] * 3 + s, "weights": [0.0] * 3 + [r - 0.5] * len(s),
                     "teaches": True} for _ in questions for r, s in solutions.items()]
        return examples, [r for _ in questions for r in solutions]

    monkeypatch.setattr(grpo.GRPOTrainer, "rollout", fixed_rollout)
    out = tmp_path / "rl"
    result = run_cli("train", "--method", "grpo", "--init-adapter", sft_run, "--data", gsm8k_dir, "--batch-size", "1",
                     "--samples", "2", "--max-steps", "1", "--temperature", str(temperature), "--out", out, "--json")
    assert result.exit_code == 0, result.output
    model = load_adapted_model(load_run(sft_run), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        total = 0.0
        for r, s in solutions.items():
            logits = model(input_ids=torch.tensor([prompt + s])).logits[0, 2:-1].float()
            total += -(r - 0.5) * torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(s)[:, None]).sum()
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(total.item() / 8, abs=2e-4)


def test_a_run_that_learned_nothing_says_so(gsm8k_dir, sft_run, tmp_path, monkeypatch):
    """Every sample scored the same (a model that never answers right): no step had anything to
    learn, and the closing line says the adapter is unchanged."""
    import tinymath.lib.grpo as grpo

    monkeypatch.setattr(grpo, "reward", lambda text, gold, format_reward=0.0: 0.0)
    result = run_cli("train", "--method", "grpo", "--init-adapter", sft_run, "--data", gsm8k_dir, *RL,
                     "--max-steps", "2", "--out", tmp_path / "rl")
    assert result.exit_code == 0, result.output
    assert "so the adapter is unchanged" in " ".join(result.output.split())
    assert json.loads((tmp_path / "rl" / "run.json").read_text())["result"]["learning_steps"] == 0


def test_a_zero_advantage_in_a_mixed_group_still_counts_in_the_normaliser(gsm8k_dir, sft_run, tmp_path,
                                                                        monkeypatch):
    """Rewards 0, 1.5, 0.5, 0 (a format reward of 0.5): the third solution's advantage is exactly 0,
    but its group teaches, so its tokens count in the step's normaliser (all 8 solution tokens)."""
    import tinymath.lib.grpo as grpo

    scores = {"a": 0.0, "b": 1.5, "c": 0.5, "d": 0.0}

    def sample(self, prompts, settings):
        texts = ["abcd"[i % 4] for i in range(len(prompts))]
        return [[40 + i % 4, self.tokenizer.eos_token_id] for i in range(len(prompts))], texts

    monkeypatch.setattr(grpo, "reward", lambda text, gold, format_reward=0.0: scores[text])
    monkeypatch.setattr(grpo.GRPOTrainer, "sample", sample)
    out = tmp_path / "rl"
    result = run_cli("train", "--method", "grpo", "--init-adapter", sft_run, "--data", gsm8k_dir, "--batch-size", "1",
                     "--samples", "4", "--max-new-tokens", "4", "--max-steps", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["learning_tokens"] == 8


def test_grpo_run_folder_resume_eval_and_merge(tiny_model, gsm8k_dir, sft_run, tmp_path, varied_rewards):
    out = tmp_path / "rl"
    args = ("train", "--method", "grpo", "--init-adapter", sft_run, "--data", gsm8k_dir, *RL, "--lr", "0.01",
            "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "3", "--json")
    result = run_cli(*args, "--out", out)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "grpo" and run["samples"] == 3 and run["init_adapter"] == str(sft_run)
    assert run["model"] == str(tiny_model) and run["lora_r"] == 8  # taken from the SFT run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"reward", "groups_solved", "generated_tokens", "generation_s", "update_s"} <= r.keys() for r in rows)
    assert any(r["loss"] != 0 for r in rows)  # mixed rewards: the policy was updated
    assert run["result"]["first_step_seconds"] >= rows[0]["generation_s"]  # a step's sampling is part of it
    assert run["result"]["reward_window_steps"] == 2  # halves of a short run, not ten steps each (all of them)
    assert run["result"]["learning_steps"] == sum(r["learning_tokens"] > 0 for r in rows) >= 1
    assert run["result"]["reward_first_steps"] == pytest.approx(sum(r["reward"] for r in rows[:2]) / 2, abs=1e-4)
    assert run["result"]["reward_last_steps"] == pytest.approx(sum(r["reward"] for r in rows[2:]) / 2, abs=1e-4)

    again = tmp_path / "again"  # resumed from step 2: the same samples, rewards and losses as straight through
    shutil.copytree(out, again)
    (again / "run.json").unlink()
    assert [p.name for p in (again / "checkpoints").iterdir()] == ["step-000002"]
    assert run_cli("train", "--resume", again, "--json").exit_code == 0
    resumed = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "reward", "generated_tokens")
    assert [r[k] for r in resumed for k in keys] == pytest.approx([r[k] for r in rows for k in keys], rel=1e-5)

    ev = run_cli("eval", "--adapter", out, "--data", gsm8k_dir, "--limit", "2", "--max-new-tokens", "4", "--json")
    assert ev.exit_code == 0, ev.output
    assert run_cli("merge-adapters", out, "--out", tmp_path / "merged", "--json").exit_code == 0


def test_keep_best_never_keeps_worse_than_the_starting_adapter(gsm8k_dir, sft_run, tmp_path, varied_rewards):
    """With --eval-every, the starting adapter is validated first (step 0): when no later step beats
    it on the held-out problems (a random model solves none), --keep best keeps the adapter the run
    started from, not the last update."""
    from tinymath.base.files import load_safetensors
    from tinymath.base.runs import ADAPTER_WEIGHTS

    out = tmp_path / "rl"
    result = run_cli("train", "--method", "grpo", "--init-adapter", sft_run, "--data", gsm8k_dir, *RL, "--lr", "0.05",
                     "--max-steps", "2", "--val-size", "2", "--eval-every", "1", "--keep", "best", "--out", out)
    assert result.exit_code == 0, result.output
    assert "the adapter kept is step 0's" in " ".join(result.stdout.split())  # the report says what ships
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val_accuracy" in r) for r in rows] == [(0, True), (1, True), (2, True)]
    summary = json.loads((out / "run.json").read_text())["result"]
    assert summary["best_step"] == 0 and summary["adapter_step"] == 0
    start, kept = load_safetensors(sft_run / ADAPTER_WEIGHTS), load_safetensors(out / ADAPTER_WEIGHTS)
    assert any(r.get("loss") for r in rows)  # the policy did move...
    assert start.keys() == kept.keys() and all((start[k] == kept[k]).all() for k in start)  # ...and was not kept


def test_calculator_rollouts_in_rounds_learn_the_tokens_the_policy_read(tiny_model, monkeypatch):
    """With --calculator, where the decode loop does not run, a solution is sampled through the
    calculator's rounds, and what is trained on is exactly what the policy read: its own tokens (not
    its text encoded again) with the calculator's result between them, then EOS only where the
    policy wrote it: not where EOS was padding (pad == EOS, as in SmolLM2's tokenizer, after the
    row stopped at ``<<3+4=``), nor after a solution cut at the token limit."""
    from types import SimpleNamespace

    import torch

    import tinymath.lib.generate as generate
    from tinymath.lib.generate import GenerationSettings, result_tokens
    from tinymath.lib.grpo import GRPOTrainer
    from tinymath.lib.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    call = tok.convert_tokens_to_ids(list("Half")) + tok(" <<3+4=", add_special_tokens=False).input_ids  # letter by letter
    after = tok("7\n#### 7", add_special_tokens=False).input_ids
    filler = tok(" and so on" * 8, add_special_tokens=False).input_ids[:24]
    rounds = []

    def scripted(inference, prompts, settings, update=lambda advance=1: None, stopping=None):
        rounds.append([list(p) for p in prompts])
        if len(rounds) == 1:  # the first row stops at "<<3+4=" and is padded while the second runs on
            return [torch.tensor(call + [eos] * (24 - len(call))), torch.tensor(filler)]
        return [torch.tensor(after + [eos])]

    monkeypatch.setattr(generate, "generate_ids", scripted)
    monkeypatch.setattr(generate, "decodes_own", lambda model, settings, prompts: False)  # (as on a CPU)
    trainer = SimpleNamespace(tokenizer=tok, policy=SimpleNamespace(model=None), config=SimpleNamespace(calculator=True),
                              data_settings={"format": "chat", "system_prompt": None})
    ids, texts = GRPOTrainer.sample(trainer, [[1, 2], [1, 3]], GenerationSettings(max_new_tokens=24))
    written = result_tokens(tok, "7")
    assert rounds[1] == [[1, 2] + call + written]
    assert ids[0] == call + written + after + [eos]
    assert texts[0] == "Half <<3+4=7>>7\n#### 7"
    assert ids[1] == filler  # cut at 24 tokens: no EOS


def test_calculator_rollouts_through_the_decode_loop_learn_the_tokens_it_decoded(tiny_model, monkeypatch):
    """Where the decode loop runs (a GPU), a --calculator solution's ids are the tokens the policy
    read as it decoded, the calculator's included: what it is trained on is what it sampled."""
    from types import SimpleNamespace

    import tinymath.lib.generate as generate
    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.generate import GenerationSettings, load_for_inference
    from tinymath.lib.grpo import GRPOTrainer

    inference = load_for_inference(model=str(tiny_model))
    tok = inference.tokenizer
    prompts = [encode_prompt(tok, build_prompt(tok, q, "chat")) for q in ("What is 3 + 4?", "What is 5 + 6?")]
    written = tok("7>>", add_special_tokens=False).input_ids

    class Tool:  # every token a trigger, but only the first call writes
        triggers, calls = frozenset(range(len(tok))), []

        def __call__(self, row, ids):
            self.calls.append(row)
            return written if len(self.calls) == 1 else []

    monkeypatch.setattr(generate, "CalculatorTool", lambda tokenizer: Tool())
    trainer = SimpleNamespace(tokenizer=tok, policy=SimpleNamespace(model=inference.model),
                              config=SimpleNamespace(calculator=True), data_settings={"format": "chat",
                                                                                      "system_prompt": None})
    ids, texts = GRPOTrainer.sample(trainer, prompts, GenerationSettings(max_new_tokens=8, static_cache=True))
    assert sum(row[1:1 + len(written)] == written for row in ids) == 1  # after the first token, the tool's
    assert [tok.decode(row, skip_special_tokens=True) for row in ids] == texts


def test_grpo_with_the_calculator_runs_and_later_commands_use_it(gsm8k_dir, sft_run, tmp_path):
    out = tmp_path / "rl"
    result = run_cli("train", "--method", "grpo", "--init-adapter", sft_run, "--data", gsm8k_dir, *RL, "--max-steps", "1",
                     "--calculator", "--val-size", "2", "--eval-every", "1", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["calculator"] is True
    # later commands answer as the run was trained: with the calculator, unless told otherwise
    for flags, expected in (((), True), (("--no-calculator",), False)):
        ev = run_cli("eval", "--adapter", out, "--data", gsm8k_dir, "--limit", "1", "--max-new-tokens", "4", *flags,
                     "--json")
        assert ev.exit_code == 0, ev.output
        assert json.loads(ev.output)["settings"]["calculator"] is expected
    assert run_cli("merge-adapters", out, "--out", tmp_path / "merged").exit_code == 0
    assert json.loads((tmp_path / "merged" / "tinymath.json").read_text())["calculator"] is True
    refused = run_cli("train", "--data", gsm8k_dir, "--calculator", "--out", tmp_path / "sft")
    assert refused.exit_code != 0 and "--method grpo" in refused.output and not (tmp_path / "sft").exists()


def test_grpo_refusals(tiny_model, gsm8k_dir, sft_run, tmp_path):
    def refused(*extra):
        out = tmp_path / "rl"
        result = run_cli("train", "--method", "grpo", "--data", gsm8k_dir, "--out", out, *RL, "--max-steps", "1",
                         *extra)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert not out.exists()
        return result.stderr

    def refused_data(data, *extra):
        result = run_cli("train", "--method", "grpo", "--data", data, "--init-adapter", sft_run, "--out",
                         tmp_path / "rl", *RL, "--max-steps", "1", *extra)
        assert result.exit_code == 1 and not (tmp_path / "rl").exists()
        return " ".join(result.stderr.split())

    assert "at least 2" in refused("--init-adapter", sft_run, "--samples", "1")
    assert "not a tinymath training run" in refused("--init-adapter", tmp_path)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert "that run has model" in refused("--init-adapter", sft_run, "--model", other)
    before = sorted(p.name for p in Path(sft_run).iterdir())
    itself = run_cli("train", "--method", "grpo", "--data", gsm8k_dir, "--init-adapter", sft_run, "--out", sft_run,
                     "--overwrite", *RL, "--max-steps", "1")  # would replace the adapter it starts from
    assert itself.exit_code == 1 and "is the run --init-adapter starts from" in itself.stderr
    assert sorted(p.name for p in Path(sft_run).iterdir()) == before
    prep = tmp_path / "prep-instruction"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", json.loads((Path(sft_run) / "run.json").read_text())
                   ["model"], "--format", "instruction", "--out", prep).exit_code == 0
    mismatch = run_cli("train", "--method", "grpo", "--data", prep, "--init-adapter", sft_run, "--out",
                       tmp_path / "rl", *RL, "--max-steps", "1")  # no --format given: the run's prompt is meant
    assert mismatch.exit_code == 1 and "was prepared with format instruction, but --init-adapter" in mismatch.stderr
    prep = tmp_path / "prep-run-format"  # a length of the user's own is theirs, not the run's
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", json.loads((Path(sft_run) / "run.json").read_text())
                   ["model"], "--out", prep).exit_code == 0
    assert "--max-length 300 contradicts the prepared data" in refused_data(prep, "--max-length", "300")
    run_model = json.loads((Path(sft_run) / "run.json").read_text())["model"]
    relative = os.path.relpath(run_model)  # the run's own base, given relative: no clash
    dry = run_cli("train", "--method", "grpo", "--init-adapter", sft_run, "--model", relative, "--data", gsm8k_dir,
                  "--out", tmp_path / "x", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert "--method grpo" in run_cli("train", "--init-adapter", sft_run, "--data", gsm8k_dir, "--out",
                                      tmp_path / "x", "--dry-run").stderr
    assert "which --no-compile turns off" in " ".join(refused("--init-adapter", sft_run, "--compile-steps",
                                                              "--no-compile").split())
    sft = run_cli("train", "--data", gsm8k_dir, "--out", tmp_path / "x", "--samples", "4", "--temperature", "0.7")
    assert sft.exit_code == 1 and "--samples, --temperature: reinforcement-learning settings" in sft.stderr


def test_grpo_refuses_a_model_with_another_tokenizer(gsm8k_dir, sft_run, tmp_path):
    """The run's base was replaced by a model with another tokenizer: one message, nothing written."""
    from transformers import AutoTokenizer

    copy = shutil.copytree(sft_run, tmp_path / "sft")
    tokenizer = AutoTokenizer.from_pretrained(copy)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    tokenizer.save_pretrained(copy)
    out = tmp_path / "rl"
    result = run_cli("train", "--method", "grpo", "--init-adapter", copy, "--data", gsm8k_dir, "--out", out, *RL,
                     "--max-steps", "1")
    assert result.exit_code == 1 and "another tokenizer" in result.stderr, result.output
    assert not out.exists()


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_the_sampling_copy_computes_what_the_policy_computes(tiny_model, quant):
    """Solutions are sampled from a plain merged copy of the policy: it must give the policy's
    logits (NF4 base dequantized, adapter merged), also after an update changed the adapter."""
    import torch

    from tinymath.lib.grpo import PolicyCopy
    from tinymath.lib.lora import attach_lora, get_lora_config
    from tinymath.lib.model import load_base_model

    torch.manual_seed(0)
    base = load_base_model(str(tiny_model), quant, dtype=torch.float32, device="cpu")
    policy = attach_lora(base, get_lora_config(8, 16, 0.0, "all-linear")).eval()
    copy = PolicyCopy(policy, str(tiny_model), torch.float32, "cpu")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])

    def gap():
        with torch.no_grad():
            return (policy(input_ids=ids).logits - copy.model(input_ids=ids).logits).abs().max().item()

    assert gap() < 1e-4
    with torch.no_grad():  # an update: the adapter moves
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.1)
    assert gap() > 1e-2  # the copy is stale until synced
    copy.sync()
    assert gap() < 1e-4


def test_unanimous_groups_get_exactly_zero_advantage():
    from tinymath.lib.grpo import group_advantages

    assert group_advantages([0.1] * 8, 8) == [0.0] * 8  # no float noise left to train on


def test_grpo_defaults_and_what_overrides_them(sft_run, gsm8k_dir):
    from tinymath.base.config import resolve_train_config

    grpo = resolve_train_config({"method": "grpo", "init_adapter": str(sft_run), "data": str(gsm8k_dir)})
    assert (grpo.lr, grpo.batch_size, grpo.max_steps, grpo.warmup, grpo.temperature) == (1e-4, 32, 200, 0.0, 0.7)
    assert resolve_train_config({"method": "grpo", "epochs": 1.0}).max_steps is None  # asked in epochs
    assert resolve_train_config({"method": "grpo", "lr": 5e-5}).lr == 5e-5  # a flag wins
    assert resolve_train_config({}).lr == 1e-3 and resolve_train_config({}).max_steps is None  # SFT unchanged


def test_grpo_with_compiled_decode_steps(gsm8k_dir, sft_run, tmp_path, varied_rewards):
    """--compile-steps: the sampling's decode steps compiled (recorded in run.json, the seconds in
    its result), and the run learns as usual."""
    out = tmp_path / "rl"
    result = run_cli("train", "--method", "grpo", "--init-adapter", sft_run, "--data", gsm8k_dir, *RL, "--lr", "0.01",
                     "--max-steps", "2", "--compile-steps", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["compile_steps"] is True and run["result"]["compile_seconds"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["generated_tokens"] > 0 for r in rows)
