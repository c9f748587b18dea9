"""The one exception type a user sees: a mistake in their input, with the fix in the message.

Service functions raise `TinymathError`; the CLI prints its message without a traceback and
exits with its ``exit_code``: 1, or 128 + the signal's number for a run stopped by Ctrl-C or
SIGTERM (`Stopped`), as shells expect (a malformed command line, such as an unknown flag, exits
2). Anything else that escapes is a bug and keeps its traceback.
"""


class TinymathError(Exception):
    """A user-facing error: bad flag, bad file, missing model. The message says how to fix it.
    ``every_process``: under several processes, each raises the same one, and only the first
    process's is printed."""

    exit_code = 1

    def __init__(self, message: str = "", every_process: bool = False):
        super().__init__(message)
        self.every_process = every_process


class Stopped(TinymathError):
    """A run stopped by a signal (Ctrl-C, SIGTERM) after saving what it had; the message says how
    to continue."""

    def __init__(self, message: str, signal_name: str, every_process: bool = False):
        import signal

        super().__init__(message, every_process)
        number = getattr(signal.Signals, signal_name, None)  # None for "a signal" (another process's)
        self.exit_code = 128 + int(number) if number is not None else 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (`tinymath.base.files.sigterm_as_interrupt`): under a
    launcher, usually its way of stopping every process once one has failed."""


def raise_if_problems(problems: list[str]) -> None:
    """Raise one error listing every validation problem found (nothing to do if there are none)."""
    if problems:
        raise TinymathError(problems_message(problems))


def problems_message(problems: list[str]) -> str:
    """One problem as it is; several as a list under "several problems:"."""
    if len(problems) == 1:
        return problems[0]
    return "\n".join(["several problems:"] + [f"  - {p}" for p in problems])


def problem_lines(error: TinymathError) -> tuple[list[str], list[str]]:
    """What `problems_message` made ``error``'s message from: its problems, and the lines after the
    list (notes, such as where a setting came from)."""
    lines = str(error).splitlines()
    if lines[:1] != ["several problems:"]:
        return lines[:1], lines[1:]
    listed = [line.removeprefix("  - ") for line in lines[1:] if line.startswith("  - ")]
    return listed, [line for line in lines[1:] if not line.startswith("  - ")]


def choice(flag: str, value, choices) -> list[str]:
    """A validation problem when ``value`` is not one of ``choices`` (a registry dict or names)."""
    return [] if value in choices else [f"{flag} {value}: use one of {', '.join(choices)}"]
