"""Rollouts: batched KV-cache sampling that returns per-token log-probs and entropies, behind a backend
interface: plain PyTorch (`TorchBackend`), or vLLM (`forkflow.rollout.vllm_backend`, imported on demand)."""

from forkflow.rollout.backend import RolloutBackend, TorchBackend
from forkflow.rollout.engine import PromptError, Sample, generate
from forkflow.rollout.sampling import EntropyAwareTemperature, SamplingParams, ThinkingBudget

__all__ = [
    "EntropyAwareTemperature",
    "PromptError",
    "RolloutBackend",
    "Sample",
    "SamplingParams",
    "ThinkingBudget",
    "TorchBackend",
    "generate",
]
