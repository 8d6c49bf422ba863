"""The calculator tool of the tiny model: integer arithmetic with + - * / and parentheses, by parsing.

    calculate("12 * (3 + 4)")   -> "84"
    calculate("7 / 2")          -> "7/2"       (exact: a fraction in lowest terms, never a float)
    calculate("2 ** 8")         -> ERROR       (anything else is bad input, with one error string)

It needs no sandbox: it never runs the text it is given. The text must consist of decimal digits,
spaces, ``+ - * /`` and parentheses; it is parsed with ``ast.parse(mode="eval")`` and the tree is
walked with a whitelist (integer constants, the four binary operators, unary + and -); nothing is
``eval``-ed, no name is looked up, no call is made. Work is bounded by the input: at most
``MAX_CHARS`` characters, so at most ~100 operands of ~100 digits each, and every intermediate value
is capped at ``MAX_DIGITS`` digits (numerator and denominator); deep nesting that the parser rejects
is bad input too. Each call therefore takes microseconds to a millisecond in the calling process.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction

ERROR = "error: not an arithmetic expression"  # the one answer for bad input (also division by zero)
MAX_CHARS = 200
MAX_DIGITS = 200
_ALLOWED = re.compile(r"[0-9+\-*/() ]+")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not integer arithmetic the calculator accepts."""


def _value(node: ast.AST) -> Fraction:
    """The exact value of a whitelisted expression tree."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = Fraction(node.value)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        value = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_value(node.operand))
    else:
        raise CalculatorError(f"not allowed: {type(node).__name__}")
    if max(len(str(abs(value.numerator))), len(str(value.denominator))) > MAX_DIGITS:
        raise CalculatorError("number too large")
    return value


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression`; CalculatorError when it is not accepted (module docstring)."""
    if len(expression) > MAX_CHARS or not _ALLOWED.fullmatch(expression):
        raise CalculatorError(f"only digits, spaces, + - * / and parentheses, at most {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"does not parse: {e}") from None
    try:
        return _value(tree.body)
    except RecursionError:
        raise CalculatorError("nested too deeply") from None


def format_value(value: Fraction) -> str:
    """An integer as its digits, anything else as numerator/denominator in lowest terms."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def calculate(expression: str) -> str:
    """The tool's answer to the model: the value as text, or ERROR for any bad input."""
    try:
        return format_value(evaluate(expression))
    except CalculatorError:
        return ERROR
