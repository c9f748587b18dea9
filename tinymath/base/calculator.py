"""The calculator of calculator-assisted decoding (the GSM8K paper's method): when a model trained
with ``--calc-annotations keep`` writes ``<<48/2=``, tinymath computes ``48/2`` and writes
``24>>`` for it.

Model text is never given to Python's ``eval``: `calculate` parses it with ``ast`` and allows only
numbers, + - * / // % **, unary signs and parentheses, within bounds on length, nesting, exponent
size, magnitude and time. Anything else (division by zero, huge numbers, names, calls) gives None,
and the model simply continues on its own.
"""

from __future__ import annotations

import ast
import re
import time
from decimal import Decimal

MAX_CHARS = 200
MAX_DEPTH = 30
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e15
TIME_LIMIT_S = 0.05
OPEN_CALL = re.compile(r"<<([^<>=]*)=$")


class _Refused(Exception):
    pass


def calculate(expression: str) -> str | None:
    """The value of a plain arithmetic expression as GSM8K writes it (``"24"``, ``"2.5"``), or None."""
    text = expression.replace(",", "").replace("$", "").replace("x", "*").replace("×", "*").strip()
    if not text or len(text) > MAX_CHARS:
        return None
    try:
        tree = ast.parse(text, mode="eval")
        value = _evaluate(tree.body, 0, time.perf_counter() + TIME_LIMIT_S)
    except (SyntaxError, _Refused, ZeroDivisionError, OverflowError, ValueError, RecursionError):
        return None
    if abs(value) > MAX_MAGNITUDE:
        return None
    value = round(float(value), 6) + 0.0  # + 0.0: -0.0 (float error below zero) becomes 0.0
    if value.is_integer():
        return str(int(value))
    return format(Decimal(repr(value)).normalize(), "f")


def _evaluate(node, depth: int, deadline: float) -> float:
    if depth > MAX_DEPTH or time.perf_counter() > deadline:
        raise _Refused
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand, depth + 1, deadline)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left = _evaluate(node.left, depth + 1, deadline)
        right = _evaluate(node.right, depth + 1, deadline)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT or abs(left) > MAX_MAGNITUDE:
                raise _Refused
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
               ast.Pow: lambda a, b: a ** b}
        op = ops.get(type(node.op))
        if op is None:
            raise _Refused
        result = op(left, right)
        if isinstance(result, complex) or abs(result) > MAX_MAGNITUDE * 1e3:
            raise _Refused
        return result
    raise _Refused


def pending_call(text: str) -> str | None:
    """If ``text`` ends inside an annotation waiting for its result (``... <<48/2=``), the expression."""
    match = OPEN_CALL.search(text)
    return match.group(1) if match else None
