"""Retention: drift is zero for a model against itself and grows for a perturbed copy; the CLI
task, its outputs and its refusals; drift recorded while training."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model, run_cli


@pytest.fixture(scope="module")
def perturbed(tiny_model, tmp_path_factory):
    """The tiny model with noise added to every weight (a stand-in for an over-trained model)."""
    import torch
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("perturbed") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, target / name)
    return target


def test_drift_is_zero_against_itself_and_grows_with_perturbation(tiny_model, perturbed, tmp_path):
    same = run_cli("eval", "--task", "retention", "--model", tiny_model, "--base", tiny_model, "--limit", 8, "--json")
    assert same.exit_code == 0, same.output
    s = json.loads(same.stdout)
    assert s["kl"] == pytest.approx(0, abs=1e-5) and s["ppl_ratio"] == pytest.approx(1, abs=1e-4)
    assert s["top1_agreement"] == 1.0 and s["verdict"] == "kept"
    assert s["settings"]["max_new_tokens"] == 64  # retention's own default, not gsm8k's 256
    assert s["thresholds"]["kept_ppl_ratio"] == 1.2 and s["settings"]["base"] == str(Path(tiny_model).absolute())
    short = run_cli("eval", "--task", "retention", "--model", tiny_model, "--base", tiny_model, "--limit", 2,
                    "--max-new-tokens", 8, "--json")
    assert short.exit_code == 0 and json.loads(short.stdout)["settings"]["max_new_tokens"] == 8, short.output

    out = tmp_path / "ret"
    moved = run_cli("eval", "--task", "retention", "--model", perturbed, "--base", tiny_model, "--limit", 8,
                    "--out", out, "--json")
    assert moved.exit_code == 0, moved.output
    m = json.loads(moved.stdout)
    assert m["kl"] > 0.05 and m["ppl_ratio"] > 1.0 and m["top1_agreement"] < 1.0
    assert m == json.loads((out / "summary.json").read_text())
    assert "**base**" in (out / "retention.md").read_text()


def test_refusals(tiny_model, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=3)
    import json as _json

    cfg = _json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (other / "config.json").write_text(_json.dumps(cfg))
    result = run_cli("eval", "--task", "retention", "--model", tiny_model, "--base", other, "--limit", 2)
    assert result.exit_code == 1 and "is not the model that" in result.stderr
    result = run_cli("eval", "--task", "nonsense", "--model", tiny_model)
    assert result.exit_code == 2 and "gsm8k" in result.output and "retention" in result.output
    result = run_cli("eval", "--task", "retention", "--model", tiny_model, "--base", tiny_model, "--lm-eval", "hellaswag",
                     "--limit", "2")
    installed = importlib.util.find_spec("lm_eval") is not None
    # without the harness: how to install it; with it but offline: why it could not run
    assert result.exit_code == 1 and ("could not run" if installed else "pip install lm-eval") in result.stderr
    assert "Traceback" not in result.output
    result = run_cli("evaluate", "--task", "retention", "--model", tiny_model)
    assert result.exit_code == 1 and "needs --base" in result.stderr
    result = run_cli("eval", "--task", "retention", "--model", tiny_model, "--base", tmp_path / "typo", "--limit", 2)
    assert result.exit_code == 1 and f"--base {tmp_path / 'typo'} does not exist" in result.stderr


def test_retention_recorded_while_training(tiny_model, gsm8k_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", out, "--quant", "none",
                     "--batch-size", "2", "--lr", "0.05", "--max-steps", "6", "--retention-every", "3")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drift = [r["retention_kl"] for r in rows if "retention_kl" in r]
    assert len(drift) == 2 and drift[0] > 0 and drift[1] > drift[0]  # lr 0.05 moves it further from the base


def test_kl_is_base_against_tuned(tiny_model):
    """KL(base || tuned) = sum p_base (log p_base - log p_tuned), on the base's own reply tokens: checked
    against a hand computation on two fixed distributions where the two directions differ."""
    import math

    import torch

    from tinymath.lib.drift import _drift
    from tinymath.lib.model import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    vocab = len(tokenizer)
    p = torch.full((vocab,), 1e-9)
    p[:2] = torch.tensor([0.9, 0.1])
    q = torch.full((vocab,), 1e-9)
    q[:2] = torch.tensor([0.5, 0.5])
    fixed = lambda probs: lambda ids, mask: probs.log().expand(ids.shape[0], ids.shape[1], vocab)  # noqa: E731
    numbers = _drift(fixed(p), fixed(q), tokenizer, ["What is 1+1?"], [[5, 6, 7]], "chat", None, 8, "cpu")
    by_hand = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # 0.368; the other direction is 0.511
    assert numbers["kl"] == pytest.approx(by_hand, abs=1e-3)
