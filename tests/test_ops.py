"""The chunked log-prob/entropy op against the naive full-logits computation, and its memory bound."""

import weakref

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from forkflow.ops import log_normalizer_and_entropy, token_logprobs_and_entropy


def naive(hidden, weight, targets, temperature):
    logp = torch.log_softmax((hidden @ weight.t()).double() / temperature, dim=-1)  # [..., V]
    logprobs = logp.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    vocab=st.integers(2, 50),
    chunk=st.integers(1, 17),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    seed=st.integers(0, 2**16),
)
@example(rows=5, vocab=30, chunk=8, temperature=0.6, seed=1)  # one chunk: the backward reuses the forward's log p
@example(rows=40, vocab=30, chunk=7, temperature=1.7, seed=2)  # several: the backward recomputes each chunk
def test_chunked_equals_naive_values_and_gradients(rows, vocab, chunk, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 8, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)

    logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, temperature, chunk_size=chunk)
    want_logprobs, want_entropy = naive(hidden, weight, targets, temperature)
    assert logprobs.dtype == entropy.dtype == torch.float64
    assert torch.allclose(logprobs, want_logprobs, atol=1e-12)
    assert torch.allclose(entropy, want_entropy, atol=1e-12)
    assert (entropy >= 0).all()

    upstream_h = torch.randn(rows, generator=g, dtype=torch.float64)
    for loss, want_loss in (  # log-probs alone (the policy loss), entropy alone, both (an entropy bonus)
        ((logprobs * upstream).sum(), (want_logprobs * upstream).sum()),
        ((entropy * upstream_h).sum(), (want_entropy * upstream_h).sum()),
        ((logprobs * upstream + entropy * upstream_h).sum(),
         (want_logprobs * upstream + want_entropy * upstream_h).sum()),
    ):
        grads = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
        want = torch.autograd.grad(want_loss, (hidden, weight), retain_graph=True)
        for got, expected in zip(grads, want, strict=True):
            assert torch.allclose(got, expected, atol=1e-10)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows,chunk,backward_matmuls", [(12, 16, 2), (12, 4, 3 * 3)])
def test_a_single_chunk_backward_reuses_the_forward_log_probs(rows, chunk, backward_matmuls):
    """One chunk: the backward takes the forward's log-probabilities and runs only the two gradient
    matmuls; several: each chunk's logits are recomputed first (three per chunk)."""
    hidden = torch.randn(rows, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    logprobs, _ = token_logprobs_and_entropy(hidden, weight, torch.randint(0, 20, (rows,)), chunk_size=chunk)
    with CountMatmuls() as matmuls:
        logprobs.sum().backward()
    assert matmuls.count == backward_matmuls


def test_batched_shape_and_weight_without_grad():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # a frozen LM head
    targets = torch.randint(0, 11, (2, 5))
    logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=3)
    assert logprobs.shape == entropy.shape == (2, 5)
    logprobs.sum().backward()
    want_hidden = hidden.detach().clone().requires_grad_()
    naive(want_hidden, weight, targets, 1.0)[0].sum().backward()
    assert torch.allclose(hidden.grad.double(), want_hidden.grad.double(), atol=1e-5)


def test_bfloat16_inputs_match_fp32_closely():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g) * 0.2
    targets = torch.randint(0, 40, (6,), generator=g)
    low = token_logprobs_and_entropy(hidden.bfloat16(), weight.bfloat16(), targets)
    high = token_logprobs_and_entropy(hidden, weight, targets)
    for a, b in zip(low, high, strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=0.1)


def test_entropy_vanishes_for_a_peaked_row():
    logits = torch.tensor([[0.0, 80.0, 0.0], [1.0, 1.0, 1.0]])
    lse, entropy = log_normalizer_and_entropy(logits)
    assert 0 <= entropy[0] < 1e-30 and abs(entropy[1] - torch.log(torch.tensor(3.0))) < 1e-6
    assert torch.allclose(lse, torch.logsumexp(logits, -1))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(
            torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), 0.0
        )
    with pytest.raises(ValueError, match="disagree"):
        token_logprobs_and_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long))


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the mode and still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def _free(self, ptr, nbytes):
        self.storages.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and ptr not in self.storages:
                    self.storages.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr, nbytes)
        return out


def peak_bytes(step, rows, vocab=1024, hidden_size=16):
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    with PeakMemory() as memory:
        step(hidden, weight, targets).sum().backward()
    return memory.peak


def chunked(hidden, weight, targets):
    return token_logprobs_and_entropy(hidden, weight, targets, chunk_size=64)[0]


def full_logits(hidden, weight, targets):
    return torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None])


def test_peak_memory_is_bounded_by_the_chunk_not_the_sequence():
    vocab, small, large = 1024, 256, 2048
    logits_row = vocab * 4  # bytes of one fp32 row of logits
    chunked_small, chunked_large = peak_bytes(chunked, small), peak_bytes(chunked, large)
    naive_large = peak_bytes(full_logits, large)
    assert naive_large > large * logits_row  # the reference holds [T, V] logits
    # the chunked op's peak grows by O(T · H) (outputs, grad of hidden), far less than a logits row per token
    assert (chunked_large - chunked_small) / (large - small) < logits_row / 8
    assert chunked_large < naive_large / 8
