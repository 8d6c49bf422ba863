"""The calculator tool: exact integer arithmetic by parsing, one error string for everything else."""

from fractions import Fraction

import pytest

from reval_jax.env.calculator import ERROR, MAX_CHARS, CalculatorError, calculate, evaluate


@pytest.mark.parametrize("expression, expected", [
    ("2 + 2", "4"), ("12 * (3 + 4)", "84"), ("7 / 2", "7/2"), ("8 / 4", "2"), ("-3 - -4", "1"),
    ("((1 + 2) * (3 - 10)) / 7", "-3"), ("+5", "5"), ("1 / 3 + 1 / 6", "1/2"), (" 100 ", "100"),
    ("0 - 12345678901234567890 * 10", "-123456789012345678900"),
])
def test_arithmetic_is_exact(expression, expected):
    assert calculate(expression) == expected


def test_agrees_with_python_on_random_expressions():
    """A ten-line reference: Python's own Fraction arithmetic on the same random trees."""
    import random
    rng = random.Random(0)

    def tree(depth):
        if depth == 0 or rng.random() < 0.3:
            n = rng.randint(0, 999)
            return str(n), Fraction(n)
        (ls, lv), (rs, rv), op = tree(depth - 1), tree(depth - 1), rng.choice("+-*/")
        if op == "/" and rv == 0:
            op = "+"
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if rv else 0}[op]
        return f"({ls} {op} {rs})", value

    for _ in range(200):
        text, value = tree(4)
        assert evaluate(text) == value, text


@pytest.mark.parametrize("bad", [
    "", "   ", "2 ** 8", "7 // 2", "7 % 2", "2.5 + 1", "1e3", "0x10", "1_000", "abc", "__import__('os')",
    "(1 + 2", "1 +", "1 / 0", "(2 - 2) / (3 - 3)", "012", "()", "1 2", "x = 1", "2 < 3",
    "(" * 150 + "1" + ")" * 150, "1" * (MAX_CHARS + 1),
])
def test_bad_input_gives_the_one_error_string(bad):
    assert calculate(bad) == ERROR
    with pytest.raises(CalculatorError):
        evaluate(bad)


def test_intermediate_values_are_capped(monkeypatch):
    from reval_jax.env import calculator

    monkeypatch.setattr(calculator, "MAX_DIGITS", 5)
    assert calculate("999 * 99") == "98901" and calculate("999 * 999") == ERROR and calculate("1 / 999999") == ERROR


def test_never_runs_code(monkeypatch):
    """Names, calls and attributes are refused by the character set before parsing, and by the tree
    whitelist after it (checked here by feeding the walker a tree the character set would refuse)."""
    import ast

    from reval_jax.env import calculator

    monkeypatch.setattr(calculator, "_ALLOWED", __import__("re").compile(r".*"))
    for source in ("__import__('os').system('true')", "print(1)", "(1).__class__", "[1][0]", "True + 1"):
        with pytest.raises(CalculatorError):
            calculator.evaluate(source)
    assert isinstance(ast.parse("1", mode="eval").body, ast.Constant)
