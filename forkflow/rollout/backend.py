"""The interface the trainer and evaluation sample through: the plain-PyTorch backend here, vLLM's in
`forkflow.rollout.vllm_backend` (`rollout.backend: vllm`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch

from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from forkflow.rollout.engine import Sample, generate
from forkflow.rollout.sampling import SamplingParams
from forkflow.rollout.weights import DecodeWeights


class RolloutBackend(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        on_step: Callable[[int, int], None] | None = None,
        prompt_keys: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """params.n samples per prompt (token ids) -> samples[prompt][sample], with the fields `Sample`
        documents (T = 1 log-probs, sampling log-probs, rollout-temperature entropies). Sample s of the
        prompt with key k (default: its index) draws from a random stream of (params.seed, k, s) alone."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the policy's current weights, (forkflow parameter name, full tensor) pairs, before a rollout
        (cast to the backend's own dtype)."""
        ...

    def release(self) -> None:
        """Free what `load_weights` put in memory until the next `load_weights` (the trainer updates then)."""
        ...

    def close(self) -> None:
        """End the backend once the run is done with it, before the process group goes."""
        ...


class TorchBackend:
    """Generation with forkflow's own Qwen3 and KV cache (`engine.generate`); runs anywhere torch runs.

    `TorchBackend(model)` samples from `model` itself (one process, or a replica per rank);
    `TorchBackend.empty(config, device, dtype)` holds no weights until `load_weights` (a sharded trainer
    gathers them once per step, verl's hybrid engine; a bf16 rollout casts the fp32 trainer's) and frees them
    again on `release`. max_batch_tokens bounds the KV cache of a `generate` call (continuous batching, see
    `engine.generate`); None: all requests at once.

    The decoding step's copy of the weights (`weights.DecodeWeights`: fused, and prepacked on CPU) is made at
    the first `generate` after the model's weights change (an optimizer step or `load_weights`: their
    tensors' version counters move) and dropped by `release`."""

    def __init__(self, model: Qwen3ForCausalLM, owns_weights: bool = False, max_batch_tokens: int | None = None):
        self.model, self.owns_weights, self.max_batch_tokens = model, owns_weights, max_batch_tokens
        self.device = model.lm_head.weight.device
        self.decode_weights: DecodeWeights | None = None
        self.weights_version: list[tuple[int, int]] = []

    @classmethod
    def empty(
        cls,
        config: Qwen3Config,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        max_batch_tokens: int | None = None,
    ) -> TorchBackend:
        with torch.device("meta"):
            model = Qwen3ForCausalLM(config).to(dtype).eval()
            backend = cls(model, owns_weights=True, max_batch_tokens=max_batch_tokens)
        backend.device = device
        return backend

    def generate(self, prompts, params, on_step=None, prompt_keys=None) -> list[list[Sample]]:
        version = [(p.data_ptr(), p._version) for p in self.model.parameters()]
        if self.decode_weights is None or version != self.weights_version:
            self.decode_weights, self.weights_version = None, version  # the old copy goes before the new one
            self.decode_weights = DecodeWeights(self.model)
        return generate(self.model, prompts, params, on_step, prompt_keys, self.max_batch_tokens, self.decode_weights)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.model.lm_head.weight.is_meta:
            self.model.to_empty(device=self.device)
            if self.model.config.tie_word_embeddings:
                self.model.lm_head.weight = self.model.model.embed_tokens.weight
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)

    def release(self) -> None:
        self.decode_weights = None
        if self.owns_weights:
            self.model.to("meta")

    def close(self) -> None:
        self.release()
