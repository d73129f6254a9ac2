"""Tests for forkflow.rewards: answer extraction, math verification in both modes, the verifier pool's
timeouts (hanging verifiers must not stall scoring, however many), verifier faults (raised, garbage returned,
worker died) scored and reported, batch scores, synthetic tasks and user reward functions."""

import inspect
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from forkflow.config import ConfigError
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
from tests import faulty_verifiers
from tests.faulty_verifiers import garbage_verifier, raising_verifier, sleepy_verifier

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

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def pool():
    # preload the misbehaving verifiers so that workers import them at start-up, not on their first call
    with VerifierPool(num_workers=2, timeout_s=TIMEOUT_S, preload=("tests.faulty_verifiers",)) as verifier_pool:
        score_responses(verifier_pool, sleepy_verifier, ["a", "b"], ["a", "b"])  # start the workers
        yield verifier_pool


def test_hanging_verifier_times_out_scores_failed_and_the_pool_recovers(pool):
    responses = ["a", "hang", "b", "hang", "c", "x"]
    truths = ["a", "a", "b", "b", "c", "c"]
    start = time.monotonic()
    scored = score_responses(pool, sleepy_verifier, responses, truths, RewardValues(1.0, -1.0, 0.0))
    elapsed = time.monotonic() - start
    assert elapsed < 2.5 * TIMEOUT_S + 1.0, f"scoring took {elapsed:.1f} s; hanging items stalled the pool"
    assert scored.rewards == [1.0, 0.0, 1.0, 0.0, 1.0, -1.0]
    assert scored.correct == [True, False, True, False, True, False]
    assert (scored.timeouts, scored.errors, scored.first_error) == (2, 0, None)
    again = score_responses(pool, sleepy_verifier, ["a", "b"], ["a", "a"])  # replaced workers serve
    assert again.rewards == [1.0, 0.0] and again.timeouts == 0


def test_many_hanging_checks_cost_one_timeout_not_one_each(pool):
    # 16 hangs on 2 workers, one after the other, would cost 16 x 1 s / 2 = 8 s; side by side they cost ~1 s
    responses = ["hang"] * 16 + ["a", "b"] * 8
    start = time.monotonic()
    scored = score_responses(pool, sleepy_verifier, responses, ["a"] * 32)
    elapsed = time.monotonic() - start
    assert elapsed < 2.5 * TIMEOUT_S + 1.0, f"scoring took {elapsed:.1f} s; hanging items were waited for in turn"
    assert scored.timeouts == 16 and scored.errors == 0
    assert scored.correct == [False] * 16 + [True, False] * 8
    start = time.monotonic()
    again = score_responses(pool, sleepy_verifier, ["a", "b", "c", "a"], ["a"] * 4)  # killed workers replaced
    assert again.correct == [True, False, False, True] and (again.timeouts, again.errors) == (0, 0)
    assert time.monotonic() - start < TIMEOUT_S


def test_a_raising_verifier_scores_incorrect_and_says_where(pool):
    scored = score_responses(pool, raising_verifier, ["a", "raise", "b", "raise"], ["a", "z", "b", "y"],
                             RewardValues(1.0, -1.0, -1.0))
    assert scored.rewards == [1.0, -1.0, 1.0, -1.0] and scored.correct == [True, False, True, False]
    assert (scored.errors, scored.timeouts) == (2, 0)
    raise_line = next(number for number, line in enumerate(inspect.getsourcelines(faulty_verifiers)[0], 1)
                      if "KeyError: the line" in line)
    assert scored.first_error == (  # the first failed item only, on one line, with the innermost frame
        "item 1 (tests.faulty_verifiers:raising_verifier): KeyError: 'z' "
        f"(at tests/faulty_verifiers.py:{raise_line} in raising_verifier)"
    )


def test_a_verifier_returning_garbage_scores_incorrect_and_is_reported(pool):
    scored = score_responses(pool, garbage_verifier, ["abcd", "junk", "a", "none", "nan"], [""] * 5,
                             RewardValues(1.0, -1.0, -1.0))
    assert scored.rewards == [2.0, -1.0, -1.0, -1.0, -1.0]
    assert scored.correct == [True, False, False, False, False]
    assert (scored.errors, scored.timeouts) == (3, 0)
    assert scored.first_error == (
        "item 1 (tests.faulty_verifiers:garbage_verifier): returned str 'junk'; return a bool (correct or not) or a "
        "finite number (the reward)"
    )
    assert "returned float nan" in score_responses(pool, garbage_verifier, ["nan"], [""]).first_error


def test_errors_timeouts_and_dead_workers_are_counted_apart(pool):
    verifiers = [verify_arithmetic, sleepy_verifier, sleepy_verifier, garbage_verifier, sleepy_verifier]
    scored = score_responses(pool, verifiers, ["1", "die", "z", "junk", "hang"], ["not a number", "x", "z", "", "z"])
    assert scored.rewards == [0.0, 0.0, 1.0, 0.0, 0.0] and (scored.errors, scored.timeouts) == (3, 1)
    assert scored.first_error.startswith(
        "item 0 (forkflow.rewards.synthetic_tasks:verify_arithmetic): ValueError: arithmetic ground truth must be "
        "a number, got 'not a number' (at forkflow/rewards/synthetic_tasks.py:"
    )
    died = score_responses(pool, sleepy_verifier, ["die"], ["x"])
    assert died.errors == 1 and "the worker process died (exit code 3)" in died.first_error


def test_importing_a_verifier_module_does_not_count_against_the_timeout(tmp_path, monkeypatch):
    # the workers have not imported this module; importing it takes longer than the timeout, the check does not
    (tmp_path / "slow_import_for_forkflow.py").write_text(
        "import time\ntime.sleep(0.6)\n\ndef check(response, truth):\n    return response == truth\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # before the pool starts: its workers take this sys.path
    verifier = load_reward_function("slow_import_for_forkflow:check")
    with VerifierPool(num_workers=1, timeout_s=0.3, preload=()) as bare:
        scored = score_responses(bare, verifier, ["a", "b", "c"], ["a", "a", "c"])
    assert scored.correct == [True, False, True] and (scored.errors, scored.timeouts) == (0, 0)


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
    assert score_responses(pool, sleepy_verifier, ["a"], ["a"]).correct == [True]  # nothing was half sent


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
    with pytest.raises(ConfigError, match="write a user verifier as 'package.module:function'"):
        load_reward_function("forkflow.rewards.verify_math")


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("forkflow.rewards.verify_math", "unknown verifier 'forkflow.rewards.verify_math'; use one of math"),
        ("no_such_package.rewards:score", "there is no module 'no_such_package' to import; check the spelling"),
        ("forkflow.no_such_module:score", "there is no module 'forkflow.no_such_module' to import"),
        ("forkflow.rewards:no_such_function", "has no attribute 'no_such_function'; check the function's name"),
        ("forkflow.rewards:BUILTIN_VERIFIERS", "is a dict, not a function"),
        ("nonsense", "unknown verifier 'nonsense'; use one of math, math_answer_line"),
    ],
)
def test_bad_verifier_names_are_config_errors_that_say_what_is_wrong(path, message):
    # ConfigError is what the training and eval commands print as one line instead of a traceback
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        resolve_verifier(path)
    assert repr(path) in str(raised.value)


def test_a_verifier_module_that_raises_on_import_says_where(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_for_forkflow.py").write_text("import os\nanswer = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing 'broken_rewards_for_forkflow' raised ZeroDivisionError: "
                       r"division by zero \(at .*broken_rewards_for_forkflow.py:2 in <module>\)"):
        load_reward_function("broken_rewards_for_forkflow:score")
