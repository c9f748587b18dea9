"""chat: a conversation with a model (interactive) or one answer per input line (scripted).

The session owns the history and the context window: when a conversation no longer fits, the
oldest turns are dropped (and the caller is told). Prompts are built by `tinymath.base.prompts` with the
run's own format, and replies are scored with the shared `extract_answer`.
"""

from __future__ import annotations

import sys

from tinymath.base.errors import TinymathError
from tinymath.lib.generate import GenerationSettings, InferenceModel, generate_batch, stream_generate
from tinymath.base.prompts import build_prompt, encode_prompt, extract_answer

MAX_CHARS_PER_TOKEN = 16  # more characters than this per token of context cannot fit, whatever the tokenizer
HELP = ("Commands: /reset (forget the conversation), /system TEXT (new system prompt; /system alone: the default), "
        "/exit (or Ctrl-D)")


class ChatSession:
    """Multi-turn history within the model's context window."""

    def __init__(self, inference: InferenceModel, settings: GenerationSettings, keep_history: bool = True):
        self.inference = inference
        self.settings = settings
        self.keep_history = keep_history
        self.system_prompt = inference.system_prompt
        self.history: list[tuple[str, str]] = []
        self.dropped = 0
        config = inference.model.config
        self.context_window = getattr(config, "max_position_embeddings", None) or 2048
        self._check_budget()

    def _check_budget(self) -> int:
        """The tokens a prompt may take: the context window less the reply's; refused when none are
        left (at start-up, before any question is read)."""
        budget = self.context_window - self.settings.max_new_tokens
        if budget <= 0:
            raise TinymathError(f"--max-new-tokens {self.settings.max_new_tokens} leaves no room for a question in the "
                                f"model's {self.context_window}-token context window; ask for fewer")
        return budget

    def warm_up(self) -> None:
        """Generate one throw-away token, so the first real reply does not pay for warm-up."""
        list(stream_generate(self.inference, [self.inference.tokenizer.eos_token_id],
                             GenerationSettings(max_new_tokens=1)))

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str) -> None:
        """``/system TEXT``: a new system prompt and a fresh conversation; no text: the model's own again."""
        self.system_prompt = text or self.inference.system_prompt
        self.history = []

    def prompt_ids(self, question: str) -> tuple[list[int], int]:
        """Token ids for the question after the history; drops oldest turns to fit. Returns ids and
        how many turns were dropped."""
        tokenizer = self.inference.tokenizer
        budget = self._check_budget()
        if len(question) > MAX_CHARS_PER_TOKEN * self.context_window:  # no tokenizer pass over megabytes
            raise TinymathError(f"the question is {len(question):,} characters, far more than the model's "
                                f"{self.context_window}-token context window holds; shorten it")
        history = list(self.history)  # kept as it was if even the question alone does not fit
        while True:
            ids = encode_prompt(tokenizer, build_prompt(tokenizer, question, self.inference.format,
                                                        self.system_prompt, history))
            if len(ids) <= budget:
                dropped, self.history = len(self.history) - len(history), history
                return ids, dropped
            if not history:
                raise TinymathError(f"the question is {len(ids)} tokens; with --max-new-tokens "
                                    f"{self.settings.max_new_tokens} it does not fit the model's "
                                    f"{self.context_window}-token context window; shorten it")
            history.pop(0)

    def reply(self, question: str):
        """Yield the reply text in pieces; the turn is added to the history when it is complete."""
        ids, self.dropped = self.prompt_ids(question)
        pieces = []
        # the calculator completes annotations between rounds, so its replies come whole
        stream = ([text for text, _ in generate_batch(self.inference, [ids], self.settings)]
                  if self.settings.calculator else stream_generate(self.inference, ids, self.settings))
        for piece in stream:
            pieces.append(piece)
            yield piece
        if self.keep_history:
            self.history.append((question, "".join(pieces).strip()))


def answer(session: ChatSession, question: str) -> dict:
    """One independent answer: ``{"question", "completion", "answer"}``."""
    session.reset()
    completion = "".join(session.reply(question)).strip()
    session.reset()
    return {"question": question, "completion": completion, "answer": extract_answer(completion)}


def run_scripted(session: ChatSession, lines, as_json: bool, out=None, err=None) -> int:
    """Answer each non-empty line independently; returns the exit code (1 if any line failed).
    ``lines`` may be bytes (a pipe read raw): a line that is not UTF-8 is reported and skipped. A
    line starting with ``/`` is a command, as in a terminal: ``/system TEXT`` sets the system
    prompt for the lines after it, ``/exit`` stops, ``/reset`` changes nothing."""
    import json

    out, err = out or sys.stdout, err or sys.stderr
    failed = 0
    for number, line in enumerate(lines, start=1):
        try:
            question = (line.decode("utf-8") if isinstance(line, bytes) else line).strip()
        except UnicodeDecodeError:
            print(f"error: line {number}: not UTF-8 text; skipped", file=err)
            failed += 1
            continue
        if not question:
            continue
        if question.startswith("/"):  # the interactive commands, never sent to the model as a question
            word = question.split()[0]
            if word in ("/exit", "/quit"):
                break
            if word == "/system":
                session.set_system(question[len("/system"):].strip())
            elif word != "/reset":  # /reset: each line is answered on its own anyway
                print(f"error: line {number}: unknown command {word} (commands: /system TEXT, /reset, /exit)",
                      file=err)
                failed += 1
            continue
        try:
            result = answer(session, question)
        except TinymathError as exc:
            print(f"error: line {number}: {exc}", file=err)
            failed += 1
            continue
        print(json.dumps(result) if as_json else result["completion"], file=out, flush=True)
    return 1 if failed else 0


def run_interactive(session: ChatSession, console) -> int:
    """The terminal conversation: streamed replies, the final answer highlighted, slash commands."""
    from rich.markup import escape
    from rich.prompt import Prompt

    console.print(f"[dim]{escape(HELP)}[/dim]", highlight=False)
    while True:
        try:
            question = Prompt.ask("[bold cyan]you[/bold cyan]", console=console).strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return 0
        if question == "/reset":
            session.reset()
            console.print("[dim]conversation reset[/dim]")
            continue
        if question == "/system" or question.startswith("/system "):
            text = question[len("/system"):].strip()
            session.set_system(text)
            console.print(f"[dim]system prompt {'set' if text else 'back to the default'}; conversation reset[/dim]")
            continue
        if question.startswith("/"):
            console.print(f"[yellow]unknown command {escape(question.split()[0])}[/yellow]  [dim]{escape(HELP)}[/dim]")
            continue
        try:
            console.print("[bold magenta]model[/bold magenta]: ", end="")
            pieces = []
            for piece in session.reply(question):
                pieces.append(piece)
                console.file.write(piece)
                console.file.flush()
            console.print()
        except KeyboardInterrupt:
            console.print("\n[dim]interrupted[/dim]")
            continue
        except TinymathError as exc:
            console.print(f"\n[red]{escape(str(exc))}[/red]")
            continue
        if session.dropped:
            console.print(f"[yellow]note: the {session.dropped} oldest turn(s) were dropped to fit the "
                          f"context window[/yellow]")
        final = extract_answer("".join(pieces))
        console.print(f"[bold green]answer: {escape(final)}[/bold green]" if final is not None
                      else "[yellow]answer: (no number found)[/yellow]")
