"""The rollout's weights laid out for its prefill and decoding steps: per layer the q, k, v projections as
one matrix (vLLM's QKV layout: one matmul instead of three), and the LM head in vocabulary chunks of CHUNK
rows, the chunks `sampling.sample_plain` walks.

On CPU the matrices are also laid out, once per set of weights, for the fastest product at decoding's batches
(`layout_of`): fp32 ones for forkflow's own kernel (`cpu_kernels`; `benchmarks/bench_generate.py` on an
AVX2-only AMD EPYC, Zen 3: forkflow-fp32 at Qwen3-0.6B's shape took 24.5 ms per token on oneDNN's matmuls and
12.2 on the kernel, in runs before and after it); bf16 ones where the CPU has bf16 matmuls, and fp32 ones
where no C compiler is found, are prepacked into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing pass does: 1.4-2x faster than F.linear in
bf16 and 1.3-5x in fp32 at those batches). A row's result does not depend on the other rows of the batch
either way. A laid-out product also applies the elementwise op that follows it in the same pass over its
output (oneDNN post-ops, or the kernel's epilogue: the product with the gate after the MLP's up, the residual
sum after o and down; oneDNN also SiLU after the gate). Elsewhere the matrices are plain tensors used through
F.linear. The laid-out copies live beside the model's own weights until the backend releases them.

`small_ops_on_one_thread`: on a CPU, every op of a prefill or decoding step, and of plain sampling, other than
the projections, attention and MoE layers (`on_all_threads`) and forkflow's kernels (`kernel_threads`) runs on
one thread. A torch op over more than 32K elements opens
an OpenMP parallel region, and between two such regions the other threads go to sleep (OMP_WAIT_POLICY=PASSIVE,
and the default policy after a short spin): waking them cost 50-100 us per op on a shared 2-core host, more
than the op itself on one thread (5-20 us for a decoding batch's [16, 24, 128] q/k heads), while the
projections, which read the weights, gain from every thread.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from forkflow.models.qwen3 import MLP, Qwen3ForCausalLM
from forkflow.rollout import cpu_kernels

PACK_BATCH = 16  # the batch oneDNN picks its blocked layout for (every batch runs on it)
# vocabulary rows of a chunk of the LM head, 256 of `sampling.sample_plain`'s blocks of 128: it holds [B, CHUNK] logits
CHUNK = 32768


def cpu_bf16_matmuls() -> bool:
    """Whether this CPU has oneDNN's native bf16 matmuls (AVX-512 BW/VL/DQ or AVX-NE-CONVERT). Without them
    (AVX2 CPUs) torch emulates bf16 and a decoding batch's bf16 matmul is 2-5x slower than fp32's."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def warn_if_bf16_is_emulated(dtype: torch.dtype, device: torch.device, fix: str) -> None:
    """A warning on stderr where bf16 decoding would run on a CPU without bf16 matmuls; `fix` names the
    setting that chooses fp32."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_bf16_matmuls():
        print(f"warning: bf16 decoding on a CPU without bf16 matmuls ({torch.backends.cpu.get_cpu_capability()}): "
              f"torch emulates them, 2-5x slower than fp32 at decoding's batch sizes; {fix} is faster here",
              file=sys.stderr)  # fmt: skip


def layout_of(weight: torch.Tensor) -> str:
    """How `Projection` holds `weight`: "kernel" (a CPU fp32 matrix where `cpu_kernels` compiles), "onednn"
    (prepacked: a CPU fp32 matrix otherwise, in a build with oneDNN, or a bf16 one where the CPU has bf16
    matmuls; oneDNN refuses to pack bf16 elsewhere), or "plain" (F.linear)."""
    if weight.device.type != "cpu":
        return "plain"
    if weight.dtype == torch.float32 and cpu_kernels.available():
        return "kernel"
    if torch.backends.mkldnn.is_available() and (
        weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and cpu_bf16_matmuls())
    ):
        return "onednn"
    return "plain"


_projection_threads = 0  # inside `small_ops_on_one_thread`: the threads a projection runs on


@contextmanager
def small_ops_on_one_thread(device: torch.device) -> Iterator[None]:
    """On a CPU with several torch threads: torch ops in the block run on one thread, the projections on
    all of them (see the module's docstring). torch._C.set_num_threads (0.5 us) is torch.set_num_threads
    itself, called there because an in-process vLLM engine replaces the latter with a no-op."""
    global _projection_threads
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1 or _projection_threads:
        yield
        return
    _projection_threads = threads
    torch._C.set_num_threads(1)
    try:
        yield
    finally:
        torch._C.set_num_threads(threads)
        _projection_threads = 0


def kernel_threads() -> int:
    """The threads forkflow's CPU kernels (`cpu_kernels`) run on: all of torch's, also inside
    `small_ops_on_one_thread`."""
    return _projection_threads or torch.get_num_threads()


def on_all_threads(function, *args, **kwargs):
    """function(*args, **kwargs) on all of torch's threads, also inside `small_ops_on_one_thread`."""
    if not _projection_threads:
        return function(*args, **kwargs)
    torch._C.set_num_threads(_projection_threads)
    try:
        return function(*args, **kwargs)
    finally:
        torch._C.set_num_threads(1)


class Projection:
    """x @ weightᵀ, with weight [out, in] laid out as `layout_of` says (or as given); `silu`, `add` and `mul`
    apply an op to the product (in one pass with it where the layout allows)."""

    def __init__(self, weight: torch.Tensor, layout: str | None = None):
        weight = weight.detach()
        self.layout, self.shape = layout or layout_of(weight), weight.shape
        if self.layout == "kernel":
            self.weight = cpu_kernels.pack(weight)
        elif self.layout == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH)
        else:
            self.weight = weight

    def _kernel(self, x: torch.Tensor, op: str = "none", other: torch.Tensor | None = None) -> torch.Tensor:
        return cpu_kernels.matmul(x, self.weight, self.shape[0], kernel_threads(), op, other)

    def _onednn(self, x: torch.Tensor, op: str, other: torch.Tensor | None = None) -> torch.Tensor:
        if other is None:  # a unary post-op ("none", "swish")
            return on_all_threads(torch.ops.mkldnn._linear_pointwise, x, self.weight, None, op, [], "")
        return on_all_threads(torch.ops.mkldnn._linear_pointwise.binary, x, other, self.weight, None, op)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "kernel":
            return self._kernel(x)
        if self.layout == "onednn":
            return self._onednn(x, "none")
        return on_all_threads(F.linear, x, self.weight)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x @ weightᵀ)"""
        if self.layout == "onednn":
            return self._onednn(x, "swish")
        return F.silu(self(x), inplace=True)

    def add(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x @ weightᵀ + other"""
        if self.layout == "kernel":
            return self._kernel(x, "add", other)
        if self.layout == "onednn":
            return self._onednn(x, "add", other)
        return self(x).add_(other)

    def mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """x @ weightᵀ · other"""
        if self.layout == "kernel":
            return self._kernel(x, "mul", other)
        if self.layout == "onednn":
            return self._onednn(x, "mul", other)
        return self(x).mul_(other)


class Head:
    """The LM head: `weight` [V, H] itself (to gather single tokens' rows) and `chunks`, (first token id,
    Projection of rows first..first + CHUNK) over the vocabulary."""

    def __init__(self, weight: torch.Tensor, layout: str | None = None):
        self.weight = weight.detach()
        self.chunks = [(start, Projection(self.weight[start : start + CHUNK], layout))
                       for start in range(0, len(self.weight), CHUNK)]  # fmt: skip

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> [B, V] in the weights' dtype."""
        return torch.cat([projection(hidden) for _, projection in self.chunks], -1)


class LayerWeights:
    """One decoder layer's projections: qkv [(heads + 2 · kv_heads) · head_dim, H] and o; for a dense MLP
    gate, up and down (None for a sparse MoE layer, which runs as its module); and
    qk_norm [heads + kv_heads, head_dim], q_norm's weight for each query head and k_norm's for each key
    head, to normalise q and k together (eps: the layer's RMSNorm epsilon)."""

    def __init__(self, layer, layout: str | None = None):
        attn = layer.self_attn
        self.qkv = Projection(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), layout)
        self.qk_norm = torch.cat([attn.q_norm.weight.expand(attn.num_heads, -1),
                                  attn.k_norm.weight.expand(attn.num_kv_heads, -1)]).detach()
        self.eps = attn.q_norm.eps
        self.o = Projection(attn.o_proj.weight, layout)
        self.gate = self.up = self.down = None
        if isinstance(layer.mlp, MLP):
            self.gate, self.up, self.down = (
                Projection(m.weight, layout) for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            )


class DecodeWeights:
    """`model`'s weights as the prefill and decoding steps use them (a copy: made again when the model's
    weights change), in `layout` (default: each matrix's `layout_of`)."""

    def __init__(self, model: Qwen3ForCausalLM, layout: str | None = None):
        with torch.no_grad():
            self.layers = [LayerWeights(layer, layout) for layer in model.model.layers]
            self.head = Head(model.lm_head.weight, layout)
