"""chat: scripted (pipes, --question, --json) and interactive through a real pseudo-terminal."""

import json
import re
import sys

from conftest import run_cli


def test_scripted_lines_are_answered_independently(tiny_model):
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 8, "--json",
                     input="What is 3 + 4?\n\n   \nA box holds 6 eggs. How many eggs are in 4 boxes?\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["question"] for line in lines] == ["What is 3 + 4?",
                                                    "A box holds 6 eggs. How many eggs are in 4 boxes?"]
    assert all(set(line) == {"question", "completion", "answer"} for line in lines)
    alone = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 8, "--json",
                    input="A box holds 6 eggs. How many eggs are in 4 boxes?\n")
    assert json.loads(alone.stdout)["completion"] == lines[1]["completion"]  # no history from line 1


def test_piped_commands_are_obeyed_not_sent_to_the_model(tiny_model):
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 4, "--json",
                     input="/system Be brief.\nWhat is 2 + 2?\n/reset\n/frob\n/exit\nWhat is 3 + 3?\n")
    assert [json.loads(line)["question"] for line in result.stdout.splitlines()] == ["What is 2 + 2?"]
    assert "line 4: unknown command /frob" in result.stderr and result.exit_code == 1


def test_question_flag_and_plain_output(tiny_model):
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 8, "--question", "What is 3 + 4?")
    assert result.exit_code == 0 and result.stdout.strip() != ""
    assert "answer:" not in result.stdout  # nothing decorative in scripted mode


def test_prepared_data_given_as_a_model_is_named_as_data(tiny_model, gsm8k_dir, tmp_path):
    prep = tmp_path / "prep"
    assert run_cli("prepare-data", "--data", gsm8k_dir, "--model", tiny_model, "--out", prep).exit_code == 0
    result = run_cli("chat", "--model", prep, "--question", "1+1?")
    said = " ".join(result.stderr.split())
    assert result.exit_code == 1 and "is a prepare-data output (training data), not a model" in said
    assert f"prepared for the model {tiny_model}" in said  # what to give instead


def test_bad_input(tiny_model, tmp_path):
    result = run_cli("chat", "--model", tiny_model, "--temperature", "-1", input="hi\n")
    assert result.exit_code == 1 and "--temperature -1" in result.stderr
    result = run_cli("chat", "--adapter", tmp_path, input="hi\n")
    assert result.exit_code == 1 and "not a tinymath training run" in result.stderr
    result = run_cli("chat", "--adapter", tiny_model, input="hi\n")  # a model, not a run
    assert result.exit_code == 1 and "eval and chat take it as --model" in result.stderr
    long_question = "seven " * 1200
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 8, input=long_question + "\nWhat is 2+2?\n")
    assert result.exit_code == 1 and "context window" in result.stderr
    assert len(result.stdout.strip().splitlines()) >= 1  # the good line was still answered
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 100000, "--question", "What is 2+2?")
    assert result.exit_code == 1 and "--max-new-tokens 100000 leaves no room" in result.stderr, result.output


def test_interactive_session_in_a_pty(tiny_model):
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "tinymath", "chat", "--model", str(tiny_model),
                                           "--max-new-tokens", "12"], timeout=120, encoding="utf-8",
                          dimensions=(40, 200))
    child.expect("/reset")                      # the help line
    child.expect("you")
    child.sendline("What is 3 + 4?")
    child.expect("model")
    child.expect("answer:")                     # streamed reply, then the highlighted answer
    assert child.before.strip() != ""
    child.expect("you")
    child.sendline("/reset")
    child.expect("conversation reset")
    child.sendline("/system Be brief.")
    child.expect("system prompt set")
    child.sendline("/system")
    child.expect("system prompt back to the default")
    child.sendline("/systemic")                 # not /system: an unknown command
    child.expect("unknown command")
    child.sendline("/foo[/x]")                  # text that looks like markup is shown as typed
    child.expect("unknown command")
    child.expect("you")
    assert "/foo[/x]" in re.sub(r"\x1b\[[0-9;]*m", "", child.before)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_json_in_a_terminal_answers_each_line_as_json(tiny_model):
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "tinymath", "chat", "--model", str(tiny_model),
                                           "--max-new-tokens", "4", "--json"], timeout=120, encoding="utf-8")
    child.sendline("What is 3 + 4?")
    child.expect(r'\{"question": "What is 3 \+ 4\?".*\}')
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_no_question_to_read_is_one_message(tiny_model):
    import os
    import subprocess

    result = run_cli("chat", "--model", tiny_model, "--question", "  ")
    assert result.exit_code == 1 and "--question is empty" in result.stderr, result.output
    closed = subprocess.run([sys.executable, "-m", "tinymath", "chat", "--model", str(tiny_model)],
                            capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert closed.returncode == 1 and "standard input is closed" in closed.stderr, closed.stderr[-2000:]
    assert "Traceback" not in closed.stderr
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 100000, input="What is 2+2?\nAnd 3+3?\n")
    assert result.exit_code == 1 and result.stderr.count("leaves no room") == 1, result.output  # once, at start-up


def test_a_question_too_long_for_the_window_keeps_the_conversation(tiny_model):
    """Interactive chat: the refusal of a too-long question leaves the earlier turns in place."""
    import pytest

    from tinymath.base.errors import TinymathError
    from tinymath.lib.generate import GenerationSettings, load_for_inference
    from tinymath.services.chat import ChatSession

    session = ChatSession(load_for_inference(model=str(tiny_model)), GenerationSettings(max_new_tokens=4))
    for question in ("What is 3 + 4?", "And 5 + 6?"):
        "".join(session.reply(question))
    assert len(session.history) == 2
    with pytest.raises(TinymathError, match="context window"):
        session.prompt_ids("seven " * 1200)
    assert len(session.history) == 2


def test_a_model_without_a_chat_template_is_asked_in_the_instruction_format(tiny_model, tmp_path):
    """A base model has no chat template: chat (which has no --format) and eval use the plain
    instruction format instead of refusing."""
    import shutil

    plain = tmp_path / "base"
    shutil.copytree(tiny_model, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    result = run_cli("chat", "--model", plain, "--max-new-tokens", 4, "--question", "What is 2 + 2?", "--json")
    assert result.exit_code == 0, result.output
    from tinymath.lib.generate import load_for_inference

    assert load_for_inference(model=str(plain)).format == "instruction"
    assert load_for_inference(model=str(tiny_model)).format == "chat"
