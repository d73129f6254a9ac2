"""The Qwen3 language model, dense and MoE, in one file that reads top to bottom.

Parameter names match Hugging Face's checkpoints (see `checkpoint.py` for the one renaming: MoE experts
are stored here as stacked [E, ...] tensors). One attention entry point, `attend`, serves padded batches,
packed documents and chunks continuing from earlier keys/values; every layout is described by the
positions and segment ids of the queries and keys (see `AttentionLayout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Qwen3Config:
    """The fields of a Qwen3 / Qwen3-MoE config.json that change the computation.

    Keys the model does not use (token ids, dtype, transformers version, ...) are kept in `extra` so that a
    loaded checkpoint saves back with the same config.json.
    """

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    extra: dict = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


class RMSNorm(nn.Module):
    """y = w · x / rms(x), normalised in fp32 then cast back before the weight (as Hugging Face does)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of the rotate-half RoPE at `positions` [B, T] -> each [B, 1, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttentionLayout:
    """Who may attend to whom: a query sees a key iff they share a segment id and key pos <= query pos.

    That single rule covers every layout the trainers need:
      padded batch      padding tokens get segment -1, so real tokens never see them;
      packed documents  each document has its own segment id and positions restarting at 0;
      continued chunk   the keys include earlier chunks' tokens whose positions precede the queries'
                        (the causal mask is aligned bottom-right, as a prefix requires).
    A padding query still sees itself, so no softmax row is empty. `causal` marks the plain case (one
    document from position 0, no padding, no earlier keys), where no mask is built at all.
    """

    q_positions: torch.Tensor  # [B, Tq]
    q_segments: torch.Tensor  # [B, Tq]
    k_positions: torch.Tensor  # [B, Tk]
    k_segments: torch.Tensor  # [B, Tk]
    causal: bool = False
    _bias: dict = field(default_factory=dict)

    def mask(self) -> torch.Tensor:  # [B, 1, Tq, Tk] bool
        same = self.q_segments[:, :, None] == self.k_segments[:, None, :]
        causal = self.k_positions[:, None, :] <= self.q_positions[:, :, None]
        return (same & causal)[:, None]

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as an additive bias (0 / -inf), built once per forward and shared by all layers: SDPA
        would otherwise expand a bool mask into a new float tensor in every layer and keep it for backward.
        The bool mask itself is not kept (a quarter of the bias's size, for nothing)."""
        if dtype not in self._bias:
            zero = torch.zeros((), dtype=dtype, device=self.q_positions.device)
            self._bias[dtype] = zero.masked_fill(~self.mask(), float("-inf"))
        return self._bias[dtype]

    @cached_property
    def documents(self) -> list[list[int]] | None:
        """Each row's document lengths, in order, where the rule is plain causal attention within each
        document: the keys are the queries' own tokens, and every row is a run of documents, each with a
        segment id of its own and positions 0, 1, 2, ... Attention then runs document by document, at
        Σ L² rather than the row's T² (packed rows hold many short documents) and with no [T, T] mask.
        None for any other layout (padding whose positions do not restart, a segment id used twice, ...)."""
        if not (torch.equal(self.q_positions, self.k_positions) and torch.equal(self.q_segments, self.k_segments)):
            return None
        segments, positions = self.q_segments, self.q_positions
        starts = F.pad(segments.diff(dim=1) != 0, (1, 0), value=True)  # [B, T]: a document begins here
        follows = F.pad(positions.diff(dim=1) == 1, (1, 0), value=False)
        distinct = (segments.sort(dim=1).values.diff(dim=1) != 0).sum(1) + 1  # segment ids per row
        if not (torch.where(starts, positions == 0, follows).all() and torch.equal(starts.sum(1), distinct)):
            return None
        T = segments.shape[1]
        return [torch.diff(row.nonzero()[:, 0], append=torch.tensor([T], device=row.device)).tolist() for row in starts]

    @cached_property
    def continues_one_document(self) -> bool:
        """Whether the queries are one document continuing after all the earlier keys (a ChunkFlow dependent
        chunk): every earlier key is visible to every query, and the last Tq keys are the queries' own, with
        strictly increasing positions, so plain top-left causal attention over them is the rule exactly."""
        P = self.k_positions.shape[1] - self.q_positions.shape[1]
        first = self.q_segments[:, :1]
        return bool(
            (self.q_segments == first).all()
            and (self.k_segments == first).all()
            and torch.equal(self.k_positions[:, P:], self.q_positions)
            and (self.q_positions.diff(dim=1) > 0).all()
            and (self.k_positions[:, :P] <= self.q_positions[:, :1]).all()
        )


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class BlockwiseAttention(torch.autograd.Function):
    """Attention of q [B, H, Tq, D] over key/value blocks [B, KV, Tb, D] that are all fully visible except
    the last (the queries' own keys, Tb = Tq, causal), without concatenating them or building a mask.

    Each block runs PyTorch's CPU flash kernel, which returns its softmax-normalised output o_b and
    log-sum-exp l_b; the exact result is out = Σ_b exp(l_b - L) o_b with L = logsumexp_b l_b. The backward
    of attention needs only (q, k_b, v_b, out, L) per block (flash attention's backward recomputes the
    probabilities as exp(s - L) and uses rowsum(dout · out)), so each block's kernel backward, given the
    merged out and L, yields that block's exact share of the gradient (as in ring attention). Saved for
    backward: q, out, L and references to the blocks; the blocks' gradients are returned per block.
    """

    @staticmethod
    def forward(ctx, q, scale: float, *blocks):
        n = len(blocks) // 2
        out = lse = None  # out in at least fp32 while merging, in place
        for b, (k, v) in enumerate(zip(blocks[:n], blocks[n:], strict=True)):
            o, l = _flash_cpu(q, k, v, 0.0, b == n - 1, scale=scale)  # [B, H, Tq, D], [B, H, Tq]
            o = o.to(torch.promote_types(o.dtype, torch.float32))
            if out is None:
                out, lse = o, l
            else:
                merged = torch.logaddexp(lse, l)
                out.mul_((lse - merged).exp_()[..., None]).add_(o.mul_((l - merged).exp_()[..., None]))
                lse = merged
        out = out.to(q.dtype)
        ctx.scale = scale
        ctx.save_for_backward(q, out, lse, *blocks)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *blocks = ctx.saved_tensors
        n = len(blocks) // 2
        grad_q, grad_blocks = None, []
        for b, (k, v) in enumerate(zip(blocks[:n], blocks[n:], strict=True)):
            gq, gk, gv = _flash_cpu_backward(grad_out, q, k, v, out, lse, 0.0, b == n - 1, scale=ctx.scale)
            grad_q = gq if grad_q is None else grad_q.add_(gq)
            grad_blocks.append((gk, gv))
        return grad_q, None, *(g for g, _ in grad_blocks), *(g for _, g in grad_blocks)


def attend(q: torch.Tensor, k, v, layout: AttentionLayout, scale: float):
    """Scaled dot-product attention, q [B, H, Tq, D], k/v [B, KV, Tk, D] -> [B, H, Tq, D]; k/v may also be
    lists of blocks along Tk (from a `BlockKVCache`), the last block the queries' own.

    The one place attention is computed: a GPU kernel (flash varlen, flex) slots in here.
    """
    if isinstance(k, list):
        if q.device.type == "cpu" and layout.continues_one_document:
            if torch.is_autocast_enabled("cpu"):  # cast as autocast casts scaled_dot_product_attention's inputs
                dtype = torch.get_autocast_dtype("cpu")
                q, k, v = q.to(dtype), [b.to(dtype) for b in k], [b.to(dtype) for b in v]
            return BlockwiseAttention.apply(q, scale, *k, *v)
        k, v = torch.cat(k, dim=2), torch.cat(v, dim=2)
    gqa = q.shape[1] != k.shape[1]
    if layout.causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if layout.documents is not None:  # packed documents: each one's causal attention alone
        return torch.cat([
            torch.cat([F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
                       for qd, kd, vd in zip(*(t[b : b + 1].split(lengths, dim=2) for t in (q, k, v)), strict=True)],
                      dim=2)
            for b, lengths in enumerate(layout.documents)
        ])  # fmt: skip
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.bias(q.dtype), scale=scale, enable_gqa=gqa)


class KVCache:
    """Keys/values (after k_norm and RoPE) of earlier tokens for every layer, with their positions/segments.

    Used to continue a sequence: chunk i of a long document (ChunkFlow) or decoding. `update` appends by
    concatenation; keys given by the caller (e.g. detached leaves) are used as they are.
    """

    def __init__(self, keys: list, values: list, positions: torch.Tensor, segments: torch.Tensor):
        self.keys, self.values = keys, values  # per layer [B, KV, P, D] (or None before the first forward)
        self.positions, self.segments = positions, segments  # [B, P]

    @classmethod
    def empty(cls, num_layers: int, batch: int, device=None) -> KVCache:
        none = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls([None] * num_layers, [None] * num_layers, none, none.clone())

    def __len__(self) -> int:
        return self.positions.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class BlockKVCache(KVCache):
    """A KVCache that keeps earlier tokens' keys/values as a list of blocks per layer (ChunkFlow's per-chunk
    K/V leaves) and appends the new ones as one more block, never concatenating them.

    When the queries continue one document (`AttentionLayout.continues_one_document`), `attend` runs over
    the blocks one at a time and merges them exactly, so neither a [P + T] copy of the keys and values (kept
    for backward, and then its gradient) nor a [T, P + T] mask is made, and gradients land on the blocks.
    """

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer] = [*self.keys[layer], k]
        self.values[layer] = [*self.values[layer], v]
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # over head_dim, shared by all heads
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layout: AttentionLayout, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = attend(q, k, v, layout, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: gate_proj/up_proj [E, I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_idx, weights [N, k] -> [N, H].

        Token-expert pairs are sorted by expert so each expert runs one matmul on a contiguous slice.
        """
        N, k = expert_idx.shape
        flat = expert_idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k  # which token each sorted pair belongs to
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        xs = x[token]
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                xe = xs[start : start + n]
                h = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
                outs.append(h @ self.down_proj[e].t())
            start += n
        y = torch.cat(outs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class SparseMoE(nn.Module):
    """Router (linear H->E, fp32 softmax over all experts, top-k, optional renormalisation) + experts."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def forward(self, x: torch.Tensor):
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        router_logits = self.gate(flat)  # [B*T, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(flat, idx, weights.to(x.dtype))
        return out.reshape(B, T, H), router_logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(cfg)
        sparse = cfg.is_sparse_layer(layer)
        self.mlp = SparseMoE(cfg) if sparse else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layout, cache, router_logits: list):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache, self.layer)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, logits = h
            router_logits.append(logits)
        return x + h


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CausalLMOutput:
    """Final hidden states; `logits` are computed from them only when read (full [B, T, V] is costly)."""

    hidden_states: torch.Tensor  # [B, T, H], after the final norm
    lm_head: nn.Module
    router_logits: tuple[torch.Tensor, ...] = ()  # one [B*T, E] per MoE layer
    cache: KVCache | None = None

    @cached_property
    def logits(self) -> torch.Tensor:  # [B, T, V]
        return self.lm_head(self.hidden_states)


class Qwen3ForCausalLM(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        position_ids: torch.Tensor | None = None,  # [B, T]; default: continue from the cache, else 0..T-1
        segment_ids: torch.Tensor | None = None,  # [B, T] document id of each token (packing); default 0
        attention_mask: torch.Tensor | None = None,  # [B, T] 1 = token, 0 = padding
        cache: KVCache | None = None,
    ) -> CausalLMOutput:
        B, T = input_ids.shape
        device = input_ids.device
        has_prefix = cache is not None and len(cache) > 0
        plain = position_ids is None and segment_ids is None and attention_mask is None and not has_prefix
        if position_ids is None:
            start = cache.positions[:, -1:] + 1 if has_prefix else 0
            if attention_mask is None:
                position_ids = start + torch.arange(T, device=device).expand(B, T)
            else:
                position_ids = start + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if segment_ids is None:
            segment_ids = torch.zeros(B, T, dtype=torch.long, device=device)
        if attention_mask is not None:
            segment_ids = segment_ids.masked_fill(attention_mask == 0, -1)
        if cache is not None:
            cache.positions = torch.cat([cache.positions, position_ids], dim=1)
            cache.segments = torch.cat([cache.segments, segment_ids], dim=1)
            layout = AttentionLayout(position_ids, segment_ids, cache.positions, cache.segments, causal=plain)
        else:
            layout = AttentionLayout(position_ids, segment_ids, position_ids, segment_ids, causal=plain)

        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        router_logits: list[torch.Tensor] = []
        for layer in self.model.layers:
            x = layer(x, cos, sin, layout, cache, router_logits)
        return CausalLMOutput(self.model.norm(x), self.lm_head, tuple(router_logits), cache)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh weights as transformers initialises Qwen3 (normal(0, std) matrices, unit norms)."""
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache.empty(self.config.num_hidden_layers, batch, self.lm_head.weight.device)
