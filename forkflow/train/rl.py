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
no-grad forward, the loss's tokens (the selected ones) in the gradient pass. A checkpoint holds the model
(Hugging Face layout), optimizer, LR schedule and data position; all sampling is seeded by (seed, step),
so a resumed run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from forkflow.chat import load_tokenizer, stop_token_ids
from forkflow.chunkflow import chunked_backward, chunked_forward, unchunk
from forkflow.config import ConfigError, save_config
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
from forkflow.rollout import Sample, SamplingParams, TorchBackend
from forkflow.train.evaluate import EvalConfig, evaluate_files
from forkflow.train.rl_data import BOXED_TEMPLATE, RLPrompt, load_rl_prompts
from forkflow.train.state import (
    ChunkFlowConfig,
    MetricsLog,
    ModelConfig,
    OptimConfig,
    build_optimizer,
    latest_checkpoint,
    resolve_device,
    restore_trainer_state,
    run_training_command,
    save_checkpoint,
)


@dataclass
class DataConfig:
    train: str = ""  # .jsonl/.parquet: verl layout or {problem, answer}
    chat: bool = True  # render with the tokenizer's chat template; false: `template` (base models)
    enable_thinking: bool = True
    template: str = BOXED_TEMPLATE  # {prompt} is the problem
    max_prompt_tokens: int = 1024
    shuffle: bool = True  # a new seeded order every epoch


@dataclass
class RolloutConfig:
    n: int = 16  # responses per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 20480


@dataclass
class RewardConfig:
    verifier: str = "math"  # math | math_answer_line | countdown | arithmetic | package.module:function
    correct: float = 1.0
    incorrect: float = 0.0  # DAPO: -1.0
    timeout_s: float = 10.0  # wall clock per check; a slower one scores `incorrect` and is counted
    workers: int = 2
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens before max_new_tokens; 0: off
    overlong_factor: float = 1.0

    def values(self) -> RewardValues:
        """The scores of a correct, an incorrect and an unverifiable (timed-out, failed) response."""
        return RewardValues(self.correct, self.incorrect, self.incorrect)


@dataclass
class AlgoConfig:
    advantage: Literal["grpo", "rloo"] = "grpo"
    norm_by_std: bool = True  # false: Dr.GRPO
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_dual: float = 10.0
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = 0.0  # KL to the initial policy (k1/k3); 0: no reference model is kept
    kl_estimator: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0
    dynamic_sampling: bool = True  # DAPO: keep only groups with mixed correctness
    max_gen_rounds: int = 8  # dynamic sampling gives up (an error) after this many generation rounds


@dataclass
class SelectionConfig:
    mode: Literal["all", "top", "bottom", "random"] = "top"  # top: forking tokens; bottom: the other 1-ρ
    ratio: float = 0.2  # ρ
    # ranking pool: micro-batch (chunkflow.micro_batch_size sequences: with padded batching, each forward's
    # micro-batch, as the official code) | mini-batch | the mini-batch over all ranks
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    prompts_per_step: int = 512
    mini_batch_prompts: int = 32  # prompts per optimizer update (512 / 32 = 16 updates per step)
    steps: int = 100
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    seed: int = 0
    out: str = "runs/rl"
    save_every: int = 0  # steps between checkpoints; 0: only after the last step
    progress: bool = True
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars into `out` (extra: tensorboard)


def check_config(cfg: RLConfig) -> None:
    if not cfg.model.path:
        raise ConfigError("model.path is required: the Hugging Face checkpoint directory to train")
    if not cfg.data.train:
        raise ConfigError("data.train is required: a .jsonl or .parquet file of prompts with answers")
    if cfg.prompts_per_step % cfg.mini_batch_prompts:
        raise ConfigError(
            f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of mini_batch_prompts "
            f"({cfg.mini_batch_prompts})"
        )
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0 (the update's log-probs are at it), got "
                          f"{cfg.rollout.temperature}")
    if cfg.chunkflow.micro_batch_size < 1:
        raise ConfigError(f"chunkflow.micro_batch_size must be >= 1, got {cfg.chunkflow.micro_batch_size}")
    if cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n must be >= 2 (group-relative advantages need a group), got {cfg.rollout.n}")
    if cfg.reward.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError("reward.overlong_buffer must be below rollout.max_new_tokens")
    if cfg.select.mode != "all" and not 0 < cfg.select.ratio <= 1:
        raise ConfigError(f"select.ratio must be in (0, 1], got {cfg.select.ratio}")


@dataclass
class Response:
    """One scored response of the step's batch."""

    group: int  # index of its prompt within the step
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
        check_config(cfg)
        self.cfg = cfg
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.group = dist.group.WORLD if self.world > 1 else None
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        resume = latest_checkpoint(self.out)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        self.stop_ids = tuple(stop_token_ids(self.tokenizer))
        d = cfg.data
        prompts = load_rl_prompts(d.train, self.tokenizer, chat=d.chat, enable_thinking=d.enable_thinking,
                                  template=None if d.chat else d.template, max_prompt_tokens=d.max_prompt_tokens)
        self.model = from_pretrained(resume or cfg.model.path, dtype=torch.float32, device=self.device)
        self.reference = None
        if cfg.algo.kl_coef:
            self.reference = from_pretrained(cfg.model.path, dtype=torch.float32, device=self.device).eval()
        updates = cfg.steps * cfg.prompts_per_step // cfg.mini_batch_prompts
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, updates)
        self.step = restore_trainer_state(resume, self.optimizer, self.scheduler) if resume else 0
        cursor = json.loads((resume / "data_state.json").read_text())["cursor"] if resume else 0
        self.stream = PromptStream(prompts, cfg.seed, d.shuffle, cursor)
        self.backend = TorchBackend(self.model)
        self.verifier = resolve_verifier(cfg.reward.verifier)
        self.values = cfg.reward.values()
        self.last_checkpoint = resume

    # ------------------------------------------------------------------------------------------ rollouts

    def sampling(self, round_: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                              top_k=r.top_k, seed=self.cfg.seed * 1_000_003 + self.step * 1009 + round_,
                              stop_token_ids=self.stop_ids)

    def generate_batch(self, pool: VerifierPool, times: dict) -> tuple[list[Response], dict]:
        """Rounds of generation until `prompts_per_step` groups are kept (all groups without dynamic sampling)."""
        cfg, kept, stats = self.cfg, [], {"gen/rounds": 0, "reward/timeouts": 0, "reward/failed": 0}
        seen: list[Response] = []
        while len(kept) < cfg.prompts_per_step * cfg.rollout.n:
            if stats["gen/rounds"] == cfg.algo.max_gen_rounds:
                raise RuntimeError(
                    f"dynamic sampling kept {len(kept) // cfg.rollout.n} of {cfg.prompts_per_step} groups after "
                    f"{cfg.algo.max_gen_rounds} generation rounds: almost every group is all right or all "
                    "wrong. Raise algo.max_gen_rounds, use easier/harder data, or set algo.dynamic_sampling=false"
                )
            prompts = self.stream.take(cfg.prompts_per_step)
            began = time.perf_counter()
            self.model.eval()
            samples = self.backend.generate([p.prompt_ids for p in prompts], self.sampling(stats["gen/rounds"]))
            times["gen"] += time.perf_counter() - began
            began = time.perf_counter()
            responses = self.score(pool, prompts, samples, stats, offset=len(seen) // cfg.rollout.n)
            times["reward"] += time.perf_counter() - began
            seen += responses
            stats["gen/rounds"] += 1
            if cfg.algo.dynamic_sampling:
                correct = torch.tensor([r.correct for r in responses])
                groups = torch.tensor([r.group for r in responses])
                keep = dynamic_sampling_mask(correct, groups).tolist()
                responses = [r for r, k in zip(responses, keep, strict=True) if k]
            kept += responses
        kept = kept[: cfg.prompts_per_step * cfg.rollout.n]
        stats.update(self.rollout_metrics(seen, kept))
        return kept, stats

    def score(self, pool, prompts: list[RLPrompt], samples, stats: dict, offset: int) -> list[Response]:
        cfg = self.cfg
        flat = [(g, p, s) for g, (p, group) in enumerate(zip(prompts, samples, strict=True)) for s in group]
        texts = [self.tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True) for _, _, s in flat]
        scored = score_responses(pool, self.verifier, texts, [p.ground_truth for _, p, _ in flat], self.values)
        stats["reward/timeouts"] += scored.timed_out
        stats["reward/failed"] += scored.failed
        rewards = torch.tensor(scored.rewards)
        if cfg.reward.overlong_buffer:
            lengths = torch.tensor([len(s.token_ids) for _, _, s in flat])
            rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer,
                                                 cfg.reward.overlong_factor)
        return [
            Response(offset + g, torch.tensor(p.prompt_ids), s.token_ids.cpu(), s.finish_reason == "length",
                     float(r), c, 0.0, *self.rollout_statistics(s))
            for (g, p, s), r, c in zip(flat, rewards.tolist(), scored.correct, strict=True)
        ]

    def rollout_statistics(self, sample: Sample) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A sample's per-token (log-probs, entropies) when they are exactly what the update computes for the
        policy that sampled it, log softmax(z/T)[token] and H(softmax(z/T)) with T the rollout temperature;
        else (None, None), and the update computes them itself.

        The engine's `entropies` are H(softmax(z/T)) of the unfiltered distribution, always that quantity.
        Its `logprobs` are log softmax(z)[token], T = 1 and unfiltered: the quantity when T = 1. Its
        `sample_logprobs` are of the distribution actually sampled, after top-k / top-p: the quantity when
        nothing is filtered. A bf16 update computes its own under autocast while the rollout runs in fp32;
        the gap (bf16 rounding) would read as a policy change, so bf16 always recomputes.
        """
        r = self.cfg.rollout
        if self.cfg.precision != "fp32":
            return None, None
        if r.temperature == 1.0:
            return sample.logprobs.cpu(), sample.entropies.cpu()
        if r.top_k == 0 and r.top_p == 1.0:
            return sample.sample_logprobs.cpu(), sample.entropies.cpu()
        return None, None

    @staticmethod
    def rollout_metrics(seen: list[Response], kept: list[Response]) -> dict:
        lengths = torch.tensor([len(r.token_ids) for r in seen], dtype=torch.float)
        return {
            "reward/mean": sum(r.reward for r in seen) / len(seen),
            "acc/mean": sum(r.correct for r in seen) / len(seen),
            "response_len/mean": lengths.mean().item(),
            "response_len/max": lengths.max().item(),
            "response_len/clip_frac": sum(r.truncated for r in seen) / len(seen),
            "gen/kept_frac": len(kept) / len(seen),
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
            per_sequence = chunked_forward(model, chunks, stats, num_sequences=len(batch))
        per_response = self.response_space(batch, per_sequence)
        return [v[:, 0] for v in per_response], [v[:, 1] for v in per_response]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def select(self, entropy: torch.Tensor, mask: torch.Tensor, generator) -> torch.Tensor:
        s, size = self.cfg.select, self.cfg.chunkflow.micro_batch_size
        if s.scope == "micro":
            parts = [select_tokens(e, m, s.mode, s.ratio, generator)
                     for e, m in zip(entropy.split(size), mask.split(size), strict=True)]
            return torch.cat(parts)
        group = self.group if s.scope == "global" else None
        return select_tokens_global([entropy], [mask], s.mode, s.ratio, generator, group)[0]

    def update(self, batch: list[Response], old_logprobs: list[torch.Tensor] | None,
               entropies: list[torch.Tensor] | None, index: int) -> dict:
        """One optimizer update on a mini-batch (see `accumulate_gradients`), with gradient clipping."""
        metrics = self.accumulate_gradients(batch, old_logprobs, entropies, index)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip or math.inf)
        metrics.update(grad_norm=grad_norm.item(), lr=self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def accumulate_gradients(self, batch: list[Response], old_logprobs: list[torch.Tensor] | None = None,
                             entropies: list[torch.Tensor] | None = None, index: int = 0) -> dict:
        """Policy-loss gradients of a mini-batch into .grad; returns its metrics.

        old_logprobs: per response [R], log π_old(token) at the rollout temperature. None means on-policy
        (the weights still are the ones that sampled the batch): π_old = π_θ, so the gradient pass's own
        log-probs, detached, stand for it and every ratio is exactly 1 (as verl does on-policy).
        entropies: per response [R], the current policy's entropies at the rollout temperature, which rank
        the tokens; None: a no-grad forward computes them. index: the mini-batch's place in the step (seeds
        random selection).

        The gradient pass runs the LM head only on the loss's tokens (w ≠ 0, the selected ones): every other
        token adds w · ℓ = 0 to the loss and nothing to the gradient.
        """
        cfg = self.cfg
        if entropies is None:
            entropies = self.response_statistics(self.model, batch)[1]
        mask = pad_sequence([torch.ones(len(r.token_ids), dtype=torch.bool) for r in batch], batch_first=True)
        entropy = pad_sequence(entropies, batch_first=True)  # [B, R]
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.step * 131 + index)
        selected = self.select(entropy, mask, generator)  # [B, R]
        weights, normaliser = loss_weights(selected, mask, cfg.algo.loss_agg, cfg.select.denominator,
                                           norm_length=cfg.rollout.max_new_tokens,
                                           group=self.group if cfg.select.scope == "global" else None)
        lengths = [len(r.token_ids) for r in batch]
        fields = {"advantages": [torch.full((n,), r.advantage) for r, n in zip(batch, lengths, strict=True)]}
        if old_logprobs is not None:
            fields["old_logprobs"] = old_logprobs
        if self.reference is not None:
            rows = [row[:n] for row, n in zip(selected, lengths, strict=True)]
            fields["ref_logprobs"] = self.response_statistics(self.reference, batch, rows)[0]
        sequences = self.sequences(batch)
        chunks = cfg.chunkflow.build(
            sequences, loss_weights=self.token_space(batch, [w[:n] for w, n in zip(weights, lengths, strict=True)]),
            token_fields={name: self.token_space(batch, values) for name, values in fields.items()},
        )
        totals = {"stats": None, "clipped": []}

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
            )
            totals["stats"] = result.stats if totals["stats"] is None else totals["stats"] + result.stats
            clipped = torch.zeros(len(chunk), dtype=torch.bool)
            clipped[at] = result.clipped.detach().cpu()
            totals["clipped"].append((chunk, clipped))
            return result.loss_sum

        self.model.train()
        with self.autocast():
            loss = chunked_backward(self.model, chunks, keep=cfg.chunkflow.keep, loss_fn=loss_fn,
                                    normalizer=float(normaliser))
        stats: PolicyLossStats = totals["stats"]
        check_loss_saw_selection(cfg.select.mode, int(selected.sum()), int(stats.tokens))
        clipped = self.response_space(batch, unchunk(totals["clipped"], [len(s) for s in sequences]))
        return {"pg/loss": loss, **stats.metrics(),
                **selection_metrics(entropy, mask, selected, pad_sequence(clipped, batch_first=True))}

    def sampling_policy_statistics(self, batch: list[Response], later_updates: bool
                                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Per response [R]: log-probs and entropies at the rollout temperature of the policy that sampled
        the batch (the weights before this step's first update). The rollout's own when they are what the
        update computes; else a no-grad forward, if later mini-batches need old log-probs; else None."""
        if all(r.rollout_logprobs is not None for r in batch):
            return [r.rollout_logprobs for r in batch], [r.rollout_entropies for r in batch]
        return self.response_statistics(self.model, batch) if later_updates else None

    # --------------------------------------------------------------------------------------------- loop

    def train_step(self, pool: VerifierPool) -> dict:
        cfg, times = self.cfg, {"gen": 0.0, "reward": 0.0}
        began = time.perf_counter()
        batch, record = self.generate_batch(pool, times)
        scores = torch.tensor([r.reward for r in batch])
        groups = torch.tensor([r.group for r in batch])
        advantages = advantage_estimator(cfg.algo.advantage)
        kwargs = {"normalize_by_std": cfg.algo.norm_by_std} if cfg.algo.advantage == "grpo" else {}
        for r, a in zip(batch, advantages(scores, groups, **kwargs).tolist(), strict=True):
            r.advantage = a
        update_began = time.perf_counter()
        per_update = cfg.mini_batch_prompts * cfg.rollout.n
        minis = [batch[i : i + per_update] for i in range(0, len(batch), per_update)]
        sampled = self.sampling_policy_statistics(batch, later_updates=len(minis) > 1)
        updates = []
        for i, mini in enumerate(minis):
            part = slice(i * per_update, (i + 1) * per_update)
            # the first update starts from the sampling weights: on-policy, ranked by the sampler's entropies
            # when known; later ones need π_old and rank by their own (moved) policy's entropies
            old = None if i == 0 else sampled[0][part]
            entropies = sampled[1][part] if i == 0 and sampled is not None else None
            updates.append(self.update(mini, old, entropies, i))
        for key in updates[0]:
            record[key] = sum(u[key] for u in updates) / len(updates)
        now = time.perf_counter()
        tokens = sum(len(r.prompt_ids) + len(r.token_ids) for r in batch)
        record.update({
            "time/gen_s": times["gen"], "time/reward_s": times["reward"], "time/update_s": now - update_began,
            "time/step_s": now - began, "tokens_per_s": tokens / (now - began),
        })
        return record

    def save(self) -> None:
        if self.rank == 0:
            self.last_checkpoint = save_checkpoint(
                self.out, self.step, self.model, self.tokenizer, self.optimizer, self.scheduler,
                config=lambda path: save_config(self.cfg, path / "rl.yaml"),
                extra={"data_state.json": json.dumps({"cursor": self.stream.cursor})},
            )
        if self.world > 1:
            dist.barrier()

    def train(self) -> Path | None:
        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        log = MetricsLog(self.out, self.step, cfg.tensorboard) if self.rank == 0 else contextlib.nullcontext()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="rl", dynamic_ncols=True,
                   disable=not (cfg.progress and self.rank == 0))
        with VerifierPool(cfg.reward.workers, cfg.reward.timeout_s) as pool, bar, log:
            while self.step < cfg.steps:
                record = {"step": self.step + 1, **self.train_step(pool)}
                self.step += 1
                if cfg.eval.files and cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                    record.update(self.evaluate(pool))
                if self.rank == 0:
                    log.write(record)
                bar.update()
                bar.set_postfix(reward=f"{record['reward/mean']:.3f}", acc=f"{record['acc/mean']:.3f}",
                                kept=f"{record['select/kept_frac']:.2f}")
                if self.step == cfg.steps or cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        return self.last_checkpoint

    def evaluate(self, pool: VerifierPool) -> dict:
        return evaluate_run(self.cfg, self.model, self.tokenizer, pool)


def evaluate_run(cfg: RLConfig, model, tokenizer, pool: VerifierPool) -> dict:
    """`eval/<file>/...` metrics of `model` on cfg.eval.files, with the run's prompt format, response length,
    verifier and scores (what the trainer logs every eval.every steps)."""
    model.eval()
    d = cfg.data
    return evaluate_files(model, tokenizer, cfg.eval, pool, resolve_verifier(cfg.reward.verifier),
                          cfg.reward.values(), chat=d.chat, enable_thinking=d.enable_thinking,
                          template=None if d.chat else d.template, max_prompt_tokens=d.max_prompt_tokens,
                          max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed)


def main(argv: list[str]) -> int:
    return run_training_command("forkflow train", __doc__.split("\n")[0], RLConfig,
                                lambda cfg: RLTrainer(cfg).train(), "configs/rl_tiny.yaml", argv)
