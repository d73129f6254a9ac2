"""The MoE load-balancing loss, per micro-batch or over the global batch (as Qwen3 trains).

    L_bal = E · Σ_e f_e · P_e,   f_e = (token-slots routed to e) / tokens,   P_e = mean router prob of e,

pooled over the tokens of all MoE layers, so uniform routing gives k (the top-k), not 1. In the global-batch
variant the counts behind f_e are summed over every micro-batch added and over the data-parallel ranks of
`group` before the product, which lets experts specialise by domain instead of balancing every micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class ExpertLoad:
    """Router statistics accumulated over micro-batches; `loss()` forms the load-balancing loss.

    P_e keeps its graph (the loss is differentiated through it); f_e carries no gradient. Call `loss()`
    once, after the last micro-batch, and backpropagate it with the last one (the graphs of all added
    micro-batches' routers stay alive until then).
    """

    def __init__(self, num_experts: int, top_k: int, group: dist.ProcessGroup | None = None):
        self.num_experts, self.top_k, self.group = num_experts, top_k, group
        self.counts = torch.zeros(num_experts)  # token-slots per expert, summed over layers
        self.prob_sum: torch.Tensor | float = 0.0  # Σ router probs per expert [E]
        self.rows = 0.0  # tokens summed over layers

    def add(self, router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None = None) -> None:
        """router_logits: one [N, E] per MoE layer (N = B·T); mask: [B, T] or [N], 1 = real token."""
        for logits in router_logits:
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            w = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.reshape(-1).float()
            idx = torch.topk(probs, self.top_k, dim=-1).indices
            slots = torch.zeros(self.num_experts, device=probs.device).index_add_(
                0, idx.reshape(-1), w.repeat_interleave(self.top_k)
            )
            self.counts = self.counts.to(probs.device) + slots.detach()
            self.prob_sum = self.prob_sum + (probs * w[:, None]).sum(0)
            self.rows += w.sum().item()

    def loss(self) -> torch.Tensor:
        if not self.rows:
            return torch.zeros(())
        counts, rows = self.counts.clone(), torch.tensor([self.rows], device=self.counts.device)
        if self.group is not None:
            dist.all_reduce(counts, group=self.group)
            dist.all_reduce(rows, group=self.group)
        f = counts / rows
        p = self.prob_sum / self.rows
        return self.num_experts * (f * p).sum()


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-micro-batch variant (f_e from this micro-batch alone), as transformers computes it."""
    load = ExpertLoad(num_experts, top_k)
    load.add(router_logits, mask)
    return load.loss()
