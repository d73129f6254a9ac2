"""A verifier that marks about half of any model's responses correct (an even number of characters), so that
dynamic sampling on a tiny random model keeps some groups and drops others; imported by name by the
verifier pool's workers (tests.parity_verifier:even_length)."""


def even_length(response: str, ground_truth: str) -> bool:
    return len(response) % 2 == 0
