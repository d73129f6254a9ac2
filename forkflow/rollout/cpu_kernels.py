"""forkflow's decoding kernels for CPU (`cpu_kernels.c`): the fp32 matmuls and attention of the decoding steps
and the pass over each chunk of logits of plain sampling, compiled with the system's C compiler on first use
for this machine (`-O3 -march=native`) into a cache directory and loaded with ctypes.

At decoding's batches oneDNN's fp32 matmuls ran at about half of a core's multiply-add peak in a profile (an
AMD EPYC Zen 3 with AVX2: 49 of ~95 GFLOP/s for 16 rows against Qwen3's LM head on one thread), short of what
the weight stream allows; the kernel reads each weight once per call and keeps the batch in cache
(`benchmarks/bench_generate.py` measures the steps, `test_rollout.py` the products against float64). It needs
no build step and no dependency: where no compiler is found, or it fails, a warning says so once and decoding
stays on torch's ops (the weights on oneDNN: `weights.Projection`; attention on SDPA: `engine.decode`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
OPS = {"none": 0, "add": 1, "mul": 2}
ROWS = 6  # weight rows per packed group (R in cpu_kernels.c)


def cache_dir() -> Path:
    """Where the compiled kernel lives: $FORKFLOW_CACHE, else $XDG_CACHE_HOME/forkflow, else ~/.cache/forkflow."""
    if os.environ.get("FORKFLOW_CACHE"):
        return Path(os.environ["FORKFLOW_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forkflow"


def compile_command(compiler: str, output: Path) -> list[str]:
    return [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(output)]


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built once per (source, compiler, machine), or None with a warning on stderr."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return _unavailable("no C compiler found (set CC to one)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        return _unavailable(f"{compiler} --version failed: {error}")
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + _machine().encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                result = subprocess.run(compile_command(compiler, built), capture_output=True, text=True)
                if result.returncode != 0:
                    return _unavailable(f"compiling {SOURCE.name} failed:\n{result.stderr.strip()}")
                built.replace(target)  # atomic: ranks compiling at once each install a whole file
        except OSError as error:
            return _unavailable(f"cannot write the compiled kernel under {target.parent} ({error}); set "
                                f"FORKFLOW_CACHE to a writable directory")  # fmt: skip
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as error:
        return _unavailable(f"cannot load {target} ({error}); delete it to compile it again")
    lib.ff_block_softmax.restype = None
    lib.ff_block_softmax.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_int]
    lib.ff_decode_attention.restype = None
    lib.ff_decode_attention.argtypes = [*[ctypes.c_void_p, ctypes.c_int64] * 3, *[ctypes.c_void_p] * 4,
                                        *[ctypes.c_int64] * 5, ctypes.c_float, ctypes.c_int]  # fmt: skip
    lib.ff_matmul.restype = ctypes.c_int
    lib.ff_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]  # fmt: skip
    return lib


def _machine() -> str:
    """What -march=native compiles for: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability()
    return next((line for line in info.splitlines() if line.startswith("flags")), info[:4096])


def _unavailable(reason: str) -> None:
    print(f"warning: forkflow's CPU decoding kernel is unavailable, decoding uses oneDNN's matmuls and SDPA: "
          f"{reason}", file=sys.stderr)  # fmt: skip
    return None


def available() -> bool:
    return sys.platform.startswith("linux") and library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] fp32 -> the kernel's layout [ceil(N / ROWS), K, ROWS] (see cpu_kernels.c), a copy."""
    N, K = weight.shape
    padded = torch.nn.functional.pad(weight.detach().float(), (0, 0, 0, -N % ROWS))
    return padded.view(-1, ROWS, K).transpose(1, 2).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, rows: int, threads: int, op: str = "none",
           other: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32 · weightᵀ -> [..., rows] fp32, weight [rows, K] given `pack`ed, then + other or
    · other (op "add" / "mul", other of the output's shape), on `threads` threads."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], rows, dtype=torch.float32)
    if x2.shape[0] == 0:
        return out.view(*lead, rows)
    ldo = 0
    if other is not None:
        if other.shape[:-1] != lead or other.shape[-1] != rows:
            raise ValueError(f"cpu_kernels.matmul: other has shape {tuple(other.shape)}, the product "
                             f"{(*lead, rows)}")  # fmt: skip
        other = other.reshape(-1, rows)
        if other.stride(-1) != 1:
            other = other.contiguous()
        ldo = other.stride(0)
    status = library().ff_matmul(
        x2.data_ptr(), x2.stride(0), packed.data_ptr(), out.data_ptr(), rows,
        0 if other is None else other.data_ptr(), ldo, x2.shape[0], K, rows, OPS[op], threads,
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"cpu_kernels.matmul: out of memory for a [{x2.shape[0]}, {K}] batch")
    return out.view(*lead, rows)


def block_softmax(z: torch.Tensor, running_max: torch.Tensor, floor: float, threads: int):
    """One chunk's pass of `sampling.sample_plain`: logits z [B, k, block] fp32 (contiguous, overwritten; block a
    multiple of 8) and each row's maximum so far [B] -> (M' = max(running_max, max z) [B],
    e = exp(max(z - M', floor)) [B, k, block] (z itself), block masses e.sum(-1) [B, k], Σ e · y over the
    chunk [B], y = max(z - M', floor))."""
    B, k, block = z.shape
    new_max, masses, dot = z.new_empty(B), z.new_empty(B, k), z.new_empty(B)
    running_max = running_max.contiguous()
    library().ff_block_softmax(z.data_ptr(), running_max.data_ptr(), new_max.data_ptr(), masses.data_ptr(),
                               dot.data_ptr(), B, k, block, floor, threads)  # fmt: skip
    return new_max, z, masses, dot


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     lengths: torch.Tensor, scale: float, threads: int) -> torch.Tensor:
    """One decoding step's attention, one token per row: its new keys and values k, v [B, KV, D] fp32 are
    written into the cache keys, values [slots >= B, KV, capacity, D] (contiguous, row b in slot b) at column
    lengths[b] - 1 (lengths [B] int64, 1 <= length <= capacity), then q [B, heads, D] attends over each row's
    first lengths[b] columns -> [B, heads · D], query head i on key/value head i // (heads / KV). D a multiple
    of 8."""
    B, heads, D = q.shape
    _, KV, capacity, _ = keys.shape
    q, k, v = (t if t.stride(2) == 1 and t.stride(1) == D else t.contiguous() for t in (q, k, v))
    out = q.new_empty(B, heads * D)
    lengths = lengths.contiguous()
    library().ff_decode_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                  keys.data_ptr(), values.data_ptr(), lengths.data_ptr(), out.data_ptr(), B, KV,
                                  heads // KV, D, capacity, scale, threads)  # fmt: skip
    return out
