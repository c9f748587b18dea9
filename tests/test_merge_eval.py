"""merge-adapters and eval on the tiny model: merged output equals the adapter model's, eval writes
its files and JSON, bad input is refused cleanly."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

from tinymath import train
from tinymath.base.config import TrainConfig


@pytest.fixture(scope="module")
def trained_run(tiny_model, gsm8k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig(data=str(gsm8k_dir), model=str(tiny_model), out=str(out), quant="nf4", batch_size=4,
                      lr=3e-2, warmup=0, lora_r=8, lora_alpha=16, lora_dropout=0.0, max_steps=15))
    return out


def test_merged_model_answers_like_the_adapter_model(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.generate import (
        GenerationSettings,
        generate_batch,
        load_for_inference,
    )

    merged_dir = tmp_path / "merged"
    result = run_cli("merge-adapters", trained_run, "--out", merged_dir, "--dtype", "fp32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["max_logit_diff"] <= report["tolerance"] and report["adapter_effect"] > 10 * report["tolerance"]
    assert report["run"] == str(Path(trained_run).absolute())  # usable from any folder later
    assert report["out"] == str(merged_dir.absolute())
    assert list(merged_dir.glob("*.safetensors"))
    assert AutoModelForCausalLM.from_pretrained(merged_dir).generation_config.eos_token_id == 2

    settings = GenerationSettings(max_new_tokens=24)
    adapter_model = load_for_inference(adapter=str(trained_run))
    merged_model = load_for_inference(model=str(merged_dir))
    assert merged_model.format == adapter_model.format == "chat"
    tok = adapter_model.tokenizer
    prompts = [encode_prompt(tok, build_prompt(tok, q, "chat")) for q in
               ("Mia has 5 pencils and buys 7 more. How many pencils does she have now?", "What is 3 + 4?")]
    assert generate_batch(adapter_model, prompts, settings) == generate_batch(merged_model, prompts, settings)


def test_merge_bad_input(trained_run, tmp_path):
    result = run_cli("merge-adapters", tmp_path, "--out", tmp_path / "m")
    assert result.exit_code == 1 and "not a tinymath training run" in result.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    result = run_cli("merge-adapters", trained_run, "--out", other)
    assert result.exit_code == 1 and "--overwrite" in result.stderr
    result = run_cli("merge-adapters", trained_run, "--out", other, "--overwrite")
    assert result.exit_code == 1 and "replaces only those" in result.stderr
    assert (other / "config.json").read_text() == "{}"
    result = run_cli("merge-adapters", other, "--out", tmp_path / "m")  # a model folder, not a run
    assert result.exit_code == 1 and "already standalone: eval and chat take it as --model" in result.stderr
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints" / "step-000002").mkdir(parents=True)  # a run stopped before it finished
    result = run_cli("merge-adapters", stopped, "--out", tmp_path / "m")
    assert result.exit_code == 1 and f"continue it with `tinymath train --resume {stopped}`" in result.stderr


def test_missing_base_model_is_explained(trained_run, tmp_path):
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(trained_run, broken)
    run = json.loads((broken / "run.json").read_text())
    run["model"] = str(tmp_path / "gone")
    (broken / "run.json").write_text(json.dumps(run))
    result = run_cli("merge-adapters", broken, "--out", tmp_path / "m")
    assert result.exit_code == 1 and f"base model of run {broken}, {tmp_path / 'gone'}" in result.stderr
    assert f"is no longer there: put it back, or set `model` in {broken / 'run.json'}" in result.stderr


def test_a_run_without_its_tokenizer_is_named_as_a_run(trained_run, gsm8k_dir, tmp_path):
    """Not "a training run given as --model: take it as --adapter" to someone who did."""
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(trained_run, broken)
    (broken / "tokenizer_config.json").unlink()
    for command in (["eval", "--adapter", broken, "--data", gsm8k_dir, "--limit", 1], ["merge-adapters", broken, "--out", tmp_path / "m"]):
        result = run_cli(*command)
        assert result.exit_code == 1 and f"the run {broken} has no tokenizer_config.json" in result.stderr, \
            result.output


def test_eval_writes_predictions_and_summary(trained_run, gsm8k_dir, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    monkeypatch.chdir(gsm8k_dir.parent)  # --data given relative: the summary records where it is
    result = run_cli("eval", "--adapter", trained_run, "--data", gsm8k_dir.name, "--split", "test", "--limit", 2,
                     "--max-new-tokens", 16, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing but the summary on stdout
    assert summary["n"] == 2 and 0 <= summary["accuracy"] <= 1
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["settings"]["data"] == str(gsm8k_dir.absolute())  # readable from any folder
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["question"][:3] for r in rows] == ["Sam", "A p"]
    assert {"question", "gold", "completion", "extracted", "correct"} <= set(rows[0])
    assert summary["correct"] == sum(r["correct"] for r in rows)
    # where the time went: 2 problems decode with plain `generate` (nothing compiled or captured)
    assert summary["compile_seconds"] == 0 and summary["graph_capture_seconds"] == 0
    assert summary["decoding"] == {"replayed_steps": 0, "eager_steps": 0, "failed_captures": 0}
    # --compile: tinymath's decode loop (on CPU its steps run eagerly), and the summary says so
    fast = run_cli("eval", "--adapter", trained_run, "--data", gsm8k_dir, "--split", "test", "--limit", 2,
                   "--max-new-tokens", 16, "--compile", "--json")
    assert fast.exit_code == 0, fast.output
    decoding = json.loads(fast.stdout)["decoding"]
    assert decoding["eager_steps"] > 0 and decoding["replayed_steps"] == 0


def test_a_runs_merged_model_is_kept_for_the_next_eval(trained_run, gsm8k_dir, tmp_path, monkeypatch):
    """The second eval of a run loads the merged weights the first one kept (same answers, no merge);
    another merge or another adapter is another entry, and only the most recent are kept."""
    import shutil

    import tinymath.lib.lora as lora

    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))
    kept = tmp_path / "cache" / "merged"

    def evaluate(run, out, *flags):
        result = run_cli("eval", "--adapter", run, "--data", gsm8k_dir, "--split", "test", "--limit", 3,
                         "--max-new-tokens", 16, "--out", tmp_path / out, *flags, "--json")
        assert result.exit_code == 0, result.output
        return [json.loads(line)["completion"] for line in (tmp_path / out / "predictions.jsonl").open()]

    first = evaluate(trained_run, "a")
    assert len(list(kept.iterdir())) == 1
    with monkeypatch.context() as patch:
        patch.setattr(lora, "load_adapted_model", lambda *a, **k: pytest.fail("merged again"))
        assert evaluate(trained_run, "b") == first
    (oldest,) = kept.iterdir()
    weights = oldest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # damaged (a disk that filled up): merged again
    assert evaluate(trained_run, "b2") == first
    assert weights.stat().st_size > 1000 and not [p for p in kept.iterdir() if p.name.startswith(".")]
    evaluate(trained_run, "c", "--merge-base", "original")
    other = tmp_path / "other_run"
    shutil.copytree(trained_run, other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2  # a different adapter
    (other / "adapter_config.json").write_text(json.dumps(config))
    assert evaluate(other, "d") != first
    assert len(list(kept.iterdir())) == lora.MERGED_KEPT and not oldest.exists()


def test_kept_merge_computes_what_a_fresh_merge_computes_in_16_bits(trained_run, tmp_path, monkeypatch):
    """On a GPU the merge is 16-bit: the run's first eval (merging in memory) and the next (loading
    the kept weights) must compute the same logits, so score the same problems. The rotary
    frequencies stay in fp32 in both (as training had them), not rounded to 16 bits by the cast."""
    import torch

    from tinymath.base.runs import load_run
    from tinymath.lib.lora import load_merged_model

    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))
    run = load_run(trained_run)
    fresh = load_merged_model(run, dtype=torch.bfloat16, device="cpu")
    kept = load_merged_model(run, dtype=torch.bfloat16, device="cpu")  # from the cache this time
    for model in (fresh, kept):
        assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("inv_freq"))
    ids = torch.tensor([list(range(5, 45))])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, kept(input_ids=ids).logits)


def test_eval_scores_known_completions():
    from tinymath.lib.scoring import score, wilson_interval

    scored = score(["#### 13", "the answer is 40", "no idea"], ["#### 13", "#### 40", "#### 37.5"])
    s = scored["summary"]
    assert s["accuracy"] == pytest.approx(2 / 3) and s["accuracy_strict"] == pytest.approx(1 / 3)
    assert s["invalid_rate"] == pytest.approx(1 / 3)
    low, high = wilson_interval(0, 10)
    assert low == 0 and 0.25 < high < 0.32


def test_eval_bad_input(tiny_model, gsm8k_dir, tmp_path):
    result = run_cli("eval", "--adapter", tmp_path, "--data", gsm8k_dir)
    assert result.exit_code == 1 and "not a tinymath training run" in result.stderr
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for command in (["eval", "--adapter", tmp_path / "model.gguf", "--data", gsm8k_dir],
                    ["merge-adapters", tmp_path / "model.gguf", "--out", tmp_path / "m"]):
        result = run_cli(*command)  # a model file where a run belongs: not "does not exist"
        assert result.exit_code == 1 and "eval and chat take it as --model" in " ".join(result.stderr.split())
    (tmp_path / "run").mkdir()  # a run's adapter file given for the run: the folder is meant
    for name in ("run.json", "adapter_model.safetensors"):
        (tmp_path / "run" / name).write_text("{}")
    result = run_cli("eval", "--adapter", tmp_path / "run" / "adapter_model.safetensors", "--data", gsm8k_dir)
    assert result.exit_code == 1 and f"give the folder that holds it ({tmp_path / 'run'})" in result.stderr
    (tmp_path / "starting").mkdir()  # a run in its first steps: its settings written, no checkpoint yet
    (tmp_path / "starting" / "train_config.json").write_text("{}")
    result = run_cli("eval", "--adapter", tmp_path / "starting", "--data", gsm8k_dir)
    assert result.exit_code == 1 and "has not finished and has no checkpoint yet" in result.stderr
    result = run_cli("eval", "--model", tmp_path / "starting", "--data", gsm8k_dir)  # also not a model
    assert result.exit_code == 1 and "is a tinymath training run (a LoRA adapter), not a model" in result.stderr
    (tmp_path / "run" / "checkpoints").mkdir()  # finished (run.json), checkpoints kept, adapter files lost:
    result = run_cli("eval", "--adapter", tmp_path / "run", "--data", gsm8k_dir)  # not "continue it with --resume"
    assert result.exit_code == 1 and "is a finished training run missing adapter_config.json" in result.stderr
    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 0)
    assert result.exit_code == 1 and "--limit 0" in result.stderr
    result = run_cli("eval", "--model", tmp_path / "nothing", "--data", gsm8k_dir)
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_batched_generation_equals_plain_generate(tiny_model):
    """The eval path (length-sorted, left-padded batches) gives the same greedy text as plain
    one-at-a-time `generate` (fp32 on CPU)."""
    import torch

    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.generate import (
        GenerationSettings,
        generate_batch,
        load_for_inference,
    )

    inference = load_for_inference(model=str(tiny_model))
    tok = inference.tokenizer
    questions = ["What is 3 + 4?", "A box holds 6 eggs. How many eggs are in 4 boxes?",
                 "Leo had 30 stickers and gave away 12. How many stickers does he have left?", "Hi"]
    prompts = [encode_prompt(tok, build_prompt(tok, q, "chat")) for q in questions]
    batched = generate_batch(inference, prompts, GenerationSettings(max_new_tokens=20, batch_size=4))
    for ids, (text, n) in zip(prompts, batched):
        x = torch.tensor([ids])
        out = inference.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=20,
                                       do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        assert n == len(new)  # generated tokens (EOS included), not the batch's padding
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        assert text == tok.decode(new, skip_special_tokens=True)
    assert generate_batch(inference, [], GenerationSettings()) == []  # e.g. a process with no share


def test_padding_after_an_early_stop_is_not_counted(tiny_model):
    """A row that stopped early (stop string, calculator) is padded to the batch's length: its token
    count is what it generated, so the calculator's budget and tokens/s stay right."""
    import torch

    from tinymath.lib.generate import _decode_new
    from tinymath.lib.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    word = tok("apples", add_special_tokens=False).input_ids
    assert tok.pad_token_id != tok.eos_token_id
    padded = torch.tensor(word + [tok.pad_token_id] * 5)
    assert _decode_new(tok, padded) == ("apples", len(word))
    finished = torch.tensor(word + [tok.eos_token_id] + [tok.pad_token_id] * 4)
    assert _decode_new(tok, finished) == ("apples", len(word) + 1)


def test_eval_split_across_processes_writes_one_merged_output(tiny_model, gsm8k_dir, tmp_path):
    """`accelerate launch`-style eval (two CPU processes, gloo): each process generates its share and
    rank 0 writes one predictions file, identical to a single-process eval of the same problems."""
    import os
    import subprocess
    import sys

    common = ["eval", "--model", str(tiny_model), "--data", str(gsm8k_dir), "--split", "test", "--limit", "3",
              "--max-new-tokens", "12", "--json"]
    single = run_cli(*common, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "tinymath", *common, "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('"accuracy"') == 1  # one report, from rank 0
    two = json.loads(result.stdout)
    assert two["n"] == 3 and two["settings"]["processes"] == 2
    read = lambda d: [(r["question"], r["completion"]) for r in map(json.loads, (d / "predictions.jsonl").open())]
    assert read(tmp_path / "two") == read(tmp_path / "one")


def test_decode_attention_matches_sdpa(tiny_model):
    """The grouped decode attention eval uses gives the same logits and greedy text as transformers'
    SDPA (tiny model: 4 query heads share 2 key/value heads), with padded batches and a static cache."""
    import torch

    from tinymath.base.prompts import build_prompt, encode_prompt
    from tinymath.lib.generate import (
        GenerationSettings,
        generate_batch,
        load_for_inference,
    )

    fast = load_for_inference(model=str(tiny_model))
    assert fast.model.config._attn_implementation == "tinymath_decode"
    plain = load_for_inference(model=str(tiny_model))
    plain.model.set_attn_implementation("sdpa")
    tok = fast.tokenizer
    prompts = [encode_prompt(tok, build_prompt(tok, q, "chat")) for q in
               ("What is 3 + 4?", "Leo had 30 stickers and gave away 12. How many stickers does he have left?")]
    for static in (False, True):
        settings = GenerationSettings(max_new_tokens=24, batch_size=2, static_cache=static)
        assert generate_batch(fast, prompts, settings) == generate_batch(plain, prompts, settings)
    x = torch.tensor([prompts[1]])
    with torch.no_grad():
        cache = plain.model(x[:, :-1], use_cache=True).past_key_values
        a = plain.model(x[:, -1:], past_key_values=cache).logits
        cache = fast.model(x[:, :-1], use_cache=True).past_key_values
        b = fast.model(x[:, -1:], past_key_values=cache).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_export_round_trip(tiny_model, gsm8k_dir, tmp_path, gguf_type):
    """The .gguf written for llama.cpp reads back (transformers' own GGUF reader) as the merged model:
    same tokenizer, same stop token; f16 gives exactly the merged weights rounded to f16 (so the
    query/key layout round-trips), q8_0 nearly the same predictions."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    assert run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", run, "--quant", "none",
                   "--max-steps", 2, "--batch-size", 2).exit_code == 0
    result = run_cli("merge-adapters", run, "--out", tmp_path / "merged", "--dtype", "fp32", "--gguf", gguf_type,
                     "--json")
    assert result.exit_code == 0, result.output
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "merged" / f"model-{gguf_type}.gguf", alone)
    back = AutoModelForCausalLM.from_pretrained(alone, gguf_file=f"model-{gguf_type}.gguf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=f"model-{gguf_type}.gguf")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    reference = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = "Tom has 12 apples and buys 30 more. How many? #### 42"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer.eos_token == reference.eos_token == "<|im_end|>"
    ids = torch.tensor([reference(text).input_ids])
    with torch.no_grad():
        if gguf_type == "f16":  # the same rounding as the file's (weights only: the rotary buffers stay fp32)
            for p in merged.parameters():
                p.copy_(p.half().float())
        expected, got = merged(input_ids=ids).logits, back(input_ids=ids).logits
    if gguf_type == "f16":
        assert (got - expected).abs().max().item() < 1e-4
    else:
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8
    # tinymath reading the file where merge-adapters wrote it, beside the merged folder's own
    # tokenizer files: the GGUF's tokenizer, with its EOS and chat template
    from tinymath.lib.model import load_tokenizer

    beside = load_tokenizer(str(tmp_path / "merged" / f"model-{gguf_type}.gguf"))
    assert beside.eos_token == "<|im_end|>" and beside.chat_template
    assert beside(text).input_ids == reference(text).input_ids
    if gguf_type == "f16":  # the report names the files written for llama.cpp and Ollama
        shown = run_cli("merge-adapters", run, "--out", tmp_path / "again", "--gguf", gguf_type)
        assert shown.exit_code == 0 and "model-f16.gguf" in shown.stdout and "Modelfile" in shown.stdout


def test_gguf_export_of_a_sentencepiece_tokenizer_round_trips(gsm8k_dir, tmp_path):
    """TinyLlama's kind of tokenizer (SentencePiece BPE with byte fallback, Llama-2's <s> and </s>;
    the fixture was trained with sentencepiece on GSM8K and converted by transformers): a run merged
    to GGUF reads back with the same token ids on GSM8K text, bytes and spaces included, the same
    stop token, and the merged weights rounded to f16."""
    import shutil

    import torch
    from conftest import FIXTURES
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "base"
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "sp_tokenizer")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = tmp_path / "run"
    trained = run_cli("train", "--data", gsm8k_dir, "--model", model_dir, "--out", run, "--quant", "none",
                      "--max-steps", 2, "--batch-size", 2)
    assert trained.exit_code == 0, trained.output
    merged = run_cli("merge-adapters", run, "--out", tmp_path / "merged", "--dtype", "fp32", "--gguf", "f16")
    assert merged.exit_code == 0, merged.output
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "merged" / "model-f16.gguf", alone)
    back = AutoTokenizer.from_pretrained(alone, gguf_file="model-f16.gguf")
    reference = AutoTokenizer.from_pretrained(tmp_path / "merged")
    texts = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"]
             for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]
    texts += ["ünïcode 😀, tabs\tand  double  spaces", "48/2 = 24 #### 72"]
    assert [back(t).input_ids for t in texts] == [reference(t).input_ids for t in texts]
    assert back.eos_token == reference.eos_token == "</s>"
    model = AutoModelForCausalLM.from_pretrained(alone, gguf_file="model-f16.gguf", dtype=torch.float32)
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([reference(texts[0]).input_ids])
    with torch.no_grad():
        for p in expected.parameters():
            p.copy_(p.half().float())
        assert (model(input_ids=ids).logits - expected(input_ids=ids).logits).abs().max().item() < 1e-4


def test_gguf_export_refuses_other_architectures(tiny_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tinymath.base.errors import TinymathError
    from tinymath.lib.gguf_export import check_exportable
    from tinymath.lib.model import load_tokenizer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(TinymathError, match="Llama-architecture"):
        check_exportable(model, load_tokenizer(str(tiny_model)))


def test_gguf_export_refuses_a_system_prompt_an_ollama_modelfile_cannot_quote(tiny_model, gsm8k_dir, tmp_path):
    """Ollama ends a triple-quoted value at the first three double quotes in it: such a system prompt
    is refused before the merge, with nothing written; an ordinary one goes into the Modelfile whole."""
    from tinymath.lib.gguf_export import modelfile
    from tinymath.lib.model import load_tokenizer

    run = tmp_path / "run"
    assert run_cli("train", "--data", gsm8k_dir, "--model", tiny_model, "--out", run, "--quant", "none",
                   "--max-steps", 1, "--batch-size", 2, "--system-prompt", 'Answer """tersely""" please').exit_code == 0
    result = run_cli("merge-adapters", run, "--out", tmp_path / "merged", "--gguf", "f16")
    assert result.exit_code == 1 and 'system prompt contains """' in result.stderr, result.output
    assert "Traceback" not in result.output and not (tmp_path / "merged").exists()
    text = modelfile("m.gguf", load_tokenizer(str(tiny_model)), "chat", "Solve it \"step\" by step.\nBe brief.")
    assert 'SYSTEM """Solve it "step" by step.\nBe brief."""' in text


def test_lm_eval_backend_runs_the_harness_task(tiny_model, gsm8k_dir, tmp_path, monkeypatch, capfd):
    """eval --backend lm-eval: the harness's own gsm8k task on local files; its numbers and samples
    are written, and --compare pairs it with tinymath's own protocol. Run outside a git repository,
    nothing from git reaches the terminal."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "harness"
    result = run_cli("eval", "--backend", "lm-eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2,
                     "--max-new-tokens", 8, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["settings"]["backend"] == "lm-eval" and 0 <= summary["accuracy"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["filter"] for s in samples} == {"strict-match", "flexible-extract"}
    assert samples[0]["arguments"][0][0].count("Question:") == 6  # the harness's own 5-shot prompt
    assert "not a git repository" not in capfd.readouterr().err
    ours = tmp_path / "ours"
    assert run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2, "--max-new-tokens", 8,
                   "--protocol", "lm-eval-gsm8k", "--out", ours).exit_code == 0
    paired = run_cli("eval", "--compare", ours, out, "--json")
    assert paired.exit_code == 0, paired.output
    assert json.loads(paired.stdout)["n"] == 2


def test_gguf_export_of_query_key_biases_and_a_padded_vocabulary(tiny_model, tmp_path):
    """A Llama with attention biases and more embedding rows than tokens: the query and key biases
    are permuted into llama.cpp's rotary layout as their weights are (what convert_hf_to_gguf.py
    does), and the token list is padded to the embedding rows, as llama.cpp requires."""
    import shutil

    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinymath.lib.gguf_export import _permute, write_gguf

    source = tmp_path / "biased"
    shutil.copytree(tiny_model, source)
    config = json.loads((source / "config.json").read_text())
    config.update(attention_bias=True, vocab_size=448)
    (source / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, ignore_mismatched_sizes=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    tokenizer = AutoTokenizer.from_pretrained(source)
    path = write_gguf(model, tokenizer, source, tmp_path / "m.gguf", "f16", "biased")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    attention = model.model.layers[0].self_attn
    for name, bias, heads in (("blk.0.attn_q.bias", attention.q_proj.bias, config["num_attention_heads"]),
                              ("blk.0.attn_k.bias", attention.k_proj.bias, config["num_key_value_heads"])):
        original = bias.detach().numpy()
        assert np.allclose(tensors[name], _permute(original, heads)) and not np.allclose(tensors[name], original)
    assert np.allclose(tensors["blk.0.attn_v.bias"], attention.v_proj.bias.detach().numpy())  # not rotated
    assert len(tokenizer) < 448 and len(reader.fields["tokenizer.ggml.tokens"].data) == 448
    assert tensors["token_embd.weight"].shape[0] == 448


def test_lm_eval_backend_refuses_a_prepared_folder_before_loading(tiny_model, gsm8k_dir, tmp_path):
    """The harness reads raw GSM8K files: a prepare-data folder is one message (whether or not
    lm-eval is installed)."""
    prep = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", prep).exit_code == 0
    result = run_cli("eval", "--backend", "lm-eval", "--model", tiny_model, "--data", prep, "--limit", 2)
    assert result.exit_code == 1 and "is a prepare-data output" in result.stderr, result.output


def test_one_data_file_is_scored_whole_and_recorded_as_such(tiny_model, gsm8k_dir):
    """--data FILE: every problem in it, whatever --split says; the summary does not claim a split."""
    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir / "train.jsonl", "--split", "test",
                     "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["settings"]["split"] is None
    assert summary["n"] == len((gsm8k_dir / "train.jsonl").read_text().splitlines())


def test_compile_steps_from_the_command_line(tiny_model, gsm8k_dir, tmp_path):
    """``eval --compile-steps``: the steps compiled (recorded, with the seconds it took) and the same
    answers; with --no-compile, one message and nothing written."""
    out = tmp_path / "never"
    result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 3, "--compile-steps",
                     "--no-compile", "--out", out)
    assert result.exit_code == 1 and "--compile-steps" in result.stderr and "--no-compile" in result.stderr
    assert "Traceback" not in result.output and not out.exists()
    summaries = []
    for extra in ((), ("--compile-steps",)):
        result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 3, "--max-new-tokens", 6,
                         "--out", tmp_path / f"ev{len(extra)}", "--json", *extra)
        assert result.exit_code == 0, result.output
        summaries.append(json.loads(result.stdout.strip().splitlines()[-1]))
    plain, compiled = summaries
    assert compiled["settings"]["compile_steps"] and not plain["settings"]["compile_steps"]
    assert compiled["compile_seconds"] > 0 == plain["compile_seconds"]
    assert compiled["decoding"]["eager_steps"] > 0  # the decode loop ran (on the CPU: no graphs)
    predictions = [(tmp_path / f"ev{i}" / "predictions.jsonl").read_text() for i in (0, 1)]
    assert predictions[0] == predictions[1]


def test_compile_steps_refused_once_the_model_shows_the_loop_cannot_run(tiny_model, gsm8k_dir, tmp_path):
    """A model whose generation config needs transformers' generate (a repetition penalty): the flag
    would be ignored, so it is refused, and nothing is written."""
    import shutil

    model = tmp_path / "penalised"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    out = tmp_path / "never"
    result = run_cli("eval", "--model", model, "--data", gsm8k_dir, "--limit", 2, "--compile-steps", "--out", out)
    assert result.exit_code == 1 and "cannot decode" in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_compile_steps_where_torch_compile_cannot_compile_is_one_message(tiny_model, gsm8k_dir, tmp_path,
                                                                        monkeypatch):
    """No working C++ compiler for Inductor's CPU code: the reason in one line, no traceback."""
    import torch._dynamo
    import torch._inductor.config as inductor

    import tinymath.lib.decode as decode
    import tinymath.lib.speed as speed

    # nothing compiled before is found: not in this process, not in a compile cache on disk
    monkeypatch.setattr(decode, "_COMPILED", [])
    monkeypatch.setattr(speed, "_USER_INDUCTOR_CACHE", None)
    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache" / "compile"))  # restored afterwards
    torch._dynamo.reset()
    try:
        with inductor.patch({"cpp.cxx": ("no-such-compiler",)}):
            result = run_cli("eval", "--model", tiny_model, "--data", gsm8k_dir, "--limit", 2, "--max-new-tokens", 4,
                             "--compile-steps", "--out", tmp_path / "ev")
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "torch.compile cannot compile the decode step" in result.stderr and "C++ compiler" in result.stderr
    assert not (tmp_path / "ev").exists()


def test_eval_without_data_reads_the_runs_own_gsm8k_not_the_hub(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """`eval --adapter RUN --split test` with no --data, offline: the GSM8K files the run's prepare-data
    folder was made from, else that folder's own test split; a split neither holds goes to the hub,
    and a hub that cannot be reached is said, with --data PATH as the way out."""
    import shutil

    import datasets

    import tinymath.lib.hub as hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(hub, "_OFFLINE_BY_US", ["huggingface.co"])  # as the probe finds it on a machine offline
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    raw, prep, run = tmp_path / "gsm8k", tmp_path / "prep", tmp_path / "run"
    shutil.copytree(gsm8k_dir, raw)
    assert run_cli("prepare-data", "--data", raw, "--model", tiny_model, "--out", prep).exit_code == 0
    trained = run_cli("train", "--data", prep, "--out", run, "--quant", "none", "--batch-size", 2, "--max-steps", 1)
    assert trained.exit_code == 0, trained.output
    result = run_cli("eval", "--adapter", run, "--split", "test", "--limit", 2, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output
    assert f"problems from {raw}, the GSM8K that {run} was trained on" in result.stdout
    shutil.rmtree(raw)  # the raw files gone: the prepare-data folder's own test split
    result = run_cli("eval", "--adapter", run, "--split", "test", "--max-new-tokens", 2, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["settings"]["data"] == str(prep) and summary["n"] == 3
    result = run_cli("eval", "--adapter", run, "--split", "test", "--max-new-tokens", 2, "--protocol", "lm-eval-gsm8k")
    assert result.exit_code == 1  # its 5 shots come from the whole train split, which prep lacks: the hub is asked
    assert "could not load --data openai/gsm8k (split test)" in " ".join(result.stderr.split())
    for split in ("validation", "tset"):  # a split prep does not hold, a typo: neither is the hub's to answer
        result = run_cli("eval", "--adapter", run, "--split", split, "--max-new-tokens", 2)
        said = " ".join(result.stderr.split())
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"--split {split}: the hub's GSM8K has the splits train and test; give --data" in said, said
    part, part_run = tmp_path / "part", tmp_path / "part-run"  # prepared with --limit: part of the test split
    shutil.copytree(gsm8k_dir, raw)
    assert run_cli("prepare-data", "--data", raw, "--model", tiny_model, "--out", part, "--limit", 1).exit_code == 0
    assert run_cli("train", "--data", part, "--out", part_run, "--quant", "none", "--batch-size", 1,
                   "--max-steps", 1).exit_code == 0
    shutil.rmtree(raw)
    result = run_cli("eval", "--adapter", part_run, "--split", "test", "--max-new-tokens", 2)  # not 1 problem of 3
    said = " ".join(result.stderr.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "could not load --data openai/gsm8k (split test) from the Hugging Face hub" in said
    assert "huggingface.co cannot be reached from this machine" in said
    assert "give --data PATH: a folder with test.jsonl, or a prepare-data output" in said


def test_a_wrong_model_choice_is_said_before_any_data_is_fetched(tiny_model, gsm8k_dir, tmp_path, monkeypatch):
    """Without --data eval would read the hub's GSM8K; a missing --model/--adapter, or a --model that is a
    run or prepare-data folder, is the mistake to name, offline too (not the unreachable hub)."""
    import datasets

    def fetched(*args, **kwargs):
        raise AssertionError("the hub's data was asked for")

    monkeypatch.setattr(datasets, "load_dataset", fetched)
    prep = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", prep).exit_code == 0
    for args, said in ((["--limit", 2], "give exactly one of --model (a model) or --adapter"),
                       (["--model", prep], f"--model {prep} is a prepare-data output (training data), not a model"),
                       (["--model", tmp_path / "typo"], f"--model {tmp_path / 'typo'} does not exist")):
        result = run_cli("eval", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert said in " ".join(result.stderr.split())


def test_prepared_data_given_as_a_run_is_named_as_data(tiny_model, gsm8k_dir, tmp_path):
    """A prepare-data folder where a training run belongs: said as such, not "missing run.json"."""
    prep = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", prep).exit_code == 0
    for command in (["eval", "--adapter", prep, "--data", gsm8k_dir], ["merge-adapters", prep, "--out", tmp_path / "m"],
                    ["train", "--method", "grpo", "--init-adapter", prep, "--data", prep, "--out", tmp_path / "rl"]):
        result = run_cli(*command)
        said = " ".join(result.stderr.split())
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"{prep} is a prepare-data output (training data), not a training run" in said
        assert "give a `tinymath train` output folder" in said and "missing run.json" not in said
    assert not (tmp_path / "m").exists() and not (tmp_path / "rl").exists()


def test_merge_says_what_was_merged_into_what(trained_run, tmp_path):
    out = tmp_path / "merged"
    result = run_cli("merge-adapters", trained_run, "--out", out)
    assert result.exit_code == 0, result.output
    base = json.loads((trained_run / "run.json").read_text())["model"]
    assert f"merged the adapter of {trained_run} into {base} -> {out}" in result.stdout
