"""Finding the final answer in a response (the last `\\boxed{...}` or the last DAPO `Answer:` line) and DAPO's
string normalisation of answers, the Minerva / lm-eval `hendrycks_math` rules that DAPO's verifier uses."""

from __future__ import annotations

import re

BOXED_OPENING = "\\boxed{"
ANSWER_LINE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)

# The normalisation of DAPO's reference verifier (verl reward_score/math_dapo.py), for paper parity: these
# literal replacements, then these removals, then these rewrites, in this order.
DAPO_REPLACEMENTS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
DAPO_REMOVALS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip
DAPO_REWRITES = (
    (re.compile(r"(.*?)\$(.*?)\$(.*)"), r"$\2$"),  # keep only the first $...$ span
    (re.compile(r"\\text\{(.*?)\}"), r"\1"),
    (re.compile(r"\\textbf\{(.*?)\}"), r"\1"),
    (re.compile(r"\\overline\{(.*?)\}"), r"\1"),
    (re.compile(r"\\boxed\{(.*)\}"), r"\1"),
    (re.compile(r"frac([^{])(.)"), r"frac{\1}{\2}"),  # \frac12 -> \frac{1}{2}
    (re.compile(r"sqrt([^{])"), r"sqrt{\1}"),  # \sqrt2 -> \sqrt{2}
)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces balanced; None if absent or never closed."""
    start = text.rfind(BOXED_OPENING)
    if start < 0:
        return None
    depth = 0
    for position in range(start + len(BOXED_OPENING) - 1, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(BOXED_OPENING) : position]
    return None


def last_answer_line(text: str) -> str | None:
    """What follows the last `Answer:` (any case) up to the end of its line; None if there is none."""
    answers = ANSWER_LINE.findall(text)
    return answers[-1] if answers else None


def normalize_dapo_answer(answer: str) -> str:
    """DAPO's normalisation of a final answer, so that e.g. "x = 10 \\text{ cm}" and "10" compare equal."""
    answer = answer.split("=")[-1]
    for before, after in DAPO_REPLACEMENTS:
        answer = answer.replace(before, after)
    for removed in DAPO_REMOVALS:
        answer = answer.replace(removed, "")
    for pattern, replacement in DAPO_REWRITES:
        answer = pattern.sub(replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()
