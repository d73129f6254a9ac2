"""Hugging Face checkpoint directories <-> forkflow Qwen3 models.

Reads config.json in both the legacy (`rope_theta`, `num_experts`) and transformers-5 (`rope_parameters`,
`num_local_experts`) spellings, single or sharded safetensors, tied checkpoints without `lm_head.weight`;
writes the same layout back, keeping the keys of the config.json it was loaded from.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from forkflow.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says which file and what to do."""


# ----------------------------------------------------------------------------------------------- config


def read_config(path: str | os.PathLike) -> Qwen3Config:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a Hugging Face checkpoint directory needs its config.json")
    return read_config_file(file)


def read_config_file(file: str | os.PathLike) -> Qwen3Config:
    """A Hugging Face config.json (anywhere) -> Qwen3Config."""
    try:
        raw = json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    return config_from_dict(raw, source=str(file))


def config_from_dict(raw: dict, source: str = "config") -> Qwen3Config:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    known = [a for a in archs if a in ARCHITECTURES]
    if archs and not known or not archs and model_type not in ARCHITECTURES.values():
        raise CheckpointError(
            f"{source}: unsupported architecture {archs or model_type!r}; forkflow loads "
            f"{' and '.join(ARCHITECTURES)} checkpoints"
        )
    moe = (ARCHITECTURES[known[0]] if known else model_type) == "qwen3_moe"
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        kind = rope.get("rope_type", rope.get("type"))
        raise CheckpointError(f"{source}: RoPE scaling {kind!r} is not supported (releases use none)")
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window=true is not supported (no Qwen3 release uses it)")
    heads = raw["num_attention_heads"]
    try:
        return Qwen3Config(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            # Qwen3Config defaults head_dim to 128; Qwen3MoeConfig has no such field and uses hidden / heads
            head_dim=raw.get("head_dim") or (raw["hidden_size"] // heads if moe else 128),
            max_position_embeddings=raw.get("max_position_embeddings", 32768),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            # transformers falls back to 1e4 when the file names no theta
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_experts=(raw.get("num_experts") or raw.get("num_local_experts") or 0) if moe else 0,
            num_experts_per_tok=raw.get("num_experts_per_tok", 8),
            moe_intermediate_size=raw.get("moe_intermediate_size", 768),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=raw.get("decoder_sparse_step", 1),
            mlp_only_layers=list(raw.get("mlp_only_layers") or []),
            router_aux_loss_coef=raw.get("router_aux_loss_coef", 0.001),
            extra=raw,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: required key {e.args[0]!r} is missing") from None


def config_to_dict(cfg: Qwen3Config, dtype: torch.dtype) -> dict:
    """config.json for `cfg`: the loaded file's keys kept, the model's fields written in the file's own spelling."""
    out = dict(cfg.extra)
    out["architectures"] = ["Qwen3MoeForCausalLM" if cfg.is_moe else "Qwen3ForCausalLM"]
    out["model_type"] = "qwen3_moe" if cfg.is_moe else "qwen3"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        out[key] = getattr(cfg, key)
    if "rope_theta" in out:
        out["rope_theta"] = cfg.rope_theta
    else:
        rope = {**out.get("rope_parameters", {}), "rope_theta": cfg.rope_theta, "rope_type": "default"}
        out["rope_parameters"] = rope
    if cfg.is_moe:
        out["num_experts" if "num_experts" in out else "num_local_experts"] = cfg.num_experts
        for key in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                    "mlp_only_layers", "router_aux_loss_coef"):
            out[key] = getattr(cfg, key)
    out.pop("torch_dtype", None)
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


# ------------------------------------------------------------------------------------------ safetensors


def _check_complete(file: Path) -> None:
    """Raise if a safetensors file is shorter than its header says (an interrupted copy or download)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes, no safetensors header); re-save or re-copy it")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{file}: truncated inside its header; re-save or re-copy it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: not a safetensors file (unreadable header)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file}: truncated ({size} bytes, header needs {8 + n + end}); re-save or re-copy the checkpoint"
        )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, from `model.safetensors` or the shards its index names."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: shard listed in {INDEX_FILE} is missing")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or {INDEX_FILE} (only safetensors checkpoints load)")
    state = {}
    for name in files:
        _check_complete(path / name)
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def from_hf_names(state: dict[str, torch.Tensor], cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> this model's (per-expert matrices stacked into [E, ...])."""
    out, experts = {}, {}
    for key, t in state.items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = t
        else:
            out[key] = t
    for (prefix, proj), by_index in experts.items():
        missing = [e for e in range(cfg.num_experts) if e not in by_index]
        if missing:
            raise CheckpointError(f"{prefix}.{missing[0]}.{proj}.weight is missing from the checkpoint")
        out[f"{prefix}.{proj}"] = torch.stack([by_index[e] for e in range(cfg.num_experts)])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_hf_names(state: dict[str, torch.Tensor], cfg: Qwen3Config) -> dict[str, torch.Tensor]:
    return dict(hf_tensors(state.items(), cfg))


def hf_tensors(named: Iterable[tuple[str, torch.Tensor]], cfg: Qwen3Config) -> Iterator[tuple[str, torch.Tensor]]:
    """(forkflow name, tensor) -> (Hugging Face name, tensor), lazily: stacked experts one per expert, a tied
    LM head left out."""
    for key, t in named:
        prefix, _, proj = key.rpartition(".")
        if prefix.endswith("mlp.experts"):
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.{proj}.weight", t[e]
        elif not (cfg.tie_word_embeddings and key == "lm_head.weight"):
            yield key, t


# --------------------------------------------------------------------------------------------- public


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> Qwen3ForCausalLM:
    """Load a Qwen3 / Qwen3-MoE Hugging Face checkpoint directory; dtype defaults to the checkpoint's."""
    cfg = read_config(path)
    state = from_hf_names(read_state_dict(path), cfg)
    if dtype is None:
        dtype = _DTYPES.get(cfg.extra.get("dtype") or cfg.extra.get("torch_dtype"), torch.float32)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]}{more} is missing from the checkpoint")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: tensor {unexpected[0]} is not part of a {cfg.extra.get('model_type')} model")
    for key, t in expected.items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)} in the checkpoint, "
                f"but config.json implies {tuple(t.shape)}"
            )
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_pretrained(model: Qwen3ForCausalLM, path, max_shard_bytes: int = 5 * 2**30, dtype=None) -> None:
    """Write config.json and safetensors (sharded with an index when larger than `max_shard_bytes`)."""
    write_pretrained(model.state_dict(), model.config, path, max_shard_bytes, dtype or model.lm_head.weight.dtype)


def write_pretrained(state: dict[str, torch.Tensor], config: Qwen3Config, path, max_shard_bytes: int = 5 * 2**30,
                     dtype: torch.dtype = torch.float32) -> None:
    """`save_pretrained` from a state dict in forkflow's names (e.g. gathered from a sharded model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = to_hf_names(state, config)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    shards, size = [{}], 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config_to_dict(config, dtype), indent=2) + "\n")
