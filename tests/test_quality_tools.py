"""Calculator decoding, self-consistency, the lm-eval protocol and paired comparison."""

import json

import pytest
from conftest import run_cli

from tinymath.base.calculator import calculate, pending_call


@pytest.mark.parametrize("expression, value", [
    ("48/2", "24"), ("3*4+2", "14"), ("(1+2)*3", "9"), ("10/4", "2.5"), ("1,200*2", "2400"), ("-3+5", "2"),
    ("2**10", "1024"), ("$5*3", "15"), ("1/3", "0.333333"),
    ("1-0.9-0.1", "0"), ("0.3-0.1-0.2", "0"),  # float error below zero is not "-0"
    ("-0.5*3", "-1.5"),
])
def test_calculator_computes(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "1/0", "10**100000", "9**9**9", "-(" * 40 + "1" + ")" * 40, "__import__('os')", "a+1", "2" * 300, "", "1e400*1e400",
])
def test_calculator_refuses_without_crashing(expression):
    assert calculate(expression) is None


def test_pending_call():
    assert pending_call("so 48/2 = <<48/2=") == "48/2"
    assert pending_call("<<48/2=24>>24 and") is None
    assert pending_call("x = 3") is None


def test_self_consistency_scores():
    from tinymath.lib.scoring import self_consistency

    result = self_consistency([["#### 5", "#### 5", "#### 6"], ["#### 1", "#### 2", "no idea"]], ["#### 5", "#### 2"])
    s = result["summary"]
    assert s["maj_at_k"] == 0.5 and s["pass_at_k"] == 1.0
    assert s["single_sample_accuracy"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result["rows"][0]["majority"] == "5" and result["rows"][0]["votes"] == 2


def test_lm_eval_filters():
    from tinymath.lib.scoring import lm_eval_score

    golds = ["... #### 1,000", "#### 18", "#### 7"]
    s = lm_eval_score(["so #### 1,000.", "she makes $18", "the answer is 8"], golds)["summary"]
    assert s["accuracy_strict"] == pytest.approx(1 / 3)   # only the #### line counts
    assert s["accuracy"] == pytest.approx(2 / 3)          # flexible: the last number


def _fake_eval(folder, questions, correct, settings=None):
    folder.mkdir()
    with open(folder / "predictions.jsonl", "w") as f:
        for q, c in zip(questions, correct):
            f.write(json.dumps({"question": q, "gold": "#### 1", "completion": "", "correct": c}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"accuracy": sum(correct) / len(correct),
                                                     "settings": settings or {}}))


def test_paired_comparison(tmp_path):
    qs = [f"q{i}" for i in range(10)]
    _fake_eval(tmp_path / "a", qs, [i < 5 for i in range(10)])
    _fake_eval(tmp_path / "b", qs, [i >= 2 for i in range(10)])
    result = run_cli("eval", "--compare", tmp_path / "a", tmp_path / "b", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert r["accuracy_a"] == 0.5 and r["accuracy_b"] == 0.8 and r["difference"] == pytest.approx(0.3)
    assert r["only_a_correct"] == ["q0", "q1"] and len(r["only_b_correct"]) == 5
    assert r["mcnemar_p"] == pytest.approx(58 / 128)  # exact binomial, 2 vs 5 discordant pairs
    assert r["difference_ci95"][0] < 0.3 < r["difference_ci95"][1]

    _fake_eval(tmp_path / "c", [f"other{i}" for i in range(10)], [True] * 10)
    result = run_cli("eval", "--compare", tmp_path / "a", tmp_path / "c")
    assert result.exit_code == 1 and "different problems" in result.stderr


def test_comparison_names_the_generation_settings_that_differ(tmp_path):
    """Two evaluations that differ in more than the model (answer length here) say so: the gap
    measures that setting too. The model itself and the data are not named: they are the point."""
    qs = [f"q{i}" for i in range(4)]
    _fake_eval(tmp_path / "a", qs, [True, False, False, False], {"max_new_tokens": 32, "model": "base", "seed": 0})
    _fake_eval(tmp_path / "b", qs, [True, True, False, False], {"max_new_tokens": 256, "model": "run", "seed": 0})
    result = run_cli("eval", "--compare", tmp_path / "a", tmp_path / "b", "--json")
    assert json.loads(result.stdout)["settings_differ"] == {"max_new_tokens": [32, 256]}
    result = run_cli("eval", "--compare", tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 0 and "also differ in max_new_tokens (32 vs 256)" in " ".join(result.stdout.split())
    _fake_eval(tmp_path / "c", qs, [True] * 4, {"max_new_tokens": 32, "temperature": None})  # None: greedy
    _fake_eval(tmp_path / "h", qs, [True] * 4, {"backend": "lm-eval", "max_new_tokens": 32})  # the harness's
    result = run_cli("eval", "--compare", tmp_path / "c", tmp_path / "a", "--json")
    assert json.loads(result.stdout)["settings_differ"] == {}
    result = run_cli("eval", "--compare", tmp_path / "a", tmp_path / "h", "--json")
    assert json.loads(result.stdout)["settings_differ"] == {"backend": ["tinymath", "lm-eval"]}
    # lm-eval's prompt ignores the format recorded: the protocol is the difference, not a "chat vs none"
    _fake_eval(tmp_path / "p", qs, [True] * 4, {"protocol": "lm-eval-gsm8k", "format": "chat", "max_new_tokens": 32})
    _fake_eval(tmp_path / "q", qs, [True] * 4, {"backend": "lm-eval", "format": None, "max_new_tokens": 32})
    result = run_cli("eval", "--compare", tmp_path / "p", tmp_path / "q", "--json")
    assert json.loads(result.stdout)["settings_differ"] == {"backend": ["tinymath", "lm-eval"]}
    result = run_cli("eval", "--compare", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "cmp")
    assert result.exit_code == 1 and "does not use --out: drop it" in result.stderr and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("args, message", [
    (["--compare", "A", "B", "--samples", "3", "--limit", "1"], "does not use --limit, --samples"),
    (["--model", "M", "--task", "retention", "--no-calculator"], "does not use --no-calculator"),  # as typed
    (["--model", "M", "--protocol", "lm-eval-gsm8k", "--format", "chat"], "does not use --format"),
    (["--model", "M", "--merge-base", "original"], "with --model there is nothing to merge"),
    (["--adapter", "A", "--quant", "nf4"], "an --adapter run is merged into its base (--merge-base): drop --quant"),
    (["--model", "M", "--base", "M"], "does not use --base"),
    (["--task", "retention", "--adapter", "A", "--calculator", "--split", "train"], "does not use --split, --calculator"),
    (["--backend", "lm-eval", "--model", "M", "--temperature", "0.5"], "does not use --temperature"),
])
def test_eval_refuses_options_the_evaluation_would_not_use(args, message):
    """Said before anything is read (A, B and M need not exist), as train refuses RL-only flags."""
    result = run_cli("eval", *args)
    assert result.exit_code == 1 and message in " ".join(result.stderr.split()), result.output


def test_sampling_and_protocol_runs(tiny_model, gsm8k_dir, tmp_path):
    from tinymath import is_correct

    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2, "--max-new-tokens", 8,
                     "--samples", 3, "--temperature", 1.0, "--json", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert [len(r["completions"]) for r in rows] == [3, 3]
    assert len({c for r in rows for c in r["completions"]}) > 1  # sampled, not greedy
    assert s["pass_at_k"] == sum(any(is_correct(c, r["gold"]) for c in r["completions"]) for r in rows) / 2
    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2, "--samples", 3)
    assert result.exit_code == 1 and "--temperature" in result.stderr
    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2, "--samples", 3,
                     "--temperature", 0.7, "--protocol", "lm-eval-gsm8k")  # lm-eval scores one greedy answer
    assert result.exit_code == 1 and "--protocol lm-eval-gsm8k" in result.stderr
    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2, "--max-new-tokens", 8,
                     "--protocol", "lm-eval-gsm8k", "--json")
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)["settings"]
    assert settings["protocol"] == "lm-eval-gsm8k" and settings["format"] is None  # its own plain-text prompt
    shown = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2, "--max-new-tokens", 8,
                    "--samples", 3, "--temperature", 1.0).stdout
    assert "maj@3 accuracy" in shown and "pass@3" in shown  # the table names the figure --json calls maj_at_k


def test_lm_eval_prompt_is_five_shot(tiny_model, gsm8k_dir):
    from tinymath.lib.gsm8k import read_gsm8k
    from tinymath.lib.model import load_tokenizer
    from tinymath.lib.scoring import lm_eval_prompts

    tok = load_tokenizer(str(tiny_model))
    rows = read_gsm8k(str(gsm8k_dir), "test")
    text = tok.decode(lm_eval_prompts(tok, rows[:1], read_gsm8k(str(gsm8k_dir), "train"))[0])
    assert text.count("Question:") == 6 and text.endswith(f"Question: {rows[0]['question']}\nAnswer:")
    # the harness's sampler: one Random(1234), 5 train examples drawn per problem, in problem order
    import random

    train = read_gsm8k(str(gsm8k_dir), "train")
    rng = random.Random(1234)
    for prompt, row in zip(lm_eval_prompts(tok, rows, train), rows):
        shots = rng.sample(train, 5)
        expected = "\n\n".join(f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots)
        assert tok.decode(prompt) == f"{expected}\n\nQuestion: {row['question']}\nAnswer:"


@pytest.mark.parametrize("which", ["byte-level BPE", "SentencePiece"])
def test_the_calculators_result_reads_as_part_of_the_annotation(tiny_model, which):
    """The tokens the decode loop writes after ``<<48/2=`` decode to ``24>>`` right after it: no
    space piece, which a SentencePiece tokenizer (TinyLlama's) starts a text of its own with."""
    from conftest import FIXTURES
    from transformers import AutoTokenizer

    from tinymath.lib.generate import CalculatorTool

    tok = AutoTokenizer.from_pretrained(tiny_model if which == "byte-level BPE" else FIXTURES / "sp_tokenizer")
    ids = tok("Half of 48 is <<48/2=", add_special_tokens=False).input_ids
    written = CalculatorTool(tok)(0, ids)
    assert tok.decode(ids + written, skip_special_tokens=True) == "Half of 48 is <<48/2=24>>"
    assert CalculatorTool(tok)(0, tok("Half of 48 is 24.", add_special_tokens=False).input_ids) == []


def test_calculator_rounds_keep_each_answer_within_its_own_token_budget(tiny_model, monkeypatch):
    """A round of calculator decoding runs to the largest budget left among its rows; a row that had
    used more of its --max-new-tokens keeps only what it had left (it is not lengthened by its
    batch-mates). The calculator's result counts in the budget, as in the decode loop."""
    import torch

    import tinymath.lib.generate as generate

    inference = generate.load_for_inference(model=str(tiny_model))
    tok = inference.tokenizer
    word = tok(" a", add_special_tokens=False).input_ids
    first = {0: tok(" a" * 40 + " <<1+1=", add_special_tokens=False).input_ids,   # near its limit
             1: tok(" a" * 5 + " <<2+2=", add_special_tokens=False).input_ids}    # far from it
    call = tok(" <<3+4=", add_special_tokens=False).input_ids
    first[2] = word * (59 - len(call)) + call  # one token left: the result's first only
    rounds = []

    def scripted(inference, prompts, settings, update=lambda advance=1: None, stopping=None):
        rounds.append(settings.max_new_tokens)
        if len(rounds) == 1:
            return [torch.tensor(first[i]) for i in range(len(prompts))]
        return [torch.tensor(word * settings.max_new_tokens) for _ in prompts]  # no EOS: the whole budget

    monkeypatch.setattr(generate, "generate_ids", scripted)
    prompts = [[1, 2, 3], [1, 2, 4], [1, 2, 5]]
    answers = generate.generate_batch(inference, prompts, generate.GenerationSettings(max_new_tokens=60,
                                                                                      calculator=True))
    assert answers.pop() == (tok.decode(first[2] + tok("7>>", add_special_tokens=False).input_ids[:1]), 60)
    result = {i: len(tok(f"{2 * (i + 1)}>>", add_special_tokens=False).input_ids) for i in (0, 1)}
    assert rounds[1] == 60 - len(first[1]) - result[1]  # the second round ran to row 1's budget...
    for (text, used), i in zip(answers, (0, 1)):
        after = text.split(">>", 1)[1]
        assert len(tok(after, add_special_tokens=False).input_ids) <= 60 - len(first[i]) - result[i], (i, text)
        assert used == 60  # ...not row 0's


@pytest.mark.parametrize("which", ["byte-level BPE", "SentencePiece"])
def test_calculator_rounds_continue_from_the_models_own_tokens(tiny_model, monkeypatch, which):
    """After the calculator's result, the next round continues from the tokens the model wrote and
    the result's tokens, as the decode loop does, not from their text encoded again (which merges
    what the model wrote apart, and in a SentencePiece tokenizer, TinyLlama's, adds a space piece);
    and the answer keeps its space where two rounds meet."""
    from dataclasses import replace

    import torch
    from conftest import FIXTURES
    from transformers import AutoTokenizer

    import tinymath.lib.generate as generate

    inference = generate.load_for_inference(model=str(tiny_model))
    tok = AutoTokenizer.from_pretrained(tiny_model if which == "byte-level BPE" else FIXTURES / "sp_tokenizer")
    inference = replace(inference, tokenizer=tok)
    # "Half" written letter by letter (as after a newline, with no space piece), then " is <<48/2="
    first = tok.convert_tokens_to_ids(list("Half")) + tok(" is <<48/2=", add_special_tokens=False).input_ids
    clips = tok("x clips", add_special_tokens=False).input_ids[len(tok("x", add_special_tokens=False).input_ids):]
    seen = []

    def scripted(inference, prompts, settings, update=lambda advance=1: None, stopping=None):
        seen.append(prompts[0])
        return [torch.tensor(first if len(seen) == 1 else clips + [tok.eos_token_id])]

    monkeypatch.setattr(generate, "generate_ids", scripted)
    prompt = tok("Question?", add_special_tokens=False).input_ids
    [(text, used)] = generate.generate_batch(inference, [prompt], generate.GenerationSettings(max_new_tokens=60,
                                                                                              calculator=True))
    written = generate.result_tokens(tok, "24")
    assert seen[1] == prompt + first + written
    assert text == "Half is <<48/2=24>> clips"
    assert used == len(first) + len(written) + len(clips) + 1  # EOS counts, as in one round


def test_calculator_rounds_stop_at_a_long_expression_as_the_loop_does(tiny_model):
    """A round stops a row at ``<<expr=`` however many tokens the expression takes (one a digit, as
    SmolLM2 writes numbers), as the decode loop's tool, which reads the whole row, calls it."""
    import torch

    from tinymath.lib.generate import CalculatorTool, _calculator_stop
    from tinymath.lib.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    ids = tok("So the total is <<1200*0.15+300*0.25+45*3+12*4=", add_special_tokens=False).input_ids
    assert len(ids) > 30
    assert _calculator_stop(tok)(torch.tensor([ids, ids[:-1] + ids[:1]]), None).tolist() == [True, False]
    assert tok.decode(CalculatorTool(tok)(0, ids)) == "438>>"


def test_calculator_decoding_inserts_results(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """A model taught to write annotations (overfitted on the fixtures) gets its results from the
    calculator: a patched calculator's answer appears inside the annotation."""
    import tinymath.base.calculator as calc
    from tinymath import train
    from tinymath.base.config import TrainConfig
    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.decode import totals as decode_totals
    from tinymath.lib.generate import (
        GenerationSettings,
        generate_batch,
        load_for_inference,
    )

    data = tmp_path / "two.jsonl"  # two problems, learnt by heart
    data.write_text("\n".join((gsm8k_dir / "train.jsonl").read_text().splitlines()[:2]) + "\n")
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), model=str(tiny_model), out=str(run), quant="none", batch_size=2,
                      lr=3e-2, warmup=0, lora_r=16, lora_alpha=32, max_steps=60, calc_annotations="keep"))
    inference = load_for_inference(adapter=str(run))
    tok = inference.tokenizer
    question = "Mia has 5 pencils and buys 7 more. How many pencils does she have now?"
    prompts = [encode_prompt(tok, build_prompt(tok, question, "chat"))] * 2
    plain = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=40))[0][0]
    assert "<<5+7=" in plain, plain  # the model writes annotations by itself
    monkeypatch.setattr(calc, "calculate", lambda expression: "999" if expression == "5+7" else None)
    with_calc = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=40, calculator=True))
    assert all("<<5+7=999>>" in text for text, _ in with_calc), with_calc
    # tinymath's decode loop (a GPU's path) writes the results as it decodes: the same answers as the rounds
    steps = decode_totals()["eager_steps"]
    looped = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=40, calculator=True,
                                                                   static_cache=True))
    assert decode_totals()["eager_steps"] > steps  # (not the rounds)
    assert [text for text, _ in looped] == [text for text, _ in with_calc]
    # with pad == EOS (as in SmolLM2's tokenizer) a row stopped at "<<expr=" while another row goes
    # on is padded with EOS: it must still get its result and continue
    tok.pad_token = tok.eos_token
    other = encode_prompt(tok, build_prompt(tok, "Leo had 30 stickers and gave away 12.", "chat"))
    mixed = generate_batch(inference, [prompts[0], other], GenerationSettings(max_new_tokens=40, calculator=True))
    assert "<<5+7=999>>" in mixed[0][0], mixed
    assert generate_batch(inference, [prompts[0], other], GenerationSettings(max_new_tokens=40, calculator=True,
                                                                             static_cache=True))[0][0] == mixed[0][0]
