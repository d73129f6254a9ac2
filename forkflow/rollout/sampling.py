"""What to sample and how: the sampling parameters, and one decoding step's choice of tokens from the
last position's logits (temperature, top-k, top-p, min-p, greedy, entropy-aware temperatures)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forkflow.ops import log_normalizer_and_entropy

# the forking-token paper: 80th percentile of Qwen3-8B's chain-of-thought token entropy on AIME
PAPER_ENTROPY_THRESHOLD = 0.672


@dataclass(frozen=True)
class ThinkingBudget:
    """After `budget` generated tokens still inside thinking (no `</think>` yet, in the prompt or the output),
    force `suffix_ids` (chat.thinking_budget_suffix) and allow `answer_budget` more tokens after it."""

    budget: int
    suffix_ids: tuple[int, ...]
    think_end_id: int
    answer_budget: int | None = None  # default: max_new_tokens - budget

    def __post_init__(self):
        if self.budget < 1:
            raise ValueError(f"thinking budget must be >= 1, got {self.budget}")
        if not self.suffix_ids:
            raise ValueError("the thinking-budget suffix is empty")
        if self.answer_budget is not None and self.answer_budget < 1:
            raise ValueError(f"answer budget must be >= 1, got {self.answer_budget}")


@dataclass(frozen=True)
class EntropyAwareTemperature:
    """The paper's decoding study: temperature `high` where the T = 1 entropy exceeds `threshold`, else
    `low`."""

    high: float
    low: float
    threshold: float = PAPER_ENTROPY_THRESHOLD

    def __post_init__(self):
        if self.high <= 0 or self.low <= 0:
            raise ValueError(f"entropy-aware temperatures must be > 0, got high={self.high}, low={self.low}")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. Entropies are reported at `temperature` (at 1 when greedy); with
    `entropy_aware` the sampling temperature of each token comes from it instead."""

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    min_p: float = 0.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    thinking: ThinkingBudget | None = None
    entropy_aware: EntropyAwareTemperature | None = None

    def __post_init__(self):
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (
                self.thinking is None or self.thinking.budget < self.max_new_tokens,
                f"the thinking budget must be below max_new_tokens ({self.max_new_tokens})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.entropy_aware is None

    @property
    def entropy_temperature(self) -> float:
        return self.temperature or 1.0

    @property
    def answer_budget(self) -> int | None:
        if self.thinking is None:
            return None
        return self.thinking.answer_budget or self.max_new_tokens - self.thinking.budget

    @property
    def longest_response(self) -> int:
        """The most tokens one sample can get: max_new_tokens, or budget + suffix + answer budget."""
        if self.thinking is None:
            return self.max_new_tokens
        return max(
            self.max_new_tokens, self.thinking.budget + len(self.thinking.suffix_ids) + self.answer_budget
        )


def candidate_tokens(
    logits: torch.Tensor, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] -> (candidate logits [B, C], their token ids [B, C]; None when all V stay in order).

    top-k and top-p both keep a prefix of the tokens sorted by logit, an order no temperature changes, so only
    that prefix (exactly k tokens) is sorted and carried on; with neither, every token stays, unsorted.
    """
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        return torch.topk(logits, top_k, dim=-1)
    if top_p < 1.0:
        return torch.sort(logits, dim=-1, descending=True)
    return logits, None


def mask_candidates(scores: torch.Tensor, top_p: float, min_p: float) -> torch.Tensor:
    """scores [B, C] (candidate logits / T, sorted descending when top_p < 1) -> the same with -inf outside
    the kept set: top-p on the (renormalised) candidates, then min-p (keep p >= min_p · max p), in the order
    transformers and vLLM apply them."""
    if top_p < 1.0:
        probs = scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # keep a token while the mass above it is still < top_p
        scores = scores.masked_fill(mass_before >= top_p, float("-inf"))
    if min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply avalanche) of int64 tensors holding 32-bit values; every
    product stays below 2^63, so no int64 overflow is involved."""
    x = x & _MASK
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK
    return (x >> 16) ^ x


def sample_keys(seed: int, prompt_keys: torch.Tensor, n: int) -> torch.Tensor:
    """The random-stream key of every sample: prompt_keys [P] int64 (ids naming the prompts) -> [P · n],
    row p · n + s for sample s of prompt p. A function of (seed, prompt key, sample index) alone."""
    seed_key = _mix(_mix(torch.tensor(seed & _MASK)) ^ (seed >> 32 & _MASK))
    prompt = _mix(_mix(seed_key ^ (prompt_keys & _MASK)) ^ (prompt_keys >> 32 & _MASK))  # [P]
    sample = _mix(torch.arange(n, device=prompt_keys.device) + 0x632BE5AB)  # [n]
    return _mix(prompt[:, None] ^ sample[None]).reshape(-1)


def keyed_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) (24 random bits, exact in float32) per row: a hash of the row's stream
    key [B] and its counter [B] (the index of the token being drawn). Counter-based, like Philox: the number
    a sample gets at a position does not depend on the batch it is drawn in, the other rows, or the rank."""
    h = _mix(keys ^ _mix(counters + 0x1B873593))
    h = _mix(h + 0x5BD1E995)
    return (h >> 8).to(torch.float32) * 2.0**-24


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of probs [B, C] by inverting the CDF with the row's uniform number [B] (drawing
    B · C exponentials or calling multinomial costs ~20x more on CPU), and no host sync on GPU."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = uniforms[:, None].to(probs.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: the jump found is > 0
    return torch.searchsorted(cdf, u, right=True)  # [B, 1]


@dataclass
class StepChoice:
    """One decoding step for B rows."""

    tokens: torch.Tensor  # [B] long
    sample_logprobs: torch.Tensor  # [B] log-prob under the distribution the token was drawn from
    log_normalizer: torch.Tensor  # [B] logsumexp of the T = 1 logits
    entropy_t1: torch.Tensor  # [B] entropy at T = 1


def choose_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> StepChoice:
    """logits [B, V] fp32 of the last position -> the next token of every row, drawn with the row's
    uniform number [B] (`keyed_uniforms`)."""
    log_normalizer, entropy_t1 = log_normalizer_and_entropy(logits)
    if params.greedy:
        tokens = logits.argmax(-1)
        return StepChoice(tokens, torch.zeros_like(entropy_t1), log_normalizer, entropy_t1)
    if params.entropy_aware is None:
        temperature = torch.full_like(entropy_t1, params.temperature)
    else:
        rule = params.entropy_aware
        temperature = torch.where(entropy_t1 > rule.threshold, rule.high, rule.low)
    candidates, token_ids = candidate_tokens(logits, params.top_k, params.top_p)
    scores = mask_candidates(candidates / temperature[:, None], params.top_p, params.min_p)
    probs = scores.softmax(-1)
    choice = draw(probs, uniforms)  # [B, 1]
    sample_logprobs = probs.gather(1, choice)[:, 0].log()  # a drawn token's p is far above fp32's underflow
    tokens = (choice if token_ids is None else token_ids.gather(1, choice))[:, 0]
    return StepChoice(tokens, sample_logprobs, log_normalizer, entropy_t1)
