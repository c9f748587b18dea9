"""The answer contract and the prompt/masking contract."""

import pytest

from tinymath import extract_answer, is_correct
from tinymath.base.prompts import (
    build_prompt,
    encode_example,
    encode_prompt,
    strip_calc_annotations,
)


@pytest.mark.parametrize("text, expected", [
    ("so the answer is 18.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### $1,234.50", "1234.5"),
    ("#### -7", "-7"),
    ("The total is 29.00", "29"),
    ("She pays $5.", "5"),
    ("0.50 of the cake", "0.5"),
    ("#### 12\n\nQuestion: next one\n#### 99", "12"),   # the first marker wins
    ("first 3 then 4 then 5", "5"),                     # no marker: the last number
    ("no numbers here", None),
    ("", None),
    ("It takes 5-6 hours", "6"),                       # a range's dash is not a minus sign
    ("Items:\n- 12", "12"),                            # nor a list's
    ("So the total is 30 - 12", "12"),
    ("Final answer - 42", "42"),
    ("the change is -5 degrees", "-5"),
    ("(-3)", "-3"),
    ("#### $-5", "-5"),
    ("#### -$5", "-5"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_strict_needs_the_marker():
    assert extract_answer("the answer is 7", strict=True) is None
    assert extract_answer("#### 7", strict=True) == "7"
    assert extract_answer("#### $-5", strict=True) == "-5"


@pytest.mark.parametrize("completion, gold, ok", [
    ("#### 29.00", "Janet... \n#### 29", True),
    ("#### 0.5", "0.50", True),
    ("it costs $1,000.", "#### 1000", True),
    ("#### 28", "#### 29", False),
    ("I don't know", "#### 29", False),
    ("#### 29", "no gold number", False),
])
def test_is_correct(completion, gold, ok):
    assert is_correct(completion, gold) is ok


def test_strip_calc_annotations():
    assert strip_calc_annotations("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from tinymath.lib.model import load_tokenizer

    return load_tokenizer(str(tiny_model))


def test_chat_prompt_uses_the_template(tokenizer):
    prompt = build_prompt(tokenizer, "What is 2+2?", "chat", "Be brief.")
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_instruction_prompt_is_the_seed_text(tokenizer):
    assert build_prompt(tokenizer, "What is 2+2?", "instruction") == "### Instruction:\nWhat is 2+2?\n\n### Response:\n"


def test_example_masks_the_prompt_and_learns_eos(tokenizer):
    ex = encode_example(tokenizer, "What is 2+2?", "2 + 2 = <<2+2=4>>4\n#### 4", "chat", None, 512, "strip")
    prompt_ids = encode_prompt(tokenizer, build_prompt(tokenizer, "What is 2+2?", "chat"))
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids
    assert ex["labels"][:n] == [-100] * n
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id and ex["labels"][-1] == tokenizer.eos_token_id
    # the pad token is never the learned EOS here, and annotations are stripped from the target
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "<<" not in tokenizer.decode(ex["input_ids"][n:])
    assert not ex["truncated"]


def test_keep_annotations_and_truncation(tokenizer):
    kept = encode_example(tokenizer, "Q?", "2 + 2 = <<2+2=4>>4\n#### 4", "instruction", None, 512, "keep")
    assert "<<2+2=4>>" in tokenizer.decode(kept["input_ids"])
    short = encode_example(tokenizer, "Q?", "a long answer " * 30, "instruction", None, 40, "strip")
    assert len(short["input_ids"]) == 40 and short["truncated"]
    assert short["labels"][-1] != tokenizer.eos_token_id
