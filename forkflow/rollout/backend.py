"""The interface the trainer and `forkflow generate` use to sample, so that a vLLM backend can replace the
plain-PyTorch one on GPUs without changing either of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from forkflow.models.qwen3 import Qwen3ForCausalLM
from forkflow.rollout.engine import Sample, generate
from forkflow.rollout.sampling import SamplingParams


class RolloutBackend(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[list[Sample]]:
        """params.n samples per prompt (token ids) -> samples[prompt][sample], with the fields `Sample`
        documents (T = 1 log-probs, sampling log-probs, rollout-temperature entropies)."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take the policy's new weights (forkflow parameter names) before the next rollout."""
        ...


class TorchBackend:
    """Generation with forkflow's own Qwen3 and KV cache (`engine.generate`); runs anywhere torch runs."""

    def __init__(self, model: Qwen3ForCausalLM):
        self.model = model

    def generate(self, prompts, params, on_step=None) -> list[list[Sample]]:
        return generate(self.model, prompts, params, on_step)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)
