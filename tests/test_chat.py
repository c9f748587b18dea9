"""chat: scripted (pipes, --question, --json) and interactive through a real pseudo-terminal."""

import json
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


def test_question_flag_and_plain_output(tiny_model):
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 8, "--question", "What is 3 + 4?")
    assert result.exit_code == 0 and result.stdout.strip() != ""
    assert "answer:" not in result.stdout  # nothing decorative in scripted mode


def test_bad_input(tiny_model, tmp_path):
    result = run_cli("chat", "--model", tiny_model, "--temperature", "-1", input="hi\n")
    assert result.exit_code == 1 and "--temperature -1" in result.stderr
    result = run_cli("chat", "--adapter", tmp_path, input="hi\n")
    assert result.exit_code == 1 and "not a tinymath training run" in result.stderr
    result = run_cli("chat", "--adapter", tiny_model, input="hi\n")  # a model, not a run
    assert result.exit_code == 1 and "give it as --model" in result.stderr
    long_question = "seven " * 1200
    result = run_cli("chat", "--model", tiny_model, "--max-new-tokens", 8, input=long_question + "\nWhat is 2+2?\n")
    assert result.exit_code == 1 and "context window" in result.stderr
    assert len(result.stdout.strip().splitlines()) >= 1  # the good line was still answered


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
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
