"""Tests for forkflow.rewards: answer extraction, math verification in both modes, the verifier pool's
timeouts (a hanging verifier must not stall scoring), batch scores, synthetic tasks and user reward
functions."""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from forkflow.rewards import (
    RewardValues,
    VerifierPool,
    arithmetic_tasks,
    countdown_tasks,
    last_answer_line,
    last_boxed,
    load_reward_function,
    normalize_dapo_answer,
    parse_number,
    resolve_verifier,
    score_responses,
    verify_arithmetic,
    verify_countdown,
    verify_math,
)

# ---------------------------------------------------------------- extraction and math verification


def test_last_boxed_takes_the_last_box_with_balanced_braces():
    assert last_boxed("first \\boxed{1} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{unclosed {") is None


def test_last_answer_line_takes_the_last_line_in_any_case():
    assert last_answer_line("Answer: 3\nsome more\nANSWER :  42 \nbye") == "42 "
    assert last_answer_line("the answer is 5") is None


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("x = 10 \\text{ cm}", "10"),  # right of '=', spaces and unit removed
        ("1,000", "1000"),
        ("$\\frac12$", "\\frac{1}{2}"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("\\text{(B)}", "(B)"),
        ("\\boxed{7}", "7"),
    ],
)
def test_dapo_normalisation(raw, normalised):
    assert normalize_dapo_answer(raw) == normalised


def test_verify_math_boxed_compares_values_with_math_verify():
    assert verify_math("so the answer is \\boxed{0.5}", "\\frac{1}{2}")
    assert verify_math("\\boxed{x+1}", "1+x")
    assert verify_math("\\boxed{3} wait, no: \\boxed{4}", "\\boxed{4}")  # last box; boxed ground truth
    assert not verify_math("\\boxed{3} wait, no: \\boxed{4}", "3")
    assert not verify_math("the answer is 4", "4")  # no box, no credit


def test_verify_math_works_off_the_main_thread():
    # math-verify's own timeout uses signal.alarm, which raises off the main thread; verify_math must not
    with ThreadPoolExecutor(max_workers=1) as executor:
        assert executor.submit(verify_math, "\\boxed{\\frac{2}{4}}", "0.5").result()


def test_verify_math_answer_line_is_dapo_strict():
    assert verify_math("work...\nAnswer: 34", "34", mode="answer_line")
    assert verify_math("Answer: $10$ cm", "10", mode="answer_line")
    assert not verify_math("Answer: 0.5", "\\frac{1}{2}", mode="answer_line")  # strings, not values
    assert not verify_math("Answer: 34" + " padding" * 40, "34", mode="answer_line")  # not in last 300 chars
    assert not verify_math("\\boxed{34}", "34", mode="answer_line")


def test_verify_math_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown mode 'minerva'"):
        verify_math("\\boxed{1}", "1", mode="minerva")
    with pytest.raises(TypeError, match="response must be a str, got NoneType"):
        verify_math(None, "1")
    with pytest.raises(ValueError, match="ground_truth is empty"):
        verify_math("\\boxed{1}", " ")


# ---------------------------------------------------------------- verifier pool and batch scores


def sleepy_verifier(response: str, ground_truth: str) -> bool:
    """Hangs on the response "hang", dies on "die", answers by string equality otherwise."""
    if response == "hang":
        time.sleep(60)
    if response == "die":
        os._exit(3)
    return response == ground_truth


def scoring_verifier(response: str, ground_truth: str):
    """Returns a reward number, or something that is neither a bool nor a number for "junk"."""
    return "junk" if response == "junk" else float(len(response)) - 2


@pytest.fixture(scope="module")
def pool():
    # preload this module so the spawned workers import it (the verifiers above) before their first call
    with VerifierPool(num_workers=2, timeout_s=1.0, preload=(__name__,)) as verifier_pool:
        score_responses(verifier_pool, sleepy_verifier, ["a", "b"], ["a", "b"])  # start the workers
        yield verifier_pool


def test_hanging_verifier_times_out_scores_failed_and_the_pool_recovers(pool):
    responses = ["a", "hang", "b", "hang", "c", "x"]
    truths = ["a", "a", "b", "b", "c", "c"]
    start = time.monotonic()
    scored = score_responses(pool, sleepy_verifier, responses, truths, RewardValues(1.0, -1.0, 0.0))
    elapsed = time.monotonic() - start
    # the hangs sleep 60 s; 1 s timeouts plus respawning two workers stay far below that even on a busy machine
    assert elapsed < 30, f"scoring took {elapsed:.1f} s; a hanging item stalled the pool"
    assert scored.rewards == [1.0, 0.0, 1.0, 0.0, 1.0, -1.0]
    assert scored.correct == [True, False, True, False, True, False]
    assert (scored.timed_out, scored.failed) == (2, 0)
    again = score_responses(pool, sleepy_verifier, ["a", "b"], ["a", "a"])  # replaced workers serve
    assert again.rewards == [1.0, 0.0] and again.timed_out == 0


def test_verifier_errors_and_dead_workers_are_counted_not_raised(pool):
    verifiers = [verify_arithmetic, sleepy_verifier, sleepy_verifier]
    scored = score_responses(pool, verifiers, ["1", "die", "z"], ["not a number", "x", "z"])
    assert scored.rewards == [0.0, 0.0, 1.0] and scored.failed == 2
    assert scored.first_error.startswith("item 0: ValueError: arithmetic ground truth must be a number")
    died = score_responses(pool, sleepy_verifier, ["die"], ["x"])
    assert died.failed == 1 and "the worker process died (exit code 3)" in died.first_error


def test_number_verdicts_are_rewards_and_wrong_types_fail(pool):
    scored = score_responses(pool, scoring_verifier, ["abcd", "a", "junk"], ["", "", ""])
    assert scored.rewards == [2.0, -1.0, 0.0] and scored.correct == [True, False, False]
    assert scored.failed == 1 and "returned str" in scored.first_error


def test_a_worker_that_cannot_start_is_an_error_not_a_hang():
    with VerifierPool(num_workers=1, preload=("no_such_module_for_forkflow",)) as broken:
        with pytest.raises(RuntimeError, match="failed to start: .*No module named 'no_such_module_for"):
            broken.run([(sleepy_verifier, ("a", "a"))])


def test_score_responses_rejects_bad_input(pool):
    with pytest.raises(ValueError, match="2 responses, 1 ground truths"):
        score_responses(pool, sleepy_verifier, ["a", "b"], ["a"])
    with pytest.raises(TypeError, match="item 1 has response int"):
        score_responses(pool, sleepy_verifier, ["a", 3], ["a", "b"])
    with pytest.raises(TypeError, match="module level"):
        score_responses(pool, lambda response, truth: True, ["a"], ["a"])


# ---------------------------------------------------------------- synthetic tasks


def test_synthetic_tasks_are_deterministic_from_the_seed():
    assert countdown_tasks(20, seed=3) == countdown_tasks(20, seed=3)
    assert countdown_tasks(20, seed=3) != countdown_tasks(20, seed=4)
    assert arithmetic_tasks(20, seed=3) == arithmetic_tasks(20, seed=3)
    assert arithmetic_tasks(20, seed=3) != arithmetic_tasks(20, seed=4)


def test_every_generated_task_is_solved_by_its_reference_solution():
    for task in countdown_tasks(50, seed=0, num_numbers=4) + arithmetic_tasks(50, seed=0, num_steps=4):
        verifier = resolve_verifier(task["data_source"])
        assert verifier(f"... so \\boxed{{{task['solution']}}}", task["answer"]), task
        assert not verifier("I don't know", task["answer"])


def test_countdown_verifier_checks_numbers_and_value():
    truth = json.dumps({"target": 24, "numbers": [4, 6, 1, 5]})
    assert verify_countdown("\\boxed{4 * 6}", truth)  # unused numbers are fine
    assert verify_countdown("\\boxed{(5 + 1) \\times 4 = 24}", truth)
    assert verify_countdown("\\boxed{6 / (5/4 - 1)}", truth)  # exact fractions inside
    assert not verify_countdown("\\boxed{4 * 6 * 1 * 1}", truth)  # 1 used twice
    assert not verify_countdown("\\boxed{3 * 8}", truth)  # numbers not given
    assert not verify_countdown("\\boxed{4 * 5 + 1}", truth)  # wrong value
    assert not verify_countdown("\\boxed{4 ** 6}", truth)  # operator not allowed
    assert not verify_countdown("\\boxed{6 / (5 - 5)}", truth)  # division by zero
    with pytest.raises(ValueError, match="countdown ground truth must be JSON"):
        verify_countdown("\\boxed{4 * 6}", "24")


def test_arithmetic_verifier_reads_numbers_exactly():
    assert parse_number("1,234") == 1234 and parse_number("-\\frac{7}{2}") == parse_number("-3.5")
    assert parse_number("seven") is None
    assert verify_arithmetic("\\boxed{-12}", "-12")
    assert verify_arithmetic("\\boxed{ 3.0 }", "3")
    assert not verify_arithmetic("\\boxed{13}", "12")


# ---------------------------------------------------------------- user reward functions


def test_reward_functions_load_by_import_path():
    loaded = load_reward_function("forkflow.rewards.synthetic_tasks:verify_countdown")
    assert loaded is verify_countdown
    assert resolve_verifier("math") is verify_math


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("forkflow.rewards.verify_math", "must be written 'package.module:function'"),
        ("no_such_package.rewards:score", "cannot import 'no_such_package.rewards'"),
        ("forkflow.rewards:no_such_function", "has no attribute 'no_such_function'"),
        ("forkflow.rewards:BUILTIN_VERIFIERS", "is a dict, not a function"),
    ],
)
def test_bad_reward_function_paths_say_what_is_wrong(path, message):
    with pytest.raises(ValueError, match=message):
        load_reward_function(path)
    with pytest.raises(ValueError, match="unknown verifier 'nonsense'"):
        resolve_verifier("nonsense")
