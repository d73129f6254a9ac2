"""Verifiers that misbehave, for tests/test_rewards.py: module level and importing nothing heavy, so the
verifier pool's worker processes import them by name (as tests.faulty_verifiers: the workers inherit the
test run's sys.path) in milliseconds."""

import os
import time


def sleepy_verifier(response: str, ground_truth: str) -> bool:
    """Hangs on the response "hang", dies on "die", answers by string equality otherwise."""
    if response == "hang":
        time.sleep(60)
    if response == "die":
        os._exit(3)
    return response == ground_truth


def raising_verifier(response: str, ground_truth: str) -> bool:
    """Raises on the response "raise" (a bug in a user verifier), answers by string equality otherwise."""
    if response == "raise":
        return {"a": 1}[ground_truth]  # KeyError: the line the error summary must point at
    return response == ground_truth


def garbage_verifier(response: str, ground_truth: str):
    """Returns neither a bool nor a finite number for "junk", "none" and "nan"; a reward number otherwise."""
    garbage = {"junk": "junk", "none": None, "nan": float("nan")}
    return garbage[response] if response in garbage else float(len(response)) - 2
