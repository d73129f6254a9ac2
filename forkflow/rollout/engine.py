"""KV-cache generation with forkflow's Qwen3, continuously batched.

A call's requests are its P · n (prompt, sample) pairs, in that order. Each row of the decoding batch owns a
slot of the KV cache (`SlotKVCache`) that holds its prompt and its response so far. A prompt is prefilled
once, alone, when its first sample is admitted, and its keys/values are copied into the slots of its
samples. Every step samples one token per row from the last position's hidden state, then runs one decoding
forward for the rows still going; a finished row leaves at once (the last rows move into its slot, so only
their caches are copied) and queued requests take the freed slots, so a long tail neither keeps finished
rows busy nor holds back the requests that could fill their place. `max_batch_tokens` bounds the slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forkflow.models.qwen3 import Attention, KVCache, Qwen3ForCausalLM, apply_rope, rope_cos_sin
from forkflow.rollout.sampling import SamplingParams, next_tokens, sample_keys, token_logits
from forkflow.rollout.weights import DecodeWeights, LayerWeights


class PromptError(ValueError):
    """A prompt the engine cannot take; `index` is its position in the list given, `reason` a sentence."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"prompts[{index}]: {reason}")
        self.index, self.reason = index, reason


@dataclass
class Sample:
    """One generated response. Of the two log-prob fields:

    logprobs         log softmax(z)[token] at T = 1 with no filtering: the model's own log-prob, what a
                     teacher-forced forward gives (ops.token_logprobs_and_entropy at temperature 1);
    sample_logprobs  log-prob under the distribution the token was actually drawn from: softmax(z / T) after
                     top-k/top-p/min-p, T the sampling temperature of that token; 0 for greedy decoding and
                     for the tokens of the forced thinking-budget suffix (`forced_span`).
    entropies        H(softmax(z / T)) with T = params.temperature (1 when greedy): the rollout-temperature
                     entropy the forking-token paper ranks tokens by.
    A backend that does not compute `logprobs` or `entropies` (vLLM) leaves them None.
    """

    prompt_index: int
    sample_index: int
    token_ids: torch.Tensor  # [L] long, the stop token included when finish_reason == "stop"
    logprobs: torch.Tensor | None  # [L] fp32
    sample_logprobs: torch.Tensor  # [L] fp32
    entropies: torch.Tensor | None  # [L] fp32
    finish_reason: str  # "stop": a stop token was generated; "length": a token budget or the context ran out
    forced_span: tuple[int, int] | None = None  # [start, end) of token_ids forced by the thinking budget


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int) -> None:
    """Raise PromptError for the first prompt that is empty, leaves no room in the context, or holds an id
    outside the vocabulary."""
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise PromptError(i, "prompt is empty")
        if len(prompt) >= context:
            raise PromptError(
                i,
                f"prompt has {len(prompt)} tokens, but the model's context (max_position_embeddings) is "
                f"{context}; no room is left to generate",
            )
        check_vocabulary(i, "prompt", prompt, vocab_size)


def check_vocabulary(index: int, what: str, token_ids: Sequence[int], vocab_size: int) -> None:
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise PromptError(
            index, f"{what} token id {bad[0]} is outside the model's vocabulary (size {vocab_size})"
        )


def slot_tokens(prompts: Sequence[Sequence[int]], params: SamplingParams, context: int) -> int:
    """The KV-cache tokens of one decoding row: the longest prompt plus its longest response (within the
    context)."""
    return max(len(p) + min(params.longest_response, context - len(p)) for p in prompts)


def batch_slots(requests: int, slot_tokens: int, max_batch_tokens: int | None) -> int:
    """How many requests decode at once: all of them without a bound, else as many slots of `slot_tokens`
    as max_batch_tokens holds (at least one, or a ValueError saying what to set)."""
    if max_batch_tokens is None:
        return requests
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int):
        raise TypeError(f"max_batch_tokens must be a number of KV-cache tokens (int) or None, got {max_batch_tokens!r}")
    if max_batch_tokens < slot_tokens:
        raise ValueError(
            f"max_batch_tokens={max_batch_tokens} cannot hold one request: the longest prompt plus its longest "
            f"response needs {slot_tokens} KV-cache tokens; set max_batch_tokens >= {slot_tokens} (or leave it "
            f"unset to decode all requests at once)"
        )
    return min(requests, max_batch_tokens // slot_tokens)


class SlotKVCache:
    """The decoding batch's keys/values (after k_norm and RoPE): per layer a [slots, KV, capacity, D] buffer,
    batch row r in slot r with its sequence's tokens at columns [0, length).

    Rows join by writing a prompt's keys/values into the next free slots (`write_prompt`) and leave by having
    the last rows move into their slots (`move`), so neither copies the other rows' caches. A decoding step
    writes each row's new token at the row's own column, its position (`update`).
    """

    def __init__(self, model: Qwen3ForCausalLM, slots: int, capacity: int):
        cfg, weight = model.config, model.lm_head.weight
        shape = (slots, cfg.num_key_value_heads, capacity, cfg.head_dim)
        # zeros, not empty: a row's columns past its position still enter attention (as 0 · value), and
        # never-written memory may hold NaN (0 · NaN = NaN); a slot's earlier occupant leaves finite values
        self.keys = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]
        self.values = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]
        # RoPE's cos and sin at every column [capacity, D], looked up by position at each step
        positions = torch.arange(capacity, device=weight.device)[None]
        self.cos, self.sin = (t[0, 0] for t in rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, weight.dtype))

    def write_prompt(self, slots: slice, cache: KVCache) -> None:
        """Copy a prefilled prompt's keys/values ([1, KV, L, D] per layer) into columns [0, L) of `slots`."""
        length = len(cache)
        for layer, (keys, values) in enumerate(zip(cache.keys, cache.values, strict=True)):
            self.keys[layer][slots, :, :length] = keys
            self.values[layer][slots, :, :length] = values

    def move(self, source: torch.Tensor, target: torch.Tensor, width: int) -> None:
        """Copy the first `width` columns of slots `source` [F] into slots `target` [F]."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, :width] = buffer[source, :, :width]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: tuple[torch.Tensor, torch.Tensor], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write rows 0..B-1's new keys/values k, v [B, KV, 1, D] at slot = (rows 0..B-1, their positions);
        return their first `width` columns [B, KV, width, D]. (An index_put: scatter_ copies the whole
        buffer in bf16 on CPU, 1000x slower.)"""
        rows, positions = slot
        self.keys[layer][rows, :, positions] = k[:, :, 0]
        self.values[layer][rows, :, positions] = v[:, :, 0]
        return self.keys[layer][: len(rows), :, :width], self.values[layer][: len(rows), :, :width]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (normalised in fp32, rounded to x's dtype, then times the weight) in two ops
    instead of eight: F.rms_norm's kernel normalises in fp32 and rounds. weight broadcasts against x."""
    return F.rms_norm(x, x.shape[-1:], eps=eps).mul_(weight)


def decode_attention(
    attn: Attention, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
    cache: SlotKVCache, layer: int, slot: tuple[torch.Tensor, torch.Tensor], width: int,
) -> torch.Tensor:
    """Attention.forward for one query per row, x [B, 1, hidden]. q and k are normalised and rotated together
    (one op each for both); each key/value head's G query heads are G query rows of that head
    ([B, KV, G, D]): SDPA then reads each key/value head once for all G, with the result of enable_gqa,
    which reads it G times (4-5x slower in bf16 at Qwen3-0.6B's shape on CPU). (Two batched matmuls would
    copy the cache's strided [:B, :, :width] view in bf16, 2-5x slower than SDPA.)"""
    B, KV, D, heads = x.shape[0], attn.num_kv_heads, attn.head_dim, attn.num_heads
    qk, v = w.qkv(x).view(B, heads + 2 * KV, D).split([heads + KV, KV], dim=1)
    qk = apply_rope(rms_norm(qk, w.qk_norm, w.eps), cos, sin)
    q, k = qk[:, :heads].reshape(B, KV, heads // KV, D), qk[:, heads:, None]
    keys, values = cache.update(layer, k, v[:, :, None], slot, width)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=D**-0.5)
    return w.o(out.reshape(B, 1, -1))


def decode_mlp(mlp: torch.nn.Module, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """The layer's MLP: a dense SwiGLU through its fused gate/up projection, a sparse MoE as its module."""
    if w.gate_up is None:
        return mlp(x)[0]  # an MoE layer also returns its router logits
    gate, up = w.gate_up(x).chunk(2, dim=-1)
    return w.down(F.silu(gate, inplace=True).mul_(up))


def decode(
    model: Qwen3ForCausalLM, weights: DecodeWeights, tokens: torch.Tensor, positions: torch.Tensor, width: int,
    cache: SlotKVCache,
) -> torch.Tensor:
    """One token per row, tokens [B] at positions [B] (width = max(positions) + 1) -> the final hidden
    states [B, H]: Qwen3ForCausalLM.forward's decoder stack with the projections of `weights`, each row at
    its own position in its own cache slot, seeing its columns 0..position."""
    x = model.model.embed_tokens(tokens[:, None])
    cos, sin = cache.cos[positions, None], cache.sin[positions, None]  # [B, 1, D]
    unseen = torch.arange(width, device=positions.device) > positions[:, None]  # [B, width]
    bias = torch.zeros((), dtype=x.dtype, device=x.device).masked_fill(unseen, float("-inf"))[:, None, None]
    slot = (torch.arange(len(positions), device=positions.device), positions)
    for index, (layer, w) in enumerate(zip(model.model.layers, weights.layers, strict=True)):
        h = rms_norm(x, layer.input_layernorm.weight, w.eps)
        x = x + decode_attention(layer.self_attn, w, h, cos, sin, bias, cache, index, slot, width)
        x = x + decode_mlp(layer.mlp, w, rms_norm(x, layer.post_attention_layernorm.weight, w.eps))
    return rms_norm(x, model.model.norm.weight, model.model.norm.eps)[:, 0]


@dataclass
class DecodingRows:
    """State of the rows decoding, each field [B]; `select` reorders or drops rows, `join` appends rows."""

    request: torch.Tensor  # which request (index into the results: prompt · n + sample) the row produces
    generated: torch.Tensor  # tokens generated so far
    limit: torch.Tensor  # the row stops when `generated` reaches it
    prompt_length: torch.Tensor
    in_thinking: torch.Tensor | None = None  # thinking budget only: no </think> yet
    suffix_pos: torch.Tensor | None = None  # thinking budget only: next suffix token to force, -1: none

    def __len__(self) -> int:
        return len(self.request)

    def select(self, rows: torch.Tensor) -> DecodingRows:
        return DecodingRows(**{k: None if v is None else v[rows] for k, v in vars(self).items()})

    def join(self, other: DecodingRows) -> DecodingRows:
        return DecodingRows(
            **{k: None if v is None else torch.cat([v, getattr(other, k)]) for k, v in vars(self).items()}
        )


class RequestQueue:
    """The requests not yet decoding, admitted in order. A prompt is prefilled alone (its keys/values and
    last hidden state do not depend on the other prompts) when its first sample is admitted; when only some
    of its samples fit, the prefill is kept for the others (one prompt at most, beside the slots)."""

    def __init__(self, model: Qwen3ForCausalLM, prompts: Sequence[Sequence[int]], params: SamplingParams):
        self.model, self.prompts, self.params = model, prompts, params
        self.device = model.lm_head.weight.device
        self.next, self.total = 0, len(prompts) * params.n
        self.kept: tuple[int, KVCache, torch.Tensor] | None = None  # (prompt, its cache, its last hidden state)

    def __len__(self) -> int:
        return self.total - self.next

    def prefill(self, prompt: int) -> tuple[KVCache, torch.Tensor]:
        if self.kept is not None and self.kept[0] == prompt:
            return self.kept[1:]
        cache = KVCache.empty(self.model.config.num_hidden_layers, 1, self.device)
        ids = torch.tensor([self.prompts[prompt]], device=self.device)
        hidden = self.model(ids, cache=cache).hidden_states[0, -1]
        self.kept = (prompt, cache, hidden)
        return cache, hidden

    def admit(self, count: int, cache: SlotKVCache, first_slot: int) -> tuple[DecodingRows, torch.Tensor]:
        """The next `count` requests into slots first_slot.. -> their rows and hidden states [count, H]."""
        n, params = self.params.n, self.params
        requests = range(self.next, self.next + count)
        hidden, lengths, closed = [], [], []
        for prompt in range(requests[0] // n, (requests[-1] // n) + 1):
            samples = range(max(requests[0], prompt * n), min(requests[-1] + 1, (prompt + 1) * n))
            prefill, last_hidden = self.prefill(prompt)
            slot = first_slot + samples[0] - requests[0]
            cache.write_prompt(slice(slot, slot + len(samples)), prefill)
            hidden.append(last_hidden.expand(len(samples), -1))
            lengths += [len(self.prompts[prompt])] * len(samples)
            if params.thinking is not None:
                closed += [params.thinking.think_end_id in self.prompts[prompt]] * len(samples)
        self.next += count
        if self.kept is not None and self.next >= (self.kept[0] + 1) * n:
            self.kept = None
        prompt_length = torch.tensor(lengths, device=self.device)
        context_left = self.model.config.max_position_embeddings - prompt_length
        rows = DecodingRows(
            request=torch.arange(requests[0], requests[-1] + 1, device=self.device),
            generated=torch.zeros_like(prompt_length),
            limit=context_left.clamp(max=params.max_new_tokens),
            prompt_length=prompt_length,
        )
        if params.thinking is not None:
            rows.in_thinking = ~torch.tensor(closed, device=self.device)
            rows.suffix_pos = torch.full_like(prompt_length, -1)
        return rows, torch.cat(hidden)


class Results:
    """Every request's tokens and per-token statistics, [R, longest response] each, filled row by row."""

    def __init__(self, requests: int, longest: int, device: torch.device):
        self.values = {key: torch.zeros(requests, longest, device=device)
                       for key in ("logprobs", "sample_logprobs", "entropies")}
        self.values["token_ids"] = torch.zeros(requests, longest, dtype=torch.long, device=device)
        self.length = torch.zeros(requests, dtype=torch.long, device=device)
        self.stopped = torch.zeros(requests, dtype=torch.bool, device=device)
        self.suffix_at = torch.full((requests,), -1, dtype=torch.long, device=device)

    def record(self, rows: DecodingRows, **values: torch.Tensor) -> None:
        for key, value in values.items():
            self.values[key][rows.request, rows.generated] = value

    def finish(self, rows: DecodingRows, done: torch.Tensor, stopped: torch.Tensor) -> None:
        self.length[rows.request[done]] = rows.generated[done]
        self.stopped[rows.request[done]] = stopped[done]

    def samples(self, num_prompts: int, n: int, suffix_length: int) -> list[list[Sample]]:
        values = {key: value.cpu() for key, value in self.values.items()}
        lengths, stopped, suffix_at = self.length.tolist(), self.stopped.tolist(), self.suffix_at.tolist()
        forced_spans = [
            (at, min(at + suffix_length, length)) if at >= 0 else None
            for at, length in zip(suffix_at, lengths, strict=True)
        ]
        return [
            [
                Sample(
                    prompt_index=r // n,
                    sample_index=r % n,
                    **{key: value[r, : lengths[r]].clone() for key, value in values.items()},
                    finish_reason="stop" if stopped[r] else "length",
                    forced_span=forced_spans[r],
                )
                for r in range(p * n, (p + 1) * n)
            ]
            for p in range(num_prompts)
        ]


def force_thinking_suffix(
    rows: DecodingRows, tokens: torch.Tensor, params: SamplingParams, context: int, results: Results
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thinking budget: rows at the budget start the suffix (their limit becomes the answer budget after it,
    within the context); rows inside the suffix take its next token instead of the sampled one. Updates the
    rows' thinking state; returns (the tokens, which rows were forced)."""
    thinking = params.thinking
    suffix = torch.tensor(thinking.suffix_ids, device=tokens.device)
    starts = rows.in_thinking & (rows.generated == thinking.budget) & (rows.suffix_pos < 0)
    rows.suffix_pos = rows.suffix_pos.masked_fill(starts, 0)
    answer_end = torch.minimum(rows.generated + len(suffix) + params.answer_budget, context - rows.prompt_length)
    rows.limit = torch.where(starts, answer_end, rows.limit)
    results.suffix_at[rows.request[starts]] = rows.generated[starts]
    forced = rows.suffix_pos >= 0
    tokens = torch.where(forced, suffix[rows.suffix_pos.clamp(min=0)], tokens)
    rows.in_thinking &= tokens != thinking.think_end_id
    rows.suffix_pos = torch.where(forced, rows.suffix_pos + 1, rows.suffix_pos)
    rows.suffix_pos = rows.suffix_pos.masked_fill(rows.suffix_pos == len(suffix), -1)
    return tokens, forced


def leave(done: torch.Tensor, finished: int, cache: SlotKVCache, width: int) -> torch.Tensor:
    """Drop the `done` rows (`finished` of them): the last rows still going move into their slots. Returns
    the kept rows' old indices in their new order [B'] (only moved rows change place)."""
    kept = len(done) - finished
    holes = done[:kept].nonzero()[:, 0]
    movers = (~done[kept:]).nonzero()[:, 0] + kept
    cache.move(movers, holes, width)
    order = torch.arange(kept, device=done.device)
    order[holes] = movers
    return order


@torch.no_grad()
def generate(
    model: Qwen3ForCausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    on_step: Callable[[int, int], None] | None = None,
    prompt_keys: Sequence[int] | None = None,
    max_batch_tokens: int | None = None,
    weights: DecodeWeights | None = None,
) -> list[list[Sample]]:
    """Sample `params.n` responses for each prompt (token ids). Returns samples[prompt][sample].

    on_step(tokens, finished) is called after each decoding step with the number of tokens it produced and of
    samples that finished at it (a progress bar hooks in here). prompt_keys name the prompts' random streams
    (default: their indices in this call): the random numbers behind token t of sample s of a prompt are a
    function of (params.seed, its key, s, t) alone, so a prompt's samples do not depend on which other
    prompts share the call, in what order, on which rank, or on max_batch_tokens (the same key gives the
    same samples; only float rounding that differs with the batch shape could move a draw sitting on a
    boundary).

    max_batch_tokens bounds the KV cache: every decoding row holds a slot of (longest prompt + longest
    response) tokens, the longest over this call's prompts (a response's longest: params.longest_response,
    within the context), so max_batch_tokens // that many requests decode at once and the others are
    admitted as rows finish; beside the slots, one prompt's cache at most waits for its later samples.
    None: all P · n requests at once.

    weights: `model`'s weights laid out for decoding (`weights.DecodeWeights`, made here when not given).
    """
    if not prompts:
        return []
    cfg = model.config
    context = cfg.max_position_embeddings
    check_prompts(prompts, cfg.vocab_size, context)
    device = model.lm_head.weight.device
    keys = torch.tensor(range(len(prompts)) if prompt_keys is None else list(prompt_keys), device=device)
    if len(keys) != len(prompts):
        raise ValueError(f"got {len(keys)} prompt keys for {len(prompts)} prompts")
    slot = slot_tokens(prompts, params, context)
    queue = RequestQueue(model, prompts, params)
    slots = batch_slots(len(queue), slot, max_batch_tokens)
    cache = SlotKVCache(model, slots, slot)
    results = Results(len(queue), params.longest_response, device)
    stream = sample_keys(params.seed, keys, params.n)  # [R], indexed by request
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)
    weights = weights or DecodeWeights(model)

    rows, hidden = queue.admit(slots, cache, 0)
    while True:
        step = next_tokens(hidden, weights.head, params, stream[rows.request], rows.generated)
        tokens, sample_logprobs = step.tokens, step.sample_logprobs
        if params.thinking is not None:
            tokens, forced = force_thinking_suffix(rows, tokens, params, context, results)
            sample_logprobs = sample_logprobs.masked_fill(forced, 0.0)
        logprobs = token_logits(hidden, weights.head.weight, tokens) - step.log_normalizer
        results.record(rows, token_ids=tokens, logprobs=logprobs, sample_logprobs=sample_logprobs,
                       entropies=step.entropies)
        stopped = torch.isin(tokens, stop_ids)
        done = stopped | (rows.generated + 1 >= rows.limit)
        rows.generated += 1
        ends = rows.prompt_length + rows.generated  # a row's cache columns at its next decoding step
        finished, width = torch.stack([done.sum(), ends.masked_fill(done, 0).max()]).tolist()  # one host sync
        if on_step is not None:
            on_step(len(tokens), finished)
        if finished:
            results.finish(rows, done, stopped)
            order = leave(done, finished, cache, width)
            rows, tokens = rows.select(order), tokens[order]
        if len(rows) == 0 and len(queue) == 0:
            break
        if len(rows):
            hidden = decode(model, weights, tokens, rows.prompt_length + rows.generated - 1, width, cache)
        else:  # every row finished; queued requests fill the batch
            hidden = hidden[:0]
        if len(queue) and len(rows) < slots:
            new_rows, new_hidden = queue.admit(min(len(queue), slots - len(rows)), cache, len(rows))
            rows, hidden = rows.join(new_rows), torch.cat([hidden, new_hidden])

    suffix_length = len(params.thinking.suffix_ids) if params.thinking is not None else 0
    return results.samples(len(prompts), params.n, suffix_length)
