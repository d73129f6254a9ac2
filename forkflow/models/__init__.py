"""Qwen3 dense and MoE models and their Hugging Face checkpoints."""

from forkflow.models.checkpoint import CheckpointError, from_pretrained, save_pretrained
from forkflow.models.load_balance import ExpertLoad, load_balancing_loss
from forkflow.models.qwen3 import CausalLMOutput, KVCache, Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "CausalLMOutput",
    "CheckpointError",
    "ExpertLoad",
    "KVCache",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "from_pretrained",
    "load_balancing_loss",
    "save_pretrained",
]
