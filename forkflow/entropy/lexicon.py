"""Which tokens sit at high- and low-entropy positions: frequency tables over a selection of positions (the
paper's word clouds: connectives like "wait", "thus" at forks; suffixes and formula pieces at the bottom)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

WHITESPACE_NAMES = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def display_token(text: str) -> str:
    """A token as a word: surrounding whitespace dropped; a whitespace-only token spelled out (`\\n\\n`);
    invisible characters escaped (`\\u200b`)."""
    word = text.strip()
    if not word:
        return "".join(WHITESPACE_NAMES.get(c, c) for c in text) or "∅"
    return word if word.isprintable() else word.encode("unicode_escape").decode("ascii")


@dataclass
class TokenCount:
    token: str
    count: int
    share: float  # of the selected positions
    mean_entropy: float


def frequent_tokens(
    tokens: list[str], entropies: torch.Tensor, selected: torch.Tensor, top: int
) -> list[TokenCount]:
    """tokens/entropies/selected [N] pooled over a file -> the `top` most frequent words among selected
    positions (ties broken alphabetically so tables are reproducible)."""
    picked = selected.nonzero()[:, 0].tolist()
    counts: Counter[str] = Counter()
    entropy_sums: Counter[str] = Counter()
    for i in picked:
        word = display_token(tokens[i])
        counts[word] += 1
        entropy_sums[word] += float(entropies[i])
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [
        TokenCount(word, count, count / len(picked), entropy_sums[word] / count) for word, count in ranked
    ]
