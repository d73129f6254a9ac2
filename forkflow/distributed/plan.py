"""How much GPU memory a forkflow run needs on each rank, before it runs: `forkflow plan CONFIG --gpus N
--gpu-memory 80GiB [key=value ...]` prints the bytes of every component, the peak, and whether it fits.

A run goes through up to three phases, each with its own peak (the run's peak is the largest):
  training  the ChunkFlow forward/backward of an update: sharded fp32 state, FSDP's gathered weights,
            the activations of K chunks, the K/V leaves of the longest sequence, the LM-head chunk;
  step      the AdamW step: the fp32 state plus one parameter-sized temporary;
  rollout   (RL) the rollout's whole weights and KV cache (forkflow's engine: its decoding copy of the
            weights and a cache of one slot per row decoding at once, `rollout.max_batch_tokens` bounding
            them; vLLM: its own copy of the weights and the paged cache `rollout.vllm_kv_cache_gb` it
            reserves); gradients are freed.
Every formula is a small function below whose docstring states it; the per-token activation constants were
derived from what autograd saves in `forkflow.models.qwen3` and checked against measured peaks
(tests/test_plan.py; `python -m tests.test_plan` prints the table). Byte counts are per GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from forkflow.config import ConfigError, load_config
from forkflow.models.checkpoint import CheckpointError, read_config, read_config_file
from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from forkflow.ops import DEFAULT_CHUNK_SIZE, SCRATCH_ROWS
from forkflow.rollout.engine import batch_slots
from forkflow.rollout.sampling import BLOCK, SamplingParams
from forkflow.rollout.weights import CHUNK

GiB = 2**30
FP32 = 4
BF16 = 2
VLLM_MAX_SEQS = 256  # vLLM's default max_num_seqs: the most rows it decodes in one step
SMALLEST_CHUNK = 128  # the smallest chunkflow.chunk_size the verdict proposes
MAX_GPUS = 65536  # the verdict's search for a GPU count stops here

# How the activations are stored (`compute_mode`):
#   fp32  no autocast, fp32 weights;
#   bf16  weights arrive in bf16 (FSDP's param_dtype): every matmul output and the residual stream are bf16;
#   amp   bf16 autocast over fp32 weights (one process, `replicate`, or param_dtype=fp32): bf16 matmul
#         outputs, fp32 residual stream, bf16 copies of the weights cached by autocast.
Compute = Literal["fp32", "bf16", "amp"]
# The attention kernel's memory: blockwise  forkflow's CPU path (per-block flash kernel, no mask, no copy of
# the prefix); fused  the GPU path, SDPA over the concatenated prefix with an additive mask, a fused kernel
# (cuDNN/flash-like: O(T) memory); math  the same through PyTorch's math SDPA kernel, which materialises the
# fp32 attention probabilities (CUDA takes it for masked GQA when no fused kernel accepts the inputs).
Attention = Literal["blockwise", "fused", "math"]

# The released Qwen3 shapes (Hugging Face config.json of Qwen/Qwen3-*), for configs whose model is not here.
ARCHITECTURES: dict[str, Qwen3Config] = {
    "qwen3-0.6b": Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8),
    "qwen3-14b": Qwen3Config(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                             num_attention_heads=40, num_key_value_heads=8),
    "qwen3-32b": Qwen3Config(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                             num_attention_heads=64, num_key_value_heads=8),
    "qwen3-30b-a3b": Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                 num_attention_heads=32, num_key_value_heads=4, num_experts=128,
                                 num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
}

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'80GiB' -> 80 · 2^30, '141GB' -> 141 · 10^9 (decimal units kB/MB/GB/TB, binary KiB/MiB/GiB/TiB, B)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not match or match[2].lower() not in _UNITS:
        raise ConfigError(f"memory size {text!r}: expected a number and a unit, e.g. 80GiB, 80GB or 141GB")
    return int(float(match[1]) * _UNITS[match[2].lower()])


# ------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter once (tied embeddings once)
    root: int  # FSDP's root unit: embedding, final norm, LM head
    largest_block: int  # the largest decoder block (FSDP's other units)
    matmul: int  # the weights matmuls read (what autocast casts): all but the norms and the embedding lookup
    shapes: tuple[tuple[int, ...], ...]  # every parameter's shape (FSDP shards dim 0)


def parameter_counts(cfg: Qwen3Config) -> ParameterCounts:
    """Counted from the model built on the meta device (no memory), so they are the model's own numbers."""
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    named = dict(model.named_parameters())  # tied weights appear once
    blocks = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    total = sum(p.numel() for p in named.values())
    matmul = sum(p.numel() for name, p in named.items() if "norm" not in name and "embed_tokens" not in name)
    if cfg.tie_word_embeddings:  # the LM head reads the embedding matrix
        matmul += model.lm_head.weight.numel()
    return ParameterCounts(total, total - sum(blocks), max(blocks, default=0), matmul,
                           tuple(tuple(p.shape) for p in named.values()))


def shard_numel(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's FSDP2 shard of a parameter: ceil(shape[0] / N) · prod(shape[1:]) (dim-0 chunks
    padded to equal size; exact for rank 0, an upper bound for the others)."""
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def local_parameters(counts: ParameterCounts, world: int, sharded: bool) -> int:
    """Parameters held by one rank: Σ shard_numel under FSDP (N > 1), all of them otherwise."""
    return sum(shard_numel(s, world) for s in counts.shapes) if sharded else counts.total


def training_state_bytes(local: int) -> dict[str, int]:
    """fp32 master weights as forkflow trains them, per parameter held: parameter 4 B, gradient 4 B, AdamW
    exp_avg + exp_avg_sq 8 B."""
    return {"parameters": FP32 * local, "gradients": FP32 * local, "optimizer": 2 * FP32 * local}


def optimizer_step_bytes(local: int) -> int:
    """AdamW's foreach step allocates one parameter-sized fp32 temporary (sqrt(exp_avg_sq)): 4 B · local."""
    return FP32 * local


def fsdp_gather_bytes(counts: ParameterCounts, dtype_bytes: int) -> dict[str, int]:
    """FSDP2's unsharded units while training (runtime.shard_model):
    root   = root parameters · gather bytes: embedding, final norm and LM head stay gathered from the first
             forward to the end of the schedule (the LM head runs in the loss, after the root's forward);
    block  = largest block · (2 · gather bytes + 4): the block computing and the next one prefetched, plus
             the computing block's unsharded gradient, reduce-scattered in fp32;
    root gradient = root parameters · 4: the root's unsharded gradient (LM head, then embedding) in fp32,
             alive through a chunk's backward until its reduce-scatter."""
    return {"root": counts.root * dtype_bytes, "block": counts.largest_block * (2 * dtype_bytes + FP32),
            "root_gradient": counts.root * FP32}


def autocast_weight_bytes(counts: ParameterCounts) -> int:
    """amp: autocast keeps a bf16 copy of every matmul weight it casts until its context exits (the whole
    ChunkFlow schedule): 2 B · matmul weights."""
    return BF16 * counts.matmul


# ------------------------------------------------------------------------------------------ activations


def activation_bytes(compute: Compute) -> int:
    """Bytes of a matmul output: 4 in fp32, 2 under bf16 (weights or autocast)."""
    return FP32 if compute == "fp32" else BF16


def layer_bytes_per_token(cfg: Qwen3Config, compute: Compute) -> int:
    """Bytes one token keeps for backward in one decoder layer (what autograd saves in qwen3.DecoderLayer):

        c_H · H + (4 + 3b) · (heads + kv_heads) · head_dim + mlp + 4 · heads + 4 · (2 + heads + kv_heads)

    b = activation_bytes (4 fp32, 2 bf16/amp). c_H counts the two RMSNorms over the hidden size, each saving
    its input in fp32 (4), its normalised value in the residual dtype r and its output as the next matmuls
    read it: fp32 4 + 4 + 4 (×2 = 24); bf16 4 + 2 + 2 (×2 = 16); amp 4 + 4 + 2·3 (q, k, v each cast) and
    4 + 4 + 2·2 (gate, up) = 26. Per query head dim (and likewise per kv head dim): q_norm's fp32 input, its
    normalised value, the rotated q the attention saves and (queries only) the attention output; for kv the
    same with v instead of the output: 4 + 3b each (RoPE multiplies by cos/sin, which need no gradient, so
    it saves nothing of q). mlp = 4b · intermediate (gate, silu, up, product) for a dense layer; a MoE layer
    saves 4b · k · moe_intermediate + 2b · k · H (the token copies in, the weighted outputs) + (b + 4) · E
    (router logits, fp32 softmax). Then the log-sum-exp (4 per head) and the RMSNorms' 1/rms (4 each).
    """
    b = activation_bytes(compute)
    H, D = cfg.hidden_size, cfg.head_dim
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    c_hidden = {"fp32": 24, "bf16": 16, "amp": 26}[compute]
    if cfg.is_moe:
        k = cfg.num_experts_per_tok
        mlp = 4 * b * k * cfg.moe_intermediate_size + 2 * b * k * H + (b + FP32) * cfg.num_experts
    else:
        mlp = 4 * b * cfg.intermediate_size
    return c_hidden * H + (4 + 3 * b) * (heads + kv) * D + mlp + FP32 * heads + FP32 * (2 + heads + kv)


def head_bytes_per_token(cfg: Qwen3Config, compute: Compute, loss: Literal["sft", "rl"]) -> int:
    """Bytes one token keeps outside the decoder layers: the final RMSNorm (its fp32 input, normalised value
    and output as the LM head reads it: 12 · H fp32, 8 · H bf16, 10 · H amp), the RoPE cos/sin tables
    (2 · head_dim in the residual dtype) and, for SFT's next_token_loss, the fp32 log-softmax of the full
    vocabulary (4 · V) that cross-entropy keeps (the RL loss goes through ops.token_logprobs_and_entropy,
    which keeps only 2 fp32 values per row)."""
    residual = BF16 if compute == "bf16" else FP32
    norm = {"fp32": 12, "bf16": 8, "amp": 10}[compute] * cfg.hidden_size
    logits = FP32 * cfg.vocab_size if loss == "sft" else 2 * FP32
    return norm + 2 * cfg.head_dim * residual + logits


def chunk_count(longest: int, chunk_size: int) -> int:
    """Chunks of the longest sequence: ceil(L / C)."""
    return math.ceil(longest / chunk_size)


def kept_chunks(keep: int, longest: int, chunk_size: int) -> int:
    """Chunks whose graphs are alive at once: K, or fewer when the longest sequence has fewer chunks."""
    return max(1, min(keep, chunk_count(longest, chunk_size)))


def chunkflow_activation_bytes(cfg: Qwen3Config, compute: Compute, loss: Literal["sft", "rl"], chunk_size: int,
                               keep: int, longest: int) -> int:
    """The state-aware schedule keeps the graphs of K chunks at once (fewer when the longest sequence has
    fewer chunks; a standalone chunk, packed to up to C tokens, is a chain of one):
        C · min(K, ceil(L / C)) · (layers · layer_bytes_per_token + head_bytes_per_token)."""
    kept = kept_chunks(keep, longest, chunk_size)
    per_token = cfg.num_hidden_layers * layer_bytes_per_token(cfg, compute) + head_bytes_per_token(cfg, compute, loss)
    return chunk_size * kept * per_token


def kv_leaf_bytes(cfg: Qwen3Config, compute: Compute, chunk_size: int, keep: int, longest: int) -> int:
    """The K/V of the longest sequence's chunks that later chunks attend to, as detached leaves, and their
    gradients (chunkflow.schedule._LeafStore): 2 · layers · kv_heads · head_dim · b per token, for
        stored tokens   max(0, L − K · C)  (the chunks recomputed later)
      + gradient tokens max(0, L − C)      (every chunk but the last receives one).
    At most 2 · layers · kv_heads · head_dim · L · b · 2 (the leaves and gradients of the whole sequence)."""
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * activation_bytes(compute)
    return per_token * (max(0, longest - keep * chunk_size) + max(0, longest - chunk_size))


def attention_prefix_bytes(cfg: Qwen3Config, compute: Compute, chunk_size: int, keep: int, longest: int,
                           attention: Attention) -> int:
    """What attention over earlier chunks costs beyond the leaves, per kept chunk, for a chunk continuing a
    sequence of L tokens (the last chunks, which have the longest prefix):
      blockwise  0: forkflow's CPU path attends to the leaves block by block, with no mask;
      fused      the GPU path concatenates the prefix K/V per layer (SDPA keeps the copy for backward) and
                 builds one additive mask per forward: 2 · layers · kv_heads · head_dim · L · b + C · L · b;
      math       fused + the fp32 attention probabilities per layer: layers · heads · C · L · 4."""
    if attention == "blockwise":
        return 0
    b = activation_bytes(compute)
    kept = kept_chunks(keep, longest, chunk_size)
    rows = min(chunk_size, longest)
    per_chunk = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * longest * b + rows * longest * b
    if attention == "math":
        per_chunk += cfg.num_hidden_layers * cfg.num_attention_heads * rows * longest * FP32
    return kept * per_chunk


def lm_head_chunk_bytes(cfg: Qwen3Config, compute: Compute, loss: Literal["sft", "rl"], rows: int, kept: int) -> int:
    """The LM head's memory for `rows` rows at a time, plus the logits in bf16 before their fp32 copy
    (2 · rows · V if bf16 matmuls). SFT's next_token_loss takes a whole chunk (C rows) and holds its fp32
    logits and one more fp32 [rows, V] (the probabilities, or the gradient): rows · V · 8. RL's
    ops.token_logprobs_and_entropy takes at most DEFAULT_CHUNK_SIZE (1024) rows at a time into one fp32
    [rows, V] buffer with a scratch of SCRATCH_ROWS rows, and a loss's buffer stays until its backward, so
    each of the `kept` chunks whose graphs are alive holds one: (kept · rows + min(rows, SCRATCH_ROWS)) · V · 4."""
    b = activation_bytes(compute)
    bf16_copy = rows * cfg.vocab_size * (b if b < FP32 else 0)
    if loss == "sft":
        return rows * cfg.vocab_size * 2 * FP32 + bf16_copy
    return (kept * rows + min(rows, SCRATCH_ROWS)) * cfg.vocab_size * FP32 + bf16_copy


def weight_gradient_bytes(cfg: Qwen3Config, compute: Compute) -> int:
    """A weight's gradient is computed whole before autograd adds it into .grad: the largest is the LM
    head's, V · H · b, plus its fp32 copy under amp (autocast's cast back): V · H · (b + 4 if amp). A MoE
    layer's stacked experts get a full-size [E, I, H] gradient per expert slice, summed as they come, for
    gate, up and down at once: 4 · E · moe_intermediate · H · b (the three sums and the newest slice)."""
    b = activation_bytes(compute)
    largest = cfg.vocab_size * cfg.hidden_size * (b + (FP32 if compute == "amp" else 0))
    if cfg.is_moe:
        largest = max(largest, 4 * cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size * b)
    return largest


def training_activation_bytes(cfg: Qwen3Config, compute: Compute, loss: Literal["sft", "rl"], chunk_size: int,
                              keep: int, longest: int, attention: Attention) -> dict[str, int]:
    """A training phase's activation memory above the weights and optimizer state (what the measurement in
    tests/test_plan.py compares with): chunkflow activations + K/V leaves + attention prefix + LM-head chunk
    + the largest weight gradient in flight."""
    rows = chunk_size if loss == "sft" else min(chunk_size, DEFAULT_CHUNK_SIZE)
    kept = kept_chunks(keep, longest, chunk_size)
    return {
        "activations": chunkflow_activation_bytes(cfg, compute, loss, chunk_size, keep, longest),
        "kv_leaves": kv_leaf_bytes(cfg, compute, chunk_size, keep, longest),
        "attention_prefix": attention_prefix_bytes(cfg, compute, chunk_size, keep, longest, attention),
        "lm_head_chunk": lm_head_chunk_bytes(cfg, compute, loss, min(rows, longest), kept),
        "weight_gradient": weight_gradient_bytes(cfg, compute),
    }


# ------------------------------------------------------------------------------------------------ rollout


def rollout_weight_bytes(counts: ParameterCounts, dtype_bytes: int) -> int:
    """The rollout's own whole weights (gathered from a sharded policy, cast for a bf16 rollout, vLLM's copy):
    dtype bytes · parameters."""
    return dtype_bytes * counts.total


def decode_weight_bytes(cfg: Qwen3Config, dtype_bytes: int) -> int:
    """The torch engine's decoding layout of the weights it samples from (weights.DecodeWeights, made for a
    rollout and dropped by the backend's release), on a GPU: per layer the fused q/k/v
    [(heads + 2 · kv_heads) · head_dim, H] and the q/k norm weights per head [heads + kv_heads, head_dim] are
    torch.cat copies; o, the MLP's gate, up and down and the LM head's chunks are the weights themselves (views):
        dtype bytes · layers · ((heads + 2 · kv_heads) · H + heads + kv_heads) · head_dim."""
    heads, kv, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    return dtype_bytes * cfg.num_hidden_layers * ((heads + 2 * kv) * H + heads + kv) * cfg.head_dim


def rollout_slots(requests: int, slot_tokens: int, max_batch_tokens: int) -> int:
    """The rows that decode at once, each holding a KV-cache slot of slot_tokens = longest prompt + longest
    response: the engine's own count (engine.batch_slots), all P · n requests without a bound
    (rollout.max_batch_tokens 0), else min(P · n, max_batch_tokens // slot_tokens)."""
    return batch_slots(requests, slot_tokens, max_batch_tokens or None)


def rollout_kv_cache_bytes(cfg: Qwen3Config, rows: int, length: int, dtype_bytes: int) -> int:
    """A KV cache of `rows` rows of `length` tokens (the engine's SlotKVCache: slots of longest prompt +
    longest response tokens; a prompt's prefill cache: 1 row of its tokens):
        2 · layers · kv_heads · head_dim · rows · length · dtype bytes."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * rows * length * dtype_bytes


def rollout_layer_bytes(cfg: Qwen3Config, tokens: int, dtype_bytes: int) -> int:
    """One decoder layer's temporaries in a no-grad forward of `tokens` tokens (the peak of a forward; the
    layers run one after the other): tokens · (3 · mlp width + 4 · H + 2 · heads · head_dim) · b, b the
    rollout's dtype bytes, mlp width = intermediate (dense) or k · moe_intermediate (MoE)."""
    mlp = cfg.num_experts_per_tok * cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size
    return tokens * (3 * mlp + 4 * cfg.hidden_size + 2 * cfg.num_attention_heads * cfg.head_dim) * dtype_bytes


def rollout_prefill_bytes(cfg: Qwen3Config, prompt_tokens: int, attention: Attention, dtype_bytes: int) -> int:
    """A prompt is prefilled alone when its first sample is admitted (batch 1, its own W tokens, no padding: a
    causal forward without a mask): rollout_layer_bytes(W), with the math kernel also heads · W² · 4 · 2 of
    scores and probabilities, and two 1-row caches of W tokens (rollout_kv_cache_bytes(1, W) each): the
    prompt's own and the previous prompt's (engine.RequestQueue still holds it while the next is prefilled)."""
    scores = 2 * cfg.num_attention_heads * prompt_tokens**2 * FP32 if attention == "math" else 0
    caches = 2 * rollout_kv_cache_bytes(cfg, 1, prompt_tokens, dtype_bytes)
    return rollout_layer_bytes(cfg, prompt_tokens, dtype_bytes) + scores + caches


def rollout_decode_bytes(cfg: Qwen3Config, rows: int, length: int, dtype_bytes: int, plain: bool) -> int:
    """A decoding step for `rows` rows whose caches hold up to `length` tokens: the larger of its forward and
    its sampling:
      forward   rollout_layer_bytes(rows) plus the step's additive mask over `length` keys in the rollout's
                dtype, rows · length · b (engine.decode's SDPA, as on a GPU, holds no scores; forkflow's CPU
                attention kernel needs no mask);
      sampling  with plain sampling (temperature 1, no top-k or top-p: sampling.sample_plain) the LM head in
                chunks of W = min(weights.CHUNK, V) tokens, a chunk's fp32 logits, their exp and the entropy's
                product of the two (torch's ops, as on a GPU; forkflow's CPU kernel holds the logits alone),
                beside the step's fp32 random numbers (2 per block of sampling.BLOCK tokens):
                rows · (W · 12 + 8 · ceil(V / BLOCK)); otherwise the [rows, V] fp32 logits, scaled logits,
                probabilities and their cumsum: rows · V · 4 · 4."""
    forward = rollout_layer_bytes(cfg, rows, dtype_bytes) + rows * length * dtype_bytes
    if plain:
        uniforms = 2 * FP32 * math.ceil(cfg.vocab_size / BLOCK)
        sampling = rows * (min(CHUNK, cfg.vocab_size) * 3 * FP32 + uniforms)
    else:
        sampling = rows * cfg.vocab_size * 4 * FP32
    return max(forward, sampling)


def rollout_results_bytes(requests: int, new_tokens: int) -> int:
    """Every request's tokens (int64) and three fp32 statistics per token, held for the whole call:
    P · n · max_new_tokens · (3 · 4 + 8)."""
    return requests * new_tokens * (3 * FP32 + 8)


def rollout_bytes(cfg: Qwen3Config, prompts: int, n: int, prompt_tokens: int, new_tokens: int, attention: Attention,
                  dtype_bytes: int, max_batch_tokens: int, plain: bool) -> dict[str, int]:
    """forkflow's engine's memory beside the weights, as {kv_cache, working}: the SlotKVCache of
    S = rollout_slots(P · n, prompt_tokens + new_tokens, max_batch_tokens) slots, the results of the P · n
    requests, and the larger of a prompt's prefill and an S-row decoding step (they alternate while the slots
    and the results are held)."""
    length = prompt_tokens + new_tokens
    slots = rollout_slots(prompts * n, length, max_batch_tokens)
    step = max(rollout_prefill_bytes(cfg, prompt_tokens, attention, dtype_bytes),
               rollout_decode_bytes(cfg, slots, length, dtype_bytes, plain))
    return {"kv_cache": rollout_kv_cache_bytes(cfg, slots, length, dtype_bytes),
            "working": rollout_results_bytes(prompts * n, new_tokens) + step}


def vllm_rollout_bytes(cfg: Qwen3Config, rows: int, kv_cache: int) -> dict[str, int]:
    """vLLM's memory beside its weights: the paged KV cache it reserves (`rollout.vllm_kv_cache_gb`; requests
    beyond it wait in its queue, they do not grow it) and one decoding step's logits for the rows it runs
    together (at most VLLM_MAX_SEQS): min(rows, 256) · V · 4 · 4, as the torch engine's step with [rows, V]
    logits."""
    return {"kv_cache": kv_cache, "working": min(rows, VLLM_MAX_SEQS) * cfg.vocab_size * 4 * FP32}


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Setting:
    """What the plan depends on, taken from a training config (and the command line)."""

    kind: Literal["rl", "sft"]
    world: int
    strategy: Literal["fsdp", "replicate"]
    precision: Literal["fp32", "bf16"]
    param_dtype: Literal["auto", "fp32", "bf16"]
    chunk_size: int
    keep: int
    longest: int  # tokens of the longest training sequence
    attention: Attention = "fused"
    # RL only
    prompts_per_step: int = 0
    n: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    reference: bool = False  # algo.kl_coef > 0: a frozen fp32 copy of the policy, sharded like it
    rollout_backend: Literal["torch", "vllm"] = "torch"
    rollout_dtype_bytes: int = FP32  # rollout.dtype
    vllm_kv_cache: int = 0  # rollout.vllm_kv_cache_gb in bytes
    max_batch_tokens: int = 0  # rollout.max_batch_tokens (torch backend), 0: no bound
    plain_sampling: bool = True  # rollout temperature 1, top_k 0, top_p 1: sampled without [rows, V] logits

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world > 1

    @property
    def prompts_per_rank(self) -> int:
        return math.ceil(self.prompts_per_step / self.world)


def gather_bytes(setting: Setting) -> int:
    """FSDP's dtype of the gathered parameters (runtime.shard_model on GPU): param_dtype, where auto is bf16
    with precision bf16, else the parameters' own fp32."""
    if setting.param_dtype == "auto":
        return BF16 if setting.precision == "bf16" else FP32
    return BF16 if setting.param_dtype == "bf16" else FP32


def compute_mode(setting: Setting) -> Compute:
    """bf16 when FSDP gathers bf16 weights; else amp with precision bf16 (autocast), else fp32."""
    if setting.sharded and gather_bytes(setting) == BF16:
        return "bf16"
    return "amp" if setting.precision == "bf16" else "fp32"


def plan_phases(cfg: Qwen3Config, counts: ParameterCounts, s: Setting,
                prompts_per_rank: int | None = None) -> dict[str, dict[str, int]]:
    """Per phase, per component, bytes on one GPU. `prompts_per_rank` overrides the setting's share."""
    compute = compute_mode(s)
    local = local_parameters(counts, s.world, s.sharded)
    state = training_state_bytes(local)
    gathered = fsdp_gather_bytes(counts, gather_bytes(s)) if s.sharded else {}
    loss = "rl" if s.kind == "rl" else "sft"
    training = {
        **state,
        "autocast_weights": autocast_weight_bytes(counts) if compute == "amp" else 0,
        "fsdp_root": gathered.get("root", 0),
        "fsdp_block": gathered.get("block", 0),
        "fsdp_root_gradient": gathered.get("root_gradient", 0),
        **training_activation_bytes(cfg, compute, loss, s.chunk_size, s.keep, s.longest, s.attention),
    }
    phases = {"training": training, "step": {**state, "optimizer_step": optimizer_step_bytes(local)}}
    if s.reference:  # resident in every phase: 4 B per parameter held
        for parts in phases.values():
            parts["reference_model"] = FP32 * local
    if s.kind == "rl":
        prompts = s.prompts_per_rank if prompts_per_rank is None else prompts_per_rank
        if s.rollout_backend == "vllm":
            generation = vllm_rollout_bytes(cfg, prompts * s.n, s.vllm_kv_cache)
        else:
            generation = rollout_bytes(cfg, prompts, s.n, s.prompt_tokens, s.new_tokens, s.attention,
                                       s.rollout_dtype_bytes, s.max_batch_tokens, s.plain_sampling)
        # the policy itself is sampled from only by an fp32 torch rollout of an unsharded model
        own_weights = s.rollout_backend == "vllm" or s.sharded or s.rollout_dtype_bytes != FP32
        phases["rollout"] = {
            "parameters": state["parameters"], "optimizer": state["optimizer"],  # gradients are freed
            "rollout_weights": rollout_weight_bytes(counts, s.rollout_dtype_bytes) if own_weights else 0,
            "rollout_decode_weights": 0 if s.rollout_backend == "vllm" else decode_weight_bytes(
                cfg, s.rollout_dtype_bytes),
            "rollout_kv_cache": generation["kv_cache"], "rollout_working": generation["working"],
            **({"reference_model": FP32 * local} if s.reference else {}),
        }
    return phases


def peak(phases: dict[str, dict[str, int]], which: str | None = None) -> tuple[int, str]:
    """(bytes, phase) of the largest phase total, or of phase `which`."""
    totals = {name: sum(parts.values()) for name, parts in phases.items()}
    name = which or max(totals, key=totals.get)
    return totals[name], name


def largest_chunk_size(cfg, counts, s: Setting, budget: int) -> int | None:
    """The largest power of two C <= chunkflow.chunk_size (and >= SMALLEST_CHUNK, unless the configured one is
    smaller) whose training phase fits."""
    c = 2 ** int(math.log2(s.chunk_size))
    smallest = min(SMALLEST_CHUNK, c)
    while c >= smallest:
        trial = Setting(**{**vars(s), "chunk_size": c})
        if peak(plan_phases(cfg, counts, trial), "training")[0] <= budget:
            return c
        c //= 2
    return None


def largest_prompts_per_rank(cfg, counts, s: Setting, budget: int) -> int | None:
    """The most prompts per rank (each with rollout.n rows) whose rollout phase fits (bisection), None if
    not even one."""
    def fits(p):
        return peak(plan_phases(cfg, counts, s, p), "rollout")[0] <= budget

    lo, hi = 0, max(1, s.prompts_per_rank)
    if not fits(1):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def minimum_gpus(cfg, counts, s: Setting, budget: int) -> int | None:
    """The fewest GPUs (more than s.world) on which training fits at some chunk size >= SMALLEST_CHUNK and the
    rollout at one prompt per rank; None when no count up to MAX_GPUS does (what does not shrink with N is
    already too big)."""
    def fits(world):
        trial = Setting(**{**vars(s), "world": world})
        chunk = largest_chunk_size(cfg, counts, trial, budget) is not None
        return chunk and (s.kind != "rl" or largest_prompts_per_rank(cfg, counts, trial, budget) is not None)

    world = s.world
    while world < MAX_GPUS and not fits(world):
        world *= 2
    if not fits(world):
        return None
    lo = world // 2 + 1 if world > s.world else s.world  # fits(world // 2) is false: bisect in between
    hi = world
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


@dataclass
class Verdict:
    fits: bool
    peak_bytes: int
    peak_phase: str
    chunk_size: int | None = None  # the largest that fits, when training does not
    prompts_per_rank: int | None = None  # the largest that fits, when the rollout does not
    gpus: int | None = None  # the fewest that fit, when neither change is enough
    line: str = ""


def verdict(cfg: Qwen3Config, counts: ParameterCounts, s: Setting, budget: int) -> Verdict:
    phases = plan_phases(cfg, counts, s)
    total, phase = peak(phases)
    gib = f"{total / GiB:.2f} GiB ({phase}) of {budget / GiB:.2f} GiB"
    if total <= budget:
        return Verdict(True, total, phase, line=f"fits: peak {gib} per GPU")
    v = Verdict(False, total, phase)
    advice = []
    if peak(phases, "training")[0] > budget:
        v.chunk_size = largest_chunk_size(cfg, counts, s, budget)
        if v.chunk_size is not None:
            advice.append(f"training fits with chunkflow.chunk_size={v.chunk_size} (keep={s.keep})")
    if s.kind == "rl" and peak(phases, "rollout")[0] > budget:
        v.prompts_per_rank = largest_prompts_per_rank(cfg, counts, s, budget)
        if v.prompts_per_rank is not None:
            advice.append(f"the rollout fits with at most {v.prompts_per_rank} prompts per rank "
                          f"(prompts_per_step <= {v.prompts_per_rank * s.world}, {v.prompts_per_rank * s.n} rows)")
    unresolved = (v.chunk_size is None and peak(phases, "training")[0] > budget) or (
        s.kind == "rl" and v.prompts_per_rank is None and peak(phases, "rollout")[0] > budget)
    if unresolved:
        v.gpus = minimum_gpus(cfg, counts, s, budget)
        if v.gpus is not None:
            advice.append(f"needs >= {v.gpus} GPUs")
        else:
            advice.append(f"does not fit on any number of {budget / GiB:.2f} GiB GPUs: "
                          + fixed_cost_sentence(cfg, counts, s))
    v.line = f"does not fit: peak {gib} per GPU; " + "; ".join(advice)
    return v


def fixed_cost_sentence(cfg: Qwen3Config, counts: ParameterCounts, s: Setting) -> str:
    """What stays on a GPU however many there are, at the smallest chunk and one prompt per rank."""
    big = Setting(**{**vars(s), "world": MAX_GPUS, "chunk_size": SMALLEST_CHUNK})
    phases = plan_phases(cfg, counts, big, 1)
    total, phase = peak(phases)
    parts = sorted(phases[phase].items(), key=lambda kv: -kv[1])[:2]
    named = " and ".join(f"{LABELS[k]} {v / GiB:.2f} GiB" for k, v in parts)
    return f"its {phase} alone needs {total / GiB:.2f} GiB ({named})"


# ----------------------------------------------------------------------------------------------- command

LABELS = {
    "parameters": "parameters (fp32)",
    "gradients": "gradients (fp32)",
    "optimizer": "AdamW exp_avg + exp_avg_sq (fp32)",
    "optimizer_step": "AdamW step temporary (fp32)",
    "reference_model": "reference model for the KL (fp32)",
    "autocast_weights": "autocast bf16 weight copies",
    "fsdp_root": "FSDP gathered root (embedding, norm, LM head)",
    "fsdp_block": "FSDP gathered blocks (current + prefetch) + grad",
    "fsdp_root_gradient": "FSDP root gradient before reduce-scatter",
    "activations": "ChunkFlow activations (C x K chunks)",
    "kv_leaves": "ChunkFlow K/V leaves + gradients",
    "attention_prefix": "attention prefix K/V copy + mask",
    "lm_head_chunk": "LM-head log-prob/entropy chunk",
    "weight_gradient": "largest weight gradient in flight",
    "rollout_weights": "rollout whole weights",
    "rollout_decode_weights": "rollout decoding copies (fused q/k/v)",
    "rollout_kv_cache": "rollout KV cache",
    "rollout_working": "rollout results + prefill/decode working set",
}


def resolve_architecture(model_path: str, arch: str | None, model_config: str | None) -> tuple[Qwen3Config, str]:
    """(architecture, where it came from): --arch or --model-config when given, else model.path's
    config.json; a clear error when none is available."""
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise ConfigError(f"--arch {arch!r}: unknown; one of {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[arch], f"--arch {arch}"
    if model_config is not None:
        path = Path(model_config)
        if path.is_dir():
            return read_config(path), str(path / "config.json")
        if not path.is_file():
            raise ConfigError(f"--model-config {model_config}: no such file")
        return read_config_file(path), str(path)
    if model_path and Path(model_path).is_dir():
        return read_config(model_path), f"{model_path}/config.json"
    where = f"model.path {model_path!r} does not exist here" if model_path else "model.path is not set"
    raise ConfigError(f"{where}: name the architecture with --arch ({', '.join(ARCHITECTURES)}) or "
                      "--model-config CONFIG.json")


def load_training_config(path: str, overrides: list[str], kind: str | None):
    """(kind, config): RLConfig when its keys fit, else SFTConfig (or the `--kind` asked for)."""
    from forkflow.train.rl import RLConfig
    from forkflow.train.sft import SFTConfig

    classes = {"rl": RLConfig, "sft": SFTConfig}
    errors = {}
    for name in [kind] if kind else ["rl", "sft"]:
        try:
            return name, load_config(classes[name], path, overrides)
        except ConfigError as e:
            errors[name] = str(e)
    if len(errors) == 1:
        raise ConfigError(next(iter(errors.values())))
    fitting = [e for e in errors.values() if "unknown key" not in e]  # the kind whose keys all exist
    if len(fitting) == 1:
        raise ConfigError(fitting[0])
    raise ConfigError(f"neither an RL nor an SFT config: as RL, {errors['rl']}; as SFT, {errors['sft']}")


def setting_from_config(kind: str, cfg, arch: Qwen3Config, gpus: int, attention: Attention,
                        max_seq_len: int | None) -> Setting:
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    c = cfg.chunkflow
    if c.chunk_size < 1 or c.keep < 1:
        raise ConfigError(f"chunkflow.chunk_size and chunkflow.keep must be >= 1, got {c.chunk_size}, {c.keep}")
    common = dict(world=gpus, strategy=cfg.distributed.strategy, precision=cfg.precision,
                  param_dtype=cfg.distributed.param_dtype, chunk_size=c.chunk_size, keep=c.keep, attention=attention)
    if kind == "rl":
        longest = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        r = cfg.rollout
        return Setting("rl", longest=max_seq_len or longest, prompts_per_step=cfg.prompts_per_step, n=r.n,
                       prompt_tokens=cfg.data.max_prompt_tokens, new_tokens=r.max_new_tokens,
                       reference=cfg.algo.kl_coef > 0, rollout_backend=r.backend,
                       rollout_dtype_bytes=BF16 if r.dtype == "bf16" else FP32,
                       vllm_kv_cache=int(r.vllm_kv_cache_gb * GiB), max_batch_tokens=r.max_batch_tokens,
                       plain_sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k).plain,
                       **common)
    return Setting("sft", longest=max_seq_len or arch.max_position_embeddings, **common)


def plan_record(config_path: str, kind: str, arch: Qwen3Config, source: str, s: Setting, budget: int) -> dict:
    """Everything the command prints, as one JSON-able dict."""
    counts = parameter_counts(arch)
    phases = plan_phases(arch, counts, s)
    v = verdict(arch, counts, s, budget)
    return {
        "config": config_path, "kind": kind, "architecture": source,
        "parameters": counts.total, "gpus": s.world, "gpu_memory_bytes": budget,
        "strategy": "fsdp" if s.sharded else "replicate" if s.world > 1 else "single",
        "compute": compute_mode(s), "attention": s.attention, "chunk_size": s.chunk_size, "keep": s.keep,
        "longest_sequence": s.longest,
        **({"prompts_per_rank": s.prompts_per_rank, "rollout_rows": s.prompts_per_rank * s.n,
            "rollout_tokens_per_row": s.prompt_tokens + s.new_tokens,
            "rollout_slots": rollout_slots(s.prompts_per_rank * s.n, s.prompt_tokens + s.new_tokens,
                                           s.max_batch_tokens) if s.rollout_backend == "torch" else None}
           if kind == "rl" else {}),
        "phases": phases, "totals": {name: sum(parts.values()) for name, parts in phases.items()},
        "peak_bytes": v.peak_bytes, "peak_phase": v.peak_phase, "fits": v.fits,
        "suggested_chunk_size": v.chunk_size, "suggested_prompts_per_rank": v.prompts_per_rank,
        "min_gpus": v.gpus, "verdict": v.line,
    }


def format_table(record: dict) -> str:
    phases = record["phases"]
    names = [p for p in ("training", "rollout", "step") if p in phases]
    components = list(dict.fromkeys(k for p in names for k in phases[p]))
    width = max(len(LABELS[k]) for k in components) + 2
    lines = [
        f"forkflow plan: {record['config']} ({record['kind']}), {record['architecture']}, "
        f"{record['parameters'] / 1e9:.2f}B parameters",
        f"{record['gpus']} GPU(s) x {record['gpu_memory_bytes'] / GiB:.2f} GiB, {record['strategy']}, "
        f"activations {record['compute']}, attention {record['attention']}; chunk_size {record['chunk_size']}, "
        f"keep {record['keep']}, longest sequence {record['longest_sequence']} tokens",
    ]
    if record["kind"] == "rl":
        slots = record["rollout_slots"]
        lines.append(f"rollout: {record['prompts_per_rank']} prompts per rank, {record['rollout_rows']} rows x "
                     f"{record['rollout_tokens_per_row']} tokens" + (f", {slots} decoding at once" if slots else ""))
    lines += ["", f"{'GiB per GPU':<{width}}" + "".join(f"{p:>10}" for p in names)]
    for k in components:
        cells = [f"{phases[p][k] / GiB:>10.2f}" if k in phases[p] else f"{'-':>10}" for p in names]
        if any(phases[p].get(k, 0) for p in names):
            lines.append(f"{LABELS[k]:<{width}}" + "".join(cells))
    lines.append(f"{'total':<{width}}" + "".join(f"{record['totals'][p] / GiB:>10.2f}" for p in names))
    lines += ["(bytes held by tensors; the CUDA context and the caching allocator's fragmentation come on top)",
              "", record["verdict"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forkflow plan", description="The GPU memory every rank of a training "
                                     "run needs, per component and phase, and whether it fits (no GPU needed).")
    parser.add_argument("config", help="an RL (forkflow train) or SFT (forkflow sft) YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. chunkflow.chunk_size=2048")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (ranks)")
    parser.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 80GB, 141GB")
    parser.add_argument("--kind", choices=["rl", "sft"], help="the config's kind (default: detected)")
    parser.add_argument("--arch", help=f"a released architecture: {', '.join(ARCHITECTURES)}")
    parser.add_argument("--model-config", help="a Hugging Face config.json (or its directory) for the architecture")
    parser.add_argument("--max-seq-len", type=int, help="longest training sequence (default: RL prompt + "
                        "response tokens; SFT the model's max_position_embeddings)")
    parser.add_argument("--attention", choices=["fused", "math", "blockwise"], default="fused",
                        help="attention memory: fused GPU kernel (default), math SDPA kernel, blockwise (CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    try:
        if args.arch and args.model_config:
            raise ConfigError("give --arch or --model-config, not both")
        budget = parse_size(args.gpu_memory)
        kind, cfg = load_training_config(args.config, args.overrides, args.kind)
        arch, source = resolve_architecture(cfg.model.path, args.arch, args.model_config)
        setting = setting_from_config(kind, cfg, arch, args.gpus, args.attention, args.max_seq_len)
        record = plan_record(args.config, kind, arch, source, setting, budget)
    except (ConfigError, CheckpointError) as e:
        print(f"forkflow plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record) if args.json else format_table(record))
    return 0
