"""Interactive chat as a user at a terminal sees it: `tinymath chat` started under a pseudo-terminal,
timed from process start to its first prompt (loading and warm-up), then, for each question, from
pressing Enter to the first streamed character of the reply and to the next prompt (the reply done).

    OUT=/tmp/out python benchmarks/chat_first_token.py --model SmolLM2.gguf [--questions 3]
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import log  # noqa: E402

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 6 eggs. How many eggs are in 4 boxes?",
             "Sara reads 12 pages a day. How many pages does she read in a week?"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """A child process on a pseudo-terminal; ``wait_for`` reads until a pattern shows in the text."""

    def __init__(self, command: list[str]):
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.text = ""

    def wait_for(self, pattern: str, start: int, timeout: float) -> tuple[float, int]:
        """Seconds (time.time()) when ``pattern`` first matched the text after ``start``, and where it ends."""
        deadline = time.time() + timeout
        while True:
            found = re.compile(pattern).search(self.text, start)
            if found:
                return time.time(), found.end()
            if time.time() > deadline or self.process.poll() is not None:
                raise SystemExit(f"chat_first_token: no {pattern!r} within {timeout} s; the terminal shows:\n"
                                 + self.text[-2000:])
            ready, _, _ = select.select([self.master], [], [], 0.01)
            if ready:
                self.text += ANSI.sub("", os.read(self.master, 65536).decode("utf-8", "replace"))

    def type(self, line: str) -> float:
        os.write(self.master, (line + "\r").encode())
        return time.time()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a merged model folder or a .gguf")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--label", default="chat_interactive")
    args = parser.parse_args()

    started = time.time()
    term = Terminal([sys.executable, "-m", "tinymath", "chat", "--model", args.model])
    try:
        ready, end = term.wait_for(r"you[^\n]*:", 0, timeout=600)
        first, whole = [], []
        for question in (QUESTIONS * args.questions)[:args.questions]:
            asked = term.type(question)
            _, end = term.wait_for(r"model: ", end, timeout=120)
            shown, end = term.wait_for(r"\S", end, timeout=120)  # the first streamed character
            # the reply is over when the next prompt shows (the reply's own text may say "answer:")
            done, end = term.wait_for(r"\nyou[^\n]*:", end, timeout=300)
            first.append(shown - asked)
            whole.append(done - asked)
        term.type("/exit")
        term.process.wait(timeout=60)
    finally:
        if term.process.poll() is None:
            term.process.kill()
    log(event="chat", label=args.label, model=args.model, loaded_to_prompt_s=round(ready - started, 2),
        first_text_s=[round(x, 3) for x in first], first_text_median_s=round(statistics.median(first), 3),
        reply_s=[round(x, 2) for x in whole])


if __name__ == "__main__":
    main()
