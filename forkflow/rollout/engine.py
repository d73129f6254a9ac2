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

from forkflow.models.qwen3 import Qwen3ForCausalLM, apply_rope, rope_cos_sin
from forkflow.rollout import cpu_kernels
from forkflow.rollout.sampling import SamplingParams, next_tokens, sample_keys, token_logits
from forkflow.rollout.weights import DecodeWeights, kernel_threads, on_all_threads, small_ops_on_one_thread


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
        # zeros, not empty: a row's columns past its position still enter SDPA's attention (as 0 · value), and
        # never-written memory may hold NaN (0 · NaN = NaN); a slot's earlier occupant leaves finite values
        self.keys = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]
        self.values = [weight.new_zeros(shape) for _ in range(cfg.num_hidden_layers)]
        # RoPE's cos and sin at every column [capacity, D], looked up by position at each step
        positions = torch.arange(capacity, device=weight.device)[None]
        self.cos, self.sin = (t[0, 0] for t in rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, weight.dtype))

    def write_prompt(self, slots: slice, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy a prefilled prompt's keys/values ([KV, L, D] per layer) into columns [0, L) of `slots`."""
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer][slots, :, : k.shape[1]] = k
            self.values[layer][slots, :, : v.shape[1]] = v

    def move(self, source: torch.Tensor, target: torch.Tensor, width: int) -> None:
        """Copy the first `width` columns of slots `source` [F] into slots `target` [F]."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, :width] = buffer[source, :, :width]

    def columns(self, positions: torch.Tensor) -> torch.Tensor:
        """Where rows 0..B-1's keys at `positions` [B] go in a layer's buffer viewed as [slots · KV · capacity,
        D]: [B · KV], row-major (row, head)."""
        slots, heads, capacity, _ = self.keys[0].shape
        rows = torch.arange(len(positions), device=positions.device)[:, None] * heads
        return ((rows + torch.arange(heads, device=positions.device)) * capacity + positions[:, None]).view(-1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, columns: torch.Tensor) -> None:
        """Write rows 0..B-1's new keys/values k, v [B, 1, KV, D] at `columns` (`columns`). (index_copy_ on the
        flat buffer: an index_put at (rows, positions) took 5-9x longer, and scatter_ copies the whole buffer in
        bf16 on CPU.)"""
        D = k.shape[-1]
        for buffer, new in ((self.keys[layer], k), (self.values[layer], v)):
            buffer.view(-1, D).index_copy_(0, columns, new.reshape(-1, D))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (normalised in fp32, rounded to x's dtype, then times the weight) in two ops
    instead of eight: F.rms_norm's kernel normalises in fp32 and rounds. weight broadcasts against x."""
    return F.rms_norm(x, x.shape[-1:], eps=eps).mul_(weight)


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_stack(
    model: Qwen3ForCausalLM, weights: DecodeWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    attend: Attend,
) -> torch.Tensor:
    """Qwen3ForCausalLM.forward's decoder stack on x [B, T, H] with the projections of `weights`, RoPE's cos
    and sin [B, T, 1, D] at the tokens' positions, and attend(layer, q [B, T, heads, D], k, v [B, T, KV, D])
    -> [B, T, heads · D] for attention (which also stores k and v): the final hidden states [B, T, H]. q and
    k are normalised and rotated together (one op each for both)."""
    for index, (layer, w) in enumerate(zip(model.model.layers, weights.layers, strict=True)):
        attn = layer.self_attn
        h = rms_norm(x, layer.input_layernorm.weight, w.eps)
        qk, v = w.qkv(h).unflatten(-1, (-1, attn.head_dim)).split([attn.num_heads + attn.num_kv_heads,
                                                                   attn.num_kv_heads], dim=2)  # fmt: skip
        qk = apply_rope(rms_norm(qk, w.qk_norm, w.eps), cos, sin)
        x = w.o.add(attend(index, qk[:, :, : attn.num_heads], qk[:, :, attn.num_heads :], v), x)
        h = rms_norm(x, layer.post_attention_layernorm.weight, w.eps)
        if w.gate is None:  # a sparse MoE layer runs as its module (which also returns its router logits)
            x = x + on_all_threads(layer.mlp, h)[0]
        else:
            x = w.down.add(w.up.mul(h, w.gate.silu(h)), x)
    return rms_norm(x, model.model.norm.weight, model.model.norm.eps)


def prefill(
    model: Qwen3ForCausalLM, weights: DecodeWeights, prompt: Sequence[int], cache: SlotKVCache
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Run one prompt through the model -> its keys and values [KV, L, D] per layer (after k_norm and RoPE)
    and its last position's final hidden state [H]. cache: for RoPE's cos and sin at positions 0..L-1."""
    ids = torch.tensor([prompt], device=cache.cos.device)
    keys, values = [], []

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        keys.append(k[0].contiguous())  # a copy of k alone: the view would hold all of q/k and q/k/v
        values.append(v[0].contiguous())
        out = on_all_threads(F.scaled_dot_product_attention, q, k, v, is_causal=True, scale=q.shape[-1] ** -0.5,
                             enable_gqa=True)  # fmt: skip
        return out.transpose(1, 2).flatten(2)

    cos, sin = cache.cos[None, : len(prompt), None], cache.sin[None, : len(prompt), None]
    with small_ops_on_one_thread(ids.device):
        hidden = decoder_stack(model, weights, model.model.embed_tokens(ids), cos, sin, attend)
    return keys, values, hidden[0, -1]


def decode(
    model: Qwen3ForCausalLM, weights: DecodeWeights, tokens: torch.Tensor, positions: torch.Tensor, width: int,
    cache: SlotKVCache,
) -> torch.Tensor:
    """One token per row, tokens [B] at positions [B] (width = max(positions) + 1) -> the final hidden
    states [B, H]: each row at its own position in its own cache slot, seeing its columns 0..position.

    Attention on CPU in fp32 is forkflow's kernel (`cpu_kernels.decode_attention`), which also writes the new
    keys and values into the cache, reads each row's cache only up to the row's position and each key/value
    head once for its G query heads. Elsewhere the cache is written by `SlotKVCache.update` and attention is
    SDPA over the first `width` columns with the columns past a row's position masked, each key/value head's
    G query heads given as G query rows of that head ([B, KV, G, D]): SDPA then reads each key/value head
    once for all G, with the result of enable_gqa, which reads it G times (4-5x slower in bf16 at
    Qwen3-0.6B's shape on CPU). (Two batched matmuls would copy the cache's strided [:B, :, :width] view in
    bf16, 2-5x slower than SDPA.)"""
    B = len(tokens)
    cos, sin = cache.cos[positions, None, None], cache.sin[positions, None, None]  # [B, 1, 1, D]
    head_dim = cache.keys[0].shape[-1]
    scale = head_dim**-0.5
    if attention_kernel(cache.keys[0]):
        lengths = positions + 1

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = cpu_kernels.decode_attention(q[:, 0], k[:, 0], v[:, 0], cache.keys[layer], cache.values[layer],
                                               lengths, scale, kernel_threads())  # fmt: skip
            return out[:, None]
    else:
        columns = cache.columns(positions)
        unseen = torch.arange(width, device=positions.device) > positions[:, None]  # [B, width]
        bias = cache.cos.new_zeros(()).masked_fill(unseen, float("-inf"))[:, None, None]  # [B, 1, 1, width]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.update(layer, k, v, columns)
            keys, values = cache.keys[layer][:B, :, :width], cache.values[layer][:B, :, :width]
            q = q.reshape(B, keys.shape[1], -1, head_dim)
            out = on_all_threads(F.scaled_dot_product_attention, q, keys, values, attn_mask=bias, scale=scale)
            return out.reshape(B, 1, -1)

    with small_ops_on_one_thread(tokens.device):
        return decoder_stack(model, weights, model.model.embed_tokens(tokens[:, None]), cos, sin, attend)[:, 0]


def attention_kernel(keys: torch.Tensor) -> bool:
    """Whether decoding's attention over a cache of `keys` [slots, KV, capacity, D] runs on forkflow's CPU kernel."""
    cpu_fp32 = keys.device.type == "cpu" and keys.dtype == torch.float32
    return cpu_fp32 and keys.shape[-1] % 8 == 0 and cpu_kernels.available()


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

    def __init__(
        self, model: Qwen3ForCausalLM, weights: DecodeWeights, prompts: Sequence[Sequence[int]],
        params: SamplingParams,
    ):
        self.model, self.weights, self.prompts, self.params = model, weights, prompts, params
        self.device = model.lm_head.weight.device
        self.next, self.total = 0, len(prompts) * params.n
        # (prompt, its keys, its values, its last hidden state)
        self.kept: tuple[int, list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.total - self.next

    def prefill(self, prompt: int, cache: SlotKVCache) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        if self.kept is None or self.kept[0] != prompt:
            self.kept = (prompt, *prefill(self.model, self.weights, self.prompts[prompt], cache))
        return self.kept[1:]

    def admit(self, count: int, cache: SlotKVCache, first_slot: int) -> tuple[DecodingRows, torch.Tensor]:
        """The next `count` requests into slots first_slot.. -> their rows and hidden states [count, H]."""
        n, params = self.params.n, self.params
        requests = range(self.next, self.next + count)
        hidden, lengths, closed = [], [], []
        for prompt in range(requests[0] // n, (requests[-1] // n) + 1):
            samples = range(max(requests[0], prompt * n), min(requests[-1] + 1, (prompt + 1) * n))
            keys, values, last_hidden = self.prefill(prompt, cache)
            slot = first_slot + samples[0] - requests[0]
            cache.write_prompt(slice(slot, slot + len(samples)), keys, values)
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
    weights = weights or DecodeWeights(model)
    queue = RequestQueue(model, weights, prompts, params)
    slots = batch_slots(len(queue), slot, max_batch_tokens)
    cache = SlotKVCache(model, slots, slot)
    results = Results(len(queue), params.longest_response, device)
    stream = sample_keys(params.seed, keys, params.n)  # [R], indexed by request
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=device)

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
