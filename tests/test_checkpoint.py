"""Hugging Face checkpoint directories move both ways between transformers and forkflow; bad ones fail clearly."""

import json

import pytest
import torch
import transformers

from forkflow.models import CheckpointError, from_pretrained, save_pretrained

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _hf_class(moe):
    return transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM


def _max_diff(a, b):
    with torch.no_grad():
        return (a(IDS).logits - b(IDS).logits).abs().max().item()


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_saves_forkflow_loads_and_back(tiny_checkpoint, tmp_path, moe, tied):
    path, ref = tiny_checkpoint(moe=moe, tie_word_embeddings=tied)
    model = from_pretrained(path)
    assert _max_diff(model, ref) <= 1e-5
    save_pretrained(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == [ref.__class__.__name__]
    back = _hf_class(moe).from_pretrained(tmp_path / "out").eval()
    assert _max_diff(back, ref) == 0.0
    names = set(transformers.modeling_utils.load_state_dict(str(tmp_path / "out" / "model.safetensors")))
    assert ("lm_head.weight" in names) == (not tied)
    if moe:
        assert "model.layers.0.mlp.experts.5.down_proj.weight" in names


@pytest.mark.parametrize("moe", [False, True])
def test_sharded_both_ways(tiny_checkpoint, tmp_path, moe):
    path, ref = tiny_checkpoint(moe=moe)
    ref.save_pretrained(tmp_path / "hf-sharded", max_shard_size="20KB")
    assert (tmp_path / "hf-sharded" / "model.safetensors.index.json").is_file()
    model = from_pretrained(tmp_path / "hf-sharded")
    assert _max_diff(model, ref) <= 1e-5

    save_pretrained(model, tmp_path / "ff-sharded", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "ff-sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "ff-sharded" / "model.safetensors").exists()
    back = _hf_class(moe).from_pretrained(tmp_path / "ff-sharded").eval()
    assert _max_diff(back, ref) == 0.0


def test_legacy_config_keys(tiny_checkpoint, tmp_path):
    """Hub files spell `rope_theta` and `num_experts` at the top level; both libraries must read them alike."""
    path, _ = tiny_checkpoint(moe=True)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 5000.0
    cfg["num_experts"] = cfg.pop("num_local_experts")
    (path / "config.json").write_text(json.dumps(cfg))
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(path).eval()
    model = from_pretrained(path)
    assert model.config.rope_theta == 5000.0 and model.config.num_experts == 6
    assert _max_diff(model, ref) <= 1e-5
    save_pretrained(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rope_theta"] == 5000.0 and saved["num_experts"] == 6 and "num_local_experts" not in saved


def test_bf16_round_trip(tiny_checkpoint, tmp_path):
    path, ref = tiny_checkpoint()
    model = from_pretrained(path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    save_pretrained(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again = from_pretrained(tmp_path / "bf16")  # the checkpoint's own dtype by default
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    back = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert torch.equal(back.model.embed_tokens.weight, ref.model.embed_tokens.weight.bfloat16().float())


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_missing_shard(tiny_checkpoint, tmp_path):
    path, ref = tiny_checkpoint()
    ref.save_pretrained(tmp_path / "s", max_shard_size="20KB")
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        from_pretrained(tmp_path / "s")


def test_truncated_file(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(path)


def test_unknown_architecture(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture.*LlamaForCausalLM"):
        from_pretrained(path)


def test_shape_mismatch_names_tensor_and_shapes(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = r"model.layers.0.mlp.(gate|up|down)_proj.weight has shape \(.*\).*implies \(.*\)"
    with pytest.raises(CheckpointError, match=shapes):
        from_pretrained(path)


def test_missing_config(tiny_checkpoint):
    path, _ = tiny_checkpoint()
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        from_pretrained(path)
