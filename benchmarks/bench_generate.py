"""Generation speed in RLVR's sampling setting (temperature 1, top-k off, top-p 1) on CPU, side by side:
forkflow's torch backend (fp32; bf16 weights loaded into `TorchBackend.empty`, as a bf16 rollout gets them),
transformers' `generate` (fp32), and vLLM through forkflow's `VLLMBackend` (fp32 / bf16 x eager / compiled),
all loading one random Qwen3 checkpoint that transformers saved; each against the time the matmuls of the
same decoding steps take alone.

    .venv/bin/python benchmarks/bench_generate.py                        # both shapes, every system
    .venv/bin/python benchmarks/bench_generate.py --shapes tiny --systems forkflow-fp32,vllm-fp32-eager

Checkpoints (Qwen3's vocabulary of 151,936, tied embeddings):
  tiny  hidden 256, 4 layers, 4 query / 2 KV heads of 64, MLP 768
  0.6b  Qwen3-0.6B's shape: hidden 1024, 28 layers, 16 query / 8 KV heads of 128, MLP 3072

Workloads (sizes per shape in WORK; no stop tokens: every response is exactly as long as asked, checked):
  fixed  16 prompts of 16-64 random tokens, n = 1, N new tokens each, timed at N1 and N2: the marginal
         cost per token, (t(N2) - t(N1)) / (16 (N2 - N1)), leaves out the prefill and per-call overheads.
  grpo   P prompts (16-64 random tokens) x G = 8 samples. Each sample's length is drawn from a lognormal (a
         long tail) and rounded to a power of two within bounds; the samples of one length go in one call
         (their prompts repeated, n = 1, max_new_tokens = that length), since forkflow's and vLLM's backends
         take one max_new_tokens per call, and every system gets the same calls. The calls are timed as
         drawn and cut to 1 new token (prefills and per-call overheads alone): the difference over the
         tokens decoded after the first is the marginal cost per token at the batches of the length mix.
         A length's call runs at its own batch size throughout, so the tail's small batches weigh somewhat
         more than in one call whose rows stop at their own lengths.

Timing: engines are built once (start-up times are reported apart) and warmed up with a short call; then
`--repeats` rounds in which the systems of a process (below) take turns on each measurement, in an order
rotated per round, so that they see the same load on a shared host; each measurement's best time is kept.

Roofline: the matmuls of one decoding step at the workload's batch (per layer q, k, v, o, gate, up and
down projections, then the LM head over the vocabulary), timed alone on forkflow's fp32 and bf16 weights in
the same rounds, each way available on this CPU, the fastest kept: every nn.Linear with F.linear (fp32 on
MKL, bf16 on oneDNN with unpacked weights), and the fused products forkflow's decoding uses
(`DecodeWeights`) in each of its CPU layouts: prepacked for oneDNN (vLLM prepacks its projections for
oneDNN the same way) and, for fp32, forkflow's own kernel (`cpu_kernels`). A system's fraction is
roofline time per token / its time per token, with the roofline of its own dtype (transformers: fp32),
timed in the same process. It is the fastest matmuls at hand, not the machine's peak.

Threads: `--threads` torch threads (default 2) for every system. vLLM runs in-process (forkflow's
backend turns V1 multiprocessing off), where it binds no OpenMP threads of its own (VLLM_CPU_OMP_THREADS_BIND
only applies to its worker processes): its kernels use torch's thread pool as set before the engine starts,
and the engine replaces `torch.set_num_threads` with a no-op. OMP_WAIT_POLICY defaults to PASSIVE here: on
a host whose cores other processes also use, OpenMP threads that spin at each barrier while their partner
waits for a core made 2-thread steps up to 10x slower (a 0.6b step's matmuls: 5 s instead of 0.8 s).
Processes: the systems of each dtype (fp32: forkflow, transformers, vLLM fp32; bf16: forkflow, vLLM bf16)
run in a spawned process of their own per shape, all their models in memory at once, and take turns there;
all seven at once would hold about 20 GB for 0.6b. Comparisons across dtypes (bf16 against transformers,
or a best of one dtype against the other's) are therefore between processes run one after the other.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
import transformers

from forkflow.models import from_pretrained
from forkflow.rollout import SamplingParams, TorchBackend
from forkflow.rollout.weights import DecodeWeights, layout_of

VOCAB, CONTEXT, BATCH, GROUP = 151936, 1024, 16, 8
SHAPES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=768),
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072),
}  # fmt: skip
# fixed: (N1, N2) new tokens; grpo: prompts, median response length, (shortest, longest) response length
WORK = {
    "tiny": dict(fixed=(8, 40), prompts=4, median=12, lengths=(4, 64)),
    "0.6b": dict(fixed=(4, 36), prompts=2, median=8, lengths=(4, 32)),
}
VLLM_SYSTEMS = [f"vllm-{d}-{m}" for d in ("fp32", "bf16") for m in ("eager", "compiled")]
SYSTEMS = ["forkflow-fp32", "forkflow-bf16", "transformers", *VLLM_SYSTEMS]
VLLM_BLOCK = 128  # vLLM's KV-cache block on CPU: a request holds whole blocks


def save_checkpoint(shape: str, directory: str) -> None:
    """A random Qwen3 of `shape`, saved by transformers (no EOS token: nothing stops a response early)."""
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, max_position_embeddings=CONTEXT, tie_word_embeddings=True, rope_theta=1e6,
        eos_token_id=None, bos_token_id=None, **SHAPES[shape],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory)


def random_prompts(count: int, g: torch.Generator) -> list[list[int]]:
    lengths = torch.randint(16, 65, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def workload(shape: str) -> dict[str, list[tuple[list[list[int]], int]]]:
    """The calls (prompts, new tokens) of each measurement: fixed-length at N1 and N2, and the grpo set."""
    work, g = WORK[shape], torch.Generator().manual_seed(0)
    fixed = random_prompts(BATCH, g)
    prompts = random_prompts(work["prompts"], g)
    drawn = torch.empty(len(prompts) * GROUP).log_normal_(math.log(work["median"]), 1.0, generator=g)
    shortest, longest = work["lengths"]
    lengths = [min(max(2 ** round(math.log2(x)), shortest), longest) for x in drawn.tolist()]
    by_length = defaultdict(list)
    for i, length in enumerate(lengths):
        by_length[length].append(prompts[i // GROUP])
    n1, n2 = work["fixed"]
    grpo = [(by_length[n], n) for n in sorted(by_length)]
    return {"fixed_n1": [(fixed, n1)], "fixed_n2": [(fixed, n2)], "grpo_1": [(p, 1) for p, _ in grpo], "grpo": grpo}


def check(lengths: list[int], new_tokens: int, system: str) -> None:
    if set(lengths) != {new_tokens}:
        raise RuntimeError(f"{system}: response lengths {sorted(set(lengths))}, asked for exactly {new_tokens}")


def forkflow_api_runner(backend, system: str):
    """A `RolloutBackend` (forkflow's torch backend or VLLMBackend) at RLVR's sampling settings; the torch
    backend's T = 1 log-probs and entropies are checked to be sane (finite, <= 0, within [0, log V])."""

    def run(prompts, new_tokens):
        params = SamplingParams(n=1, max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=0)
        samples = [s for group in backend.generate(prompts, params, prompt_keys=None) for s in group]
        check([len(s.token_ids) for s in samples], new_tokens, system)
        if samples[0].logprobs is not None:
            logprobs, entropies = torch.cat([s.logprobs for s in samples]), torch.cat([s.entropies for s in samples])
            if not (logprobs.isfinite().all() and logprobs.max() <= 1e-4 and entropies.min() >= 0
                    and entropies.max() <= math.log(VOCAB) + 1e-3):  # fmt: skip
                raise RuntimeError(f"{system}: log-probs or entropies out of range: {logprobs}, {entropies}")

    return run


def transformers_runner(model):
    """transformers' `generate`: left-padded batch, sampling at T = 1 with top-k and top-p off."""

    def run(prompts, new_tokens):
        width = max(map(len, prompts))
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :], attention_mask[i, width - len(p) :] = torch.tensor(p), 1
        with torch.no_grad():
            out = model.generate(
                input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
            )  # fmt: skip
        check([out.shape[1] - width], new_tokens, "transformers")

    return run


def kv_cache_gb(config, dtype: str, calls) -> float:
    """KV-cache memory for vLLM: the largest call's requests in whole blocks, and at least one request of the
    full context (vLLM refuses to start otherwise), plus a quarter."""
    size = 4 if dtype == "fp32" else 2
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size
    blocks = max(sum(-(-(len(p) + n) // VLLM_BLOCK) for p in prompts) for prompts, n in calls)
    return round(1.25 * max(blocks * VLLM_BLOCK, CONTEXT) * per_token / 2**30 + 0.05, 2)


def dtype_of(system: str) -> str:
    return "bf16" if "bf16" in system else "fp32"


def build_systems(directory: str, dtype: str, names: list[str], calls) -> tuple[dict, dict, torch.nn.Module, list]:
    """The systems of `names` that run in `dtype`: (runner per system, start-up seconds per system, forkflow's
    model in `dtype`, whose weights the roofline times, notes)."""
    runners, startup, notes = {}, {}, []
    start = time.perf_counter()
    model = from_pretrained(directory).eval()
    startup["forkflow-fp32"] = time.perf_counter() - start
    if dtype == "bf16":  # as a bf16 rollout gets the fp32 trainer's weights
        start = time.perf_counter()
        backend = TorchBackend.empty(model.config, torch.device("cpu"), torch.bfloat16)
        backend.load_weights(model.named_parameters())
        startup["forkflow-bf16"] = time.perf_counter() - start
    else:
        backend = TorchBackend(model)
    runners[f"forkflow-{dtype}"] = forkflow_api_runner(backend, f"forkflow-{dtype}")
    if dtype == "fp32" and "transformers" in names:
        start = time.perf_counter()
        reference = transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        startup["transformers"] = time.perf_counter() - start
        runners["transformers"] = transformers_runner(reference)
    wanted = [n for n in VLLM_SYSTEMS if n in names and dtype_of(n) == dtype]
    if wanted:
        try:
            from forkflow.rollout.vllm_backend import VLLMBackend, import_vllm

            import_vllm()
        except ImportError as e:
            notes.append(f"vLLM columns skipped: {e}")
            wanted = []
    for name in wanted:
        gb = kv_cache_gb(model.config, dtype, calls)
        log(f"  starting {name} (kv_cache_gb={gb})")
        start = time.perf_counter()
        try:
            compiled = name.endswith("compiled")
            engine = VLLMBackend(directory, model.config, dtype=dtype, kv_cache_gb=gb, seed=0, compile=compiled)
        except Exception as e:  # one engine that fails to start should not cost the other columns
            notes.append(f"{name} skipped, its engine failed to start: {type(e).__name__}: {e}")
            continue
        startup[name] = time.perf_counter() - start
        runners[name] = forkflow_api_runner(engine, name)
    runners = {n: runners[n] for n in SYSTEMS if n in names and n in runners}
    return runners, {n: startup[n] for n in runners}, backend.model, notes


@torch.no_grad()
def gemm_seconds(model, batch: int, repeats: int = 3) -> float:
    """Best time of one decoding step's matmuls alone at `batch` rows, done each way, the fastest taken: every
    nn.Linear of the model (the projections of each layer, then the LM head) applied with F.linear, and the
    products forkflow's decoding weights hold (q/k/v fused, the head in chunks) in each CPU layout
    (`weights.Projection`: forkflow's kernel where it compiles, prepacked for oneDNN), to random inputs of
    the weights' dtype."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]).to(w.dtype) for w in weights}
    ways = [[(lambda w=w: F.linear(inputs[w.shape[1]], w)) for w in weights]]
    layouts = {layout_of(model.lm_head.weight)}
    if model.lm_head.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        layouts.add("onednn")
    for layout in layouts - {"plain"}:
        decoding = DecodeWeights(model, layout)
        fused = [p for layer in decoding.layers for p in (layer.qkv, layer.o, layer.gate, layer.up, layer.down)]
        fused += [p for _, p in decoding.head.chunks]
        ways.append([(lambda p=p: p(inputs[p.shape[1]])) for p in fused])
    best = math.inf
    for _ in range(repeats):
        for products in ways:
            start = time.perf_counter()
            for product in products:
                product()
            best = min(best, time.perf_counter() - start)
    return best


def measure(runners: dict, parts: dict, roofline_model, repeats: int) -> tuple[dict, dict]:
    """Best seconds of every (system, measurement), and of the roofline at every batch a call runs at."""
    for name, run in runners.items():  # first-call costs (lazy initialisation, allocations)
        log(f"  warm-up {name}")
        run(parts["fixed_n1"][0][0][:4], 2)
    batches = sorted({len(prompts) for calls in parts.values() for prompts, _ in calls})
    times, gemm = defaultdict(lambda: defaultdict(list)), defaultdict(list)
    for r in range(repeats):
        order = list(runners)[r % len(runners) :] + list(runners)[: r % len(runners)]
        for part, calls in parts.items():
            log(f"  round {r + 1}/{repeats}: {part}")
            for name in order:
                start = time.perf_counter()
                for prompts, n in calls:
                    runners[name](prompts, n)
                times[name][part].append(time.perf_counter() - start)
        for b in batches:
            gemm[b].append(gemm_seconds(roofline_model, b))
    return {s: {p: min(t) for p, t in parts.items()} for s, parts in times.items()}, {
        b: min(t) for b, t in gemm.items()
    }


def measure_group(shape: str, dtype: str, directory: str, names: list[str], threads: int, repeats: int) -> dict:
    """One process: the systems of one dtype on the checkpoint in `directory`, and that dtype's roofline."""
    torch.set_num_threads(threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    parts = workload(shape)
    log(f"{shape}, {dtype}: {', '.join(n for n in names if dtype_of(n) == dtype)}")
    runners, startup, model, notes = build_systems(directory, dtype, names, [c for v in parts.values() for c in v])
    seconds, gemm = measure(runners, parts, model, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return dict(threads=torch.get_num_threads(), startup=startup, seconds=seconds, gemm=gemm, notes=notes, peak=peak)


def measure_shape(shape: str, names: list[str], threads: int, repeats: int) -> dict:
    """ms per token, tokens/s, roofline fractions and start-up seconds of every system on one checkpoint shape.
    The systems of each dtype run in a spawned process of their own (with every model of the group in memory
    at once), which takes their vLLM engines and memory with it."""
    groups = {}
    with tempfile.TemporaryDirectory() as directory:
        log(f"{shape}: saving the checkpoint")
        save_checkpoint(shape, directory)
        for dtype in ("fp32", "bf16"):
            if any(dtype_of(n) == dtype for n in names):
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    job = pool.submit(measure_group, shape, dtype, directory, names, threads, repeats)
                    groups[dtype] = job.result()
    parts, (n1, n2) = workload(shape), WORK[shape]["fixed"]
    t = {s: v for g in groups.values() for s, v in g["seconds"].items()}
    samples = sum(len(prompts) for prompts, _ in parts["grpo"])
    tokens = sum(len(prompts) * n for prompts, n in parts["grpo"])
    decoded = tokens - samples  # the first token of each sample comes with its prefill (grpo_1)
    ms = {
        "fixed": {s: 1e3 * (v["fixed_n2"] - v["fixed_n1"]) / (BATCH * (n2 - n1)) for s, v in t.items()},
        "grpo": {s: 1e3 * (v["grpo"] - v["grpo_1"]) / decoded for s, v in t.items()},
    }
    roofline = {
        "fixed": {d: 1e3 * g["gemm"][BATCH] / BATCH for d, g in groups.items()},
        "grpo": {
            d: 1e3 * sum((n - 1) * g["gemm"][len(p)] for p, n in parts["grpo"]) / decoded for d, g in groups.items()
        },
    }
    result = {
        "threads": {d: g["threads"] for d, g in groups.items()},
        "peak_rss_gb": {d: round(g["peak"], 1) for d, g in groups.items()},
        "startup_s": {s: round(v, 2) for g in groups.values() for s, v in g["startup"].items()},
        "best_s": {s: {part: round(x, 3) for part, x in v.items()} for s, v in t.items()},
        "notes": [note for g in groups.values() for note in g["notes"]],
        "fixed": {"batch": BATCH, "new_tokens": [n1, n2]},
        "grpo": {"samples": samples, "tokens": tokens, "calls": {n: len(p) for p, n in parts["grpo"]}},
    }
    for w in ("fixed", "grpo"):
        result[w] |= summarize(ms[w], roofline[w])
    return result


def summarize(ms: dict[str, float], roofline: dict[str, float]) -> dict:
    """ms per token, tokens/s, roofline fractions and the two ratios (> 1: forkflow faster) of one workload."""
    frac = {s: roofline[dtype_of(s)] / v for s, v in ms.items()}
    out = {
        "ms_per_token": {s: round(v, 3) for s, v in ms.items()},
        "tokens_per_s": {s: round(1e3 / v, 1) for s, v in ms.items()},
        "roofline_ms_per_token": {d: round(v, 3) for d, v in roofline.items()},
        "roofline_fraction": {s: round(v, 3) for s, v in frac.items()},
    }
    best = {k: min((s for s in ms if s.startswith(k)), key=ms.get, default=None) for k in ("forkflow", "vllm")}
    if best["forkflow"] and best["vllm"]:
        speedup = round(ms[best["vllm"]] / ms[best["forkflow"]], 2)
        out["forkflow_vs_vllm"] = {"systems": f"{best['forkflow']} vs {best['vllm']}", "speedup": speedup}
    if best["forkflow"] and "transformers" in ms:
        speedup = round(ms["transformers"] / ms[best["forkflow"]], 2)
        out["forkflow_vs_transformers"] = {"systems": f"{best['forkflow']} vs transformers", "speedup": speedup}
    return out


def print_table(shape: str, r: dict) -> None:
    n1, n2 = r["fixed"]["new_tokens"]
    calls = ", ".join(f"{b}x{n}" for n, b in r["grpo"]["calls"].items())
    c = SHAPES[shape]
    print(
        f"\n{shape}: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
        f"{c['num_key_value_heads']} heads of {c['head_dim']}, MLP {c['intermediate_size']}, vocabulary {VOCAB}; "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    groups = ", ".join(f"{d} ({r['threads'][d]} threads, peak RSS {r['peak_rss_gb'][d]} GB)" for d in r["threads"])
    print(f"  processes: {groups}")
    print(f"  fixed: {r['fixed']['batch']} prompts x {n1} and {n2} new tokens, marginal cost per token")
    print(f"  grpo:  {r['grpo']['samples']} samples, {r['grpo']['tokens']} tokens in calls (batch x length) {calls}")
    print(f"{'':20}{'fixed ms/tok':>13}{'tok/s':>8}{'roofline':>9}{'grpo ms/tok':>13}{'tok/s':>8}{'roofline':>9}"
          f"{'start-up s':>11}")  # fmt: skip
    for s in r["fixed"]["ms_per_token"]:
        cells = "".join(
            f"{r[w]['ms_per_token'][s]:13.3f}{r[w]['tokens_per_s'][s]:8.0f}{r[w]['roofline_fraction'][s]:9.1%}"
            for w in ("fixed", "grpo")
        )
        print(f"{s:20}{cells}{r['startup_s'][s]:11.1f}")
    for d in r["fixed"]["roofline_ms_per_token"]:
        cells = "".join(
            f"{r[w]['roofline_ms_per_token'][d]:13.3f}{1e3 / r[w]['roofline_ms_per_token'][d]:8.0f}{'':9}"
            for w in ("fixed", "grpo")
        )
        print(f"{'matmul roofline ' + d:20}{cells}")
    for key, label in (("forkflow_vs_vllm", "vLLM best"), ("forkflow_vs_transformers", "transformers")):
        for w in ("fixed", "grpo"):
            if key in r[w]:
                print(f"  {w}: forkflow best vs {label}: {r[w][key]['speedup']:.2f}x ({r[w][key]['systems']})")
    for note in r["notes"]:
        print(f"  note: {note}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {SYSTEMS}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same for every system")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up; best kept")
    args = parser.parse_args()
    shapes, names = args.shapes.split(","), args.systems.split(",")
    for value, known in ((shapes, SHAPES), (names, SYSTEMS)):
        if unknown := set(value) - set(known):
            parser.error(f"unknown: {sorted(unknown)}; known: {list(known)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by each spawned process as OpenMP starts there
    results = {shape: measure_shape(shape, names, args.threads, args.repeats) for shape in shapes}
    for shape, r in results.items():
        print_table(shape, r)
    print(json.dumps({"benchmark": "generate", "device": "cpu", "threads": args.threads, "repeats": args.repeats,
                      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "shapes": results}))  # fmt: skip


if __name__ == "__main__":
    main()
