"""Synthetic verifiable tasks generated offline, deterministically from a seed, with their verifiers:
countdown (reach a target from given numbers) and multi-step integer arithmetic. Answers are read from the
last `\\boxed{}` of the response.

Each task is a dict in the plain data layout: `problem`, `answer` (the ground truth the verifier takes),
`data_source` (which verifier) and `solution` (one correct answer, for checking the generator).
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from fractions import Fraction

from forkflow.rewards.answers import last_boxed

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
AST_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
LATEX_OPERATORS = (
    ("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("·", "*"), ("\\div", "/"), ("÷", "/"), ("−", "-"),
    ("\\left(", "("), ("\\right)", ")"), ("\\left[", "("), ("\\right]", ")"), ("[", "("), ("]", ")"),
    ("\\,", ""), ("\\!", ""), ("$", ""),
)  # fmt: skip
LATEX_FRACTION = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
MAX_EXPRESSION_CHARS = 500  # longer "expressions" are rejected before parsing


def _random_expression(rng: random.Random, operands: list[int]) -> tuple[str, Fraction]:
    """Combine random pairs of `operands` with random operators until one expression is left.

    Division is used only when it is exact, so every intermediate value is an integer.
    """
    terms = [(str(n), Fraction(n)) for n in operands]
    while len(terms) > 1:
        left = terms.pop(rng.randrange(len(terms)))
        right = terms.pop(rng.randrange(len(terms)))
        symbols = [
            s for s in OPERATORS if s != "/" or (right[1] != 0 and (left[1] / right[1]).denominator == 1)
        ]
        symbol = rng.choice(symbols)
        text = f"{left[0]} {symbol} {right[0]}"
        terms.append((f"({text})" if terms else text, OPERATORS[symbol](left[1], right[1])))
    return terms[0]


def countdown_tasks(
    count: int, seed: int = 0, num_numbers: int = 4, max_number: int = 25, max_target: int = 100
) -> list[dict]:
    """`count` countdown tasks: reach a target in [1, max_target] from `num_numbers` numbers in
    [1, max_number] with + - * / and parentheses, each number used at most once. Same seed, same tasks."""
    if count < 0 or num_numbers < 2 or max_number < 1 or max_target < 1:
        raise ValueError(
            f"countdown_tasks needs count >= 0, num_numbers >= 2, max_number >= 1 and max_target >= 1; "
            f"got {count}, {num_numbers}, {max_number}, {max_target}"
        )
    rng = random.Random(seed)
    tasks = []
    while len(tasks) < count:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        solution, value = _random_expression(rng, numbers)
        if value.denominator != 1 or not 1 <= value <= max_target:
            continue
        target = int(value)
        problem = (
            f"Using the numbers {numbers}, write an arithmetic expression that equals {target}. You may use "
            "+, -, * and / and parentheses, and each number at most once. Give the expression as your final "
            "answer."
        )
        answer = json.dumps({"target": target, "numbers": numbers})
        tasks.append({"problem": problem, "answer": answer, "data_source": "countdown", "solution": solution})
    return tasks


def arithmetic_tasks(count: int, seed: int = 0, num_steps: int = 3, max_operand: int = 20) -> list[dict]:
    """`count` multi-step arithmetic tasks: evaluate an expression of `num_steps` operations (+ - * /, exact
    divisions only) on integers in [1, max_operand]; the answer is an integer. Same seed, same tasks."""
    if count < 0 or num_steps < 1 or max_operand < 1:
        raise ValueError(
            f"arithmetic_tasks needs count >= 0, num_steps >= 1 and max_operand >= 1; "
            f"got {count}, {num_steps}, {max_operand}"
        )
    rng = random.Random(seed)
    tasks = []
    for _ in range(count):
        operands = [rng.randint(1, max_operand) for _ in range(num_steps + 1)]
        expression, value = _random_expression(rng, operands)
        answer = str(int(value))
        problem = f"Compute the value of {expression}."
        tasks.append({"problem": problem, "answer": answer, "data_source": "arithmetic", "solution": answer})
    return tasks


def _countdown_ground_truth(ground_truth: str) -> tuple[Fraction, list[int]]:
    try:
        spec = json.loads(ground_truth)
        target, numbers = Fraction(spec["target"]), [int(n) for n in spec["numbers"]]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(
            f'countdown ground truth must be JSON like {{"target": 24, "numbers": [1, 2, 3, 4]}}, '
            f"got {ground_truth[:80]!r} ({error})"
        ) from error
    return target, numbers


def _evaluate(node: ast.AST, leaves: list[int]) -> Fraction:
    """Exact value of an expression of non-negative integer literals, + - * / and parentheses."""
    if isinstance(node, ast.BinOp) and type(node.op) in AST_OPERATORS:
        return AST_OPERATORS[type(node.op)](_evaluate(node.left, leaves), _evaluate(node.right, leaves))
    if isinstance(node, ast.Constant) and type(node.value) is int:
        leaves.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:60]}")


def verify_countdown(response: str, ground_truth: str) -> bool:
    """Whether the last `\\boxed{}` of `response` is an expression over the given numbers (each at most once,
    + - * / and parentheses only) whose exact value is the target. A trailing `= value` is ignored."""
    target, numbers = _countdown_ground_truth(ground_truth)
    expression = last_boxed(response)
    if expression is None or len(expression) > MAX_EXPRESSION_CHARS:
        return False
    for latex, plain in LATEX_OPERATORS:
        expression = expression.replace(latex, plain)
    expression = LATEX_FRACTION.sub(r"((\1)/(\2))", expression).split("=")[0]
    leaves: list[int] = []
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval").body, leaves)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    unused = list(numbers)
    for leaf in leaves:
        if leaf not in unused:
            return False
        unused.remove(leaf)
    return value == target


def parse_number(text: str) -> Fraction | None:
    """The exact number in an answer like `42`, `-3`, `1,234`, `2.5`, `7/2` or `\\frac{7}{2}`, else None."""
    text = text.replace("$", "").replace("\\!", "").replace(" ", "").strip()
    fraction = re.fullmatch(r"(-?)\\d?frac\{(-?\d+)\}\{(-?\d+)\}", text)
    if fraction:
        text = f"{fraction[1]}{fraction[2]}/{fraction[3]}"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", text):
        text = text.replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def verify_arithmetic(response: str, ground_truth: str) -> bool:
    """Whether the number in the last `\\boxed{}` of `response` equals the ground truth exactly."""
    expected = parse_number(ground_truth)
    if expected is None:
        raise ValueError(f"arithmetic ground truth must be a number, got {ground_truth[:80]!r}")
    answer = last_boxed(response)
    return answer is not None and parse_number(answer) == expected
