"""What to sample and how: the sampling parameters, and one decoding step's choice of tokens from the
last position's hidden states (temperature, top-k, top-p, min-p, greedy, entropy-aware temperatures; plain
sampling at temperature 1, RLVR's setting, in one vocabulary-chunked pass)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forkflow.ops import log_normalizer_and_entropy, statistics_dtype
from forkflow.rollout import cpu_kernels
from forkflow.rollout.weights import Head, kernel_threads, small_ops_on_one_thread

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
    def plain(self) -> bool:
        """softmax(z) itself, unfiltered: sampled by `sample_plain` without a [B, V] logits tensor."""
        return (
            self.temperature == 1.0
            and self.entropy_aware is None
            and self.top_k == 0
            and self.top_p == 1.0
            and self.min_p == 0.0
        )

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


def keyed_uniforms(keys: torch.Tensor, counters: torch.Tensor, draws: int | None = None) -> torch.Tensor:
    """Uniform numbers in (0, 1), a hash of the row's stream key [B] and its counter [B] (the index of the
    token being drawn): one per row [B], or `draws` per row [B, draws] (number j also hashes j). Counter-based,
    like Philox: the numbers a sample gets at a position do not depend on the batch it is drawn in, the other
    rows, or the rank. See `to_uniform` for their grid."""
    h = _mix(keys ^ _mix(counters + 0x1B873593))
    if draws is not None:
        h = _mix(h[:, None] ^ _mix(torch.arange(draws, device=h.device) + 0x2F6B1C3D))
    return to_uniform(_mix(h + 0x5BD1E995))


def to_uniform(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> the midpoints of 2^23 equal cells of (0, 1): (k + 1/2) · 2^-23 for the top 23 bits k,
    exact in float32, from 2^-24 to 1 - 2^-24. Never 0: a draw with u = 0 would pick the first token (or
    block) of nonzero probability, however small (`sample_plain` then chose tokens of probability e^-40 once
    per ~13,000 draws over Qwen3's vocabulary); never 1, which no test u < p passes."""
    return ((h >> 9).to(torch.float32) + 0.5) * 2.0**-23


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
    entropies: torch.Tensor  # [B] entropy at params.entropy_temperature


def next_tokens(
    hidden: torch.Tensor, head: Head, params: SamplingParams, keys: torch.Tensor, counters: torch.Tensor
) -> StepChoice:
    """The last position's hidden states [B, H] and the LM head (`weights.Head`) -> every row's next token,
    drawn with the random numbers of (its stream key [B], its counter [B]) (`keyed_uniforms`)."""
    if params.plain:  # on CPU its ops over whole chunks are the LM head's and the kernel's; the rest are small
        with small_ops_on_one_thread(hidden.device):
            return sample_plain(hidden, head, keyed_uniforms(keys, counters, 2 * _blocks(len(head.weight))))
    logits = head.logits(hidden).to(statistics_dtype(head.weight.dtype))
    return choose_tokens(logits, params, keyed_uniforms(keys, counters))


def token_logits(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """hidden [B, H] · weight[tokens [B]] in the statistics' dtype: the logit of one token per row without a
    [B, V] product (for bf16 weights more exact than the bf16-rounded logits, against fp32's)."""
    dtype = statistics_dtype(weight.dtype)
    return torch.linalg.vecdot(hidden.to(dtype), weight[tokens].to(dtype))


def choose_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> StepChoice:
    """logits [B, V] fp32 of the last position -> the next token of every row, drawn with the row's
    uniform number [B] (`keyed_uniforms`)."""
    log_normalizer, entropy_t1 = log_normalizer_and_entropy(logits)
    if params.entropy_temperature == 1.0:
        entropies = entropy_t1
    else:
        entropies = log_normalizer_and_entropy(logits / params.entropy_temperature)[1]
    if params.greedy:
        tokens = logits.argmax(-1)
        return StepChoice(tokens, torch.zeros_like(entropy_t1), log_normalizer, entropies)
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
    return StepChoice(tokens, sample_logprobs, log_normalizer, entropies)


BLOCK = 128  # vocabulary tokens per block of `sample_plain`'s draw (Qwen3's 151,936: 1187; divides weights.CHUNK)
# `sample_plain` raises logits more than 87 nats below the running maximum to it before exp: exp is 4-18x slower
# on CPU where its result is subnormal or underflows (below e^-87.3), which is most of a trained model's vocabulary
EXP_FLOOR = -87.0


def _blocks(vocab: int) -> int:
    return -(-vocab // BLOCK)


def _block_logits(logits: torch.Tensor) -> torch.Tensor:
    """A chunk's logits [B, c] -> [B, ceil(c / BLOCK), BLOCK] in the statistics' dtype, the last block padded
    with the dtype's lowest value (finite, unlike -inf; `sample_plain` floors it like any negligible logit)."""
    dtype = statistics_dtype(logits.dtype)
    logits = logits.to(dtype)
    pad = -logits.shape[1] % BLOCK
    if pad:
        logits = torch.nn.functional.pad(logits, (0, pad), value=torch.finfo(dtype).min)
    return logits.view(logits.shape[0], -1, BLOCK)


def block_exponentials(z: torch.Tensor, running_max: torch.Tensor):
    """A chunk's logits z [B, k, BLOCK] (overwritten) and each row's maximum logit so far [B] -> (the new maximum
    M' [B], e = exp(y) [B, k, BLOCK], its block masses e.sum(-1) [B, k], Σ e · y [B]) with y = max(z - M',
    EXP_FLOOR): forkflow's CPU kernel (`cpu_kernels.block_softmax`, two sweeps over the chunk per row) where it
    runs, else eight torch ops over the chunk."""
    if z.device.type == "cpu" and z.dtype == torch.float32 and z.is_contiguous() and cpu_kernels.available():
        return cpu_kernels.block_softmax(z, running_max, EXP_FLOOR, kernel_threads())
    new_max = torch.maximum(running_max, z.amax((1, 2)))
    y = z.sub_(new_max[:, None, None]).clamp_min_(EXP_FLOOR)
    e = y.exp()
    return new_max, e, e.sum(-1), torch.linalg.vecdot(e.flatten(1), y.flatten(1))


def sample_plain(hidden: torch.Tensor, head: Head, uniforms: torch.Tensor) -> StepChoice:
    """A token from softmax(hidden · Wᵀ) per row, with that distribution's logsumexp and entropy, in one pass
    over the vocabulary, one chunk of the head (weights.CHUNK logits) at a time: no [B, V] tensor, where
    `choose_tokens` makes ~10 passes over [B, V] ones. uniforms [B, 2 · blocks] (`keyed_uniforms`).

    The draw is reservoir sampling over blocks of BLOCK tokens: the candidate is replaced by a draw from block
    j (inverse CDF within it, with uniform 2j + 1) when uniform 2j < w_j / W_j, w_j the block's mass and W_j
    that of blocks 0..j; the last replacement is then distributed as softmax exactly (induction over j), so
    only the last replacing block's probabilities are kept and drawn from once, at the end. The masses are
    kept relative to the running maximum logit M (online softmax): S = Σ exp(z - M) and
    D = Σ exp(z - M)(z - M) give lse = M + log S and H = log S - D / S, without cancelling large terms.
    The blocks, and so the draw, do not depend on the batch.

    Logits below M + EXP_FLOOR (and the padding of the last block) count as M + EXP_FLOOR: each then adds
    e^-87 (relative to the largest probability) to S and D, far below float32's resolution of either, and
    can never be drawn: a block is drawn when u < w_j / W_j and a token when u falls in its slice of the
    block's CDF, with u >= 2^-24 (`to_uniform`), so no block or token of share below 2^-24 is drawn
    (float32's own resolution of a probability next to 1).
    """
    B, dtype = hidden.shape[0], statistics_dtype(head.weight.dtype)
    uniforms = uniforms.view(B, -1, 2)
    rows = torch.arange(B, device=hidden.device)
    M = torch.full((B,), torch.finfo(dtype).min, dtype=dtype, device=hidden.device)
    S, D = torch.zeros_like(M), torch.zeros_like(M)
    block = torch.zeros(B, dtype=torch.long, device=hidden.device)  # the last replacing block so far
    candidate = torch.zeros(B, BLOCK, dtype=dtype, device=hidden.device)  # its exp(z - its chunk's max)
    for start, projection in head.chunks:
        new_M, e, w, dot = block_exponentials(_block_logits(projection(hidden)), M)  # w: [B, k] block masses
        k = w.shape[1]
        rescale = (M - new_M).exp_()
        mass = (S * rescale)[:, None] + w.cumsum(-1)  # W_j
        D = rescale * (D + (M - new_M) * S) + dot
        M, S = new_M, mass[:, -1]
        replace = uniforms[:, start // BLOCK : start // BLOCK + k, 0] * mass < w
        last = (replace * torch.arange(1, k + 1, device=w.device)).argmax(-1)  # the last replacement
        replaced = replace.any(-1)
        block = torch.where(replaced, start // BLOCK + last, block)
        candidate = torch.where(replaced[:, None], e[rows, last], candidate)
        del e  # not kept beside the next chunk's logits, exponentials and their product (the plan's 3 chunks)
    tokens = block * BLOCK + draw(candidate, uniforms[rows, block, 1])[:, 0]
    log_normalizer = M + S.log()
    entropies = (S.log() - D / S).clamp_(min=0.0)
    sample_logprobs = token_logits(hidden, head.weight, tokens) - log_normalizer
    return StepChoice(tokens, sample_logprobs, log_normalizer, entropies)
