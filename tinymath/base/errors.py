"""The one exception type a user sees: a mistake in their input, with the fix in the message.

Service functions raise `TinymathError`; the CLI prints its message without a traceback and
exits with its ``exit_code``: 1, or 128 + the signal's number for a run stopped by Ctrl-C or
SIGTERM (`Stopped`), as shells expect (a malformed command line, such as an unknown flag, exits
2). Anything else that escapes is a bug and keeps its traceback.
"""


class TinymathError(Exception):
    """A user-facing error: bad flag, bad file, missing model. The message says how to fix it."""

    exit_code = 1


class Stopped(TinymathError):
    """A run stopped by a signal (Ctrl-C, SIGTERM) after saving what it had; the message says how
    to continue."""

    def __init__(self, message: str, signal_name: str):
        import signal

        super().__init__(message)
        number = getattr(signal.Signals, signal_name, None)  # None for "a signal" (another process's)
        self.exit_code = 128 + int(number) if number is not None else 1


def raise_if_problems(problems: list[str]) -> None:
    """Raise one error listing every validation problem found (nothing to do if there are none)."""
    if len(problems) == 1:
        raise TinymathError(problems[0])
    if problems:
        raise TinymathError("\n".join(["several problems:"] + [f"  - {p}" for p in problems]))


def choice(flag: str, value, choices) -> list[str]:
    """A validation problem when ``value`` is not one of ``choices`` (a registry dict or names)."""
    return [] if value in choices else [f"{flag} {value}: use one of {', '.join(choices)}"]
