"""The text contract shared by train, eval and chat: prompt formats, targets and answer extraction.

Training, evaluation and chat all build prompts here, so a model is always asked a question the
way it was taught. Two formats:

- ``chat``: the tokenizer's own chat template (system / user / assistant turns); the default.
- ``instruction``: the seed's plain text, ``### Instruction:\\n{q}\\n\\n### Response:\\n``.

The answer contract (`extract_answer`, `is_correct`) is public: the first ``#### N`` marker wins
(a model that runs on into a new question is scored on its first answer); without a marker the
last number counts. Commas, ``$`` and a trailing period are ignored; numbers compare by value; a
dash is a minus sign only when it touches the number (``-5``, not a range's ``5-6`` or a list's ``- 12``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache

CALC_ANNOTATION = re.compile(r"<<[^<>]*>>")
# a minus sign only when it touches the number and follows no word or ")": "5-6 hours" and "- 12"
# (a range, a list's dash) are not negative; "$-5" and "-$5" are
_SIGN = r"(?:(?<![\w)])-(?=\$?\.?\d)|\$-(?=\.?\d))?"
_NUMBER = _SIGN + r"\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_MARKER = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


# ---------------------------------------------------------------- answers


def _canonical(number_text: str) -> str | None:
    cleaned = number_text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final numeric answer in a completion (or a GSM8K gold answer), as a canonical string.

    The first ``#### N`` wins; otherwise (unless ``strict``) the last number in the text.
    ``"#### 1,234.50"`` -> ``"1234.5"``; no number -> ``None``.
    """
    if not text:
        return None
    marker = _MARKER.search(text)
    if marker:
        return _canonical(marker.group(1))
    if strict:
        return None
    numbers = _ANY_NUMBER.findall(text)
    for candidate in reversed(numbers):
        canonical = _canonical(candidate)
        if canonical is not None:
            return canonical
    return None


def is_correct(completion: str, gold: str, strict: bool = False) -> bool:
    """True when the completion's answer equals the gold answer by value.

    ``gold`` may be a bare number or a raw GSM8K answer ending in ``#### N``.
    """
    predicted = extract_answer(completion, strict=strict)
    expected = extract_answer(gold)
    if predicted is None or expected is None:
        return False
    return Decimal(predicted) == Decimal(expected)


# ---------------------------------------------------------------- prompts


def strip_calc_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return CALC_ANNOTATION.sub("", text)


def keep_calc_annotations(text: str) -> str:
    """GSM8K's answer as it is, ``<<48/2=24>>`` annotations included."""
    return text


# what to do with GSM8K's calculator annotations: ``--calc-annotations`` name -> function
CALC_ANNOTATIONS = {"keep": keep_calc_annotations, "strip": strip_calc_annotations}


def format_target(answer: str, calc_annotations: str = "strip") -> str:
    """The text the model learns to write after the prompt (its EOS is added at tokenization)."""
    return CALC_ANNOTATIONS[calc_annotations](answer.strip())


def build_messages(question: str, system_prompt: str | None = None,
                   history: list[tuple[str, str]] | None = None) -> list[dict]:
    """Chat messages for a question, after earlier (question, reply) turns."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for user, assistant in history or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": question})
    return messages


def chat_prompt(tokenizer, question: str, system_prompt: str | None = None,
                history: list[tuple[str, str]] | None = None) -> str:
    """The tokenizer's own chat template, ending with the assistant's turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        from tinymath.base.errors import TinymathError

        raise TinymathError("this model's tokenizer has no chat template; use --format instruction")
    return tokenizer.apply_chat_template(
        build_messages(question, system_prompt, history), add_generation_prompt=True, tokenize=False
    )


def instruction_prompt(tokenizer, question: str, system_prompt: str | None = None,
                       history: list[tuple[str, str]] | None = None) -> str:
    """The seed's plain text: ``### Instruction:`` / ``### Response:`` blocks."""
    text = f"{system_prompt}\n\n" if system_prompt else ""
    for user, assistant in history or []:
        text += f"### Instruction:\n{user}\n\n### Response:\n{assistant}\n\n"
    return text + f"### Instruction:\n{question}\n\n### Response:\n"


# the prompt formats: ``--format`` name -> the function that builds a prompt
FORMATS = {"chat": chat_prompt, "instruction": instruction_prompt}


def build_prompt(tokenizer, question: str, fmt: str = "chat", system_prompt: str | None = None,
                 history: list[tuple[str, str]] | None = None) -> str:
    """The prompt text for ``question`` in format ``fmt``, ending where the model's answer begins."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {tuple(FORMATS)}")
    return FORMATS[fmt](tokenizer, question, system_prompt, history)


@lru_cache(maxsize=8)
def _tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("1").input_ids
    return bool(ids) and ids[0] == bos


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt: BOS added once if the tokenizer uses one and the template lacks it."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if _tokenizer_adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_example(tokenizer, question: str, answer: str, fmt: str = "chat",
                   system_prompt: str | None = None, max_length: int = 512,
                   calc_annotations: str = "strip") -> dict:
    """One training example: ``input_ids`` and ``labels`` (-100 on the prompt, so the loss covers
    only the answer and its EOS, which is learned), plus whether it was truncated."""
    prompt_ids = encode_prompt(tokenizer, build_prompt(tokenizer, question, fmt, system_prompt))
    target_ids = tokenizer(format_target(answer, calc_annotations), add_special_tokens=False).input_ids
    target_ids = target_ids + [tokenizer.eos_token_id]
    room = max(max_length - len(prompt_ids), 0)
    truncated = len(target_ids) > room
    target_ids = target_ids[:room]
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [-100] * len(prompt_ids) + target_ids,
        "truncated": truncated,
    }
