"""fastprune.prune against torch.nn.utils.prune with CUDA parameters, and
torch.compile of a pruned model on CUDA.

The differential cases are test_prune_reference.py's, run on modules moved to
the GPU: all of them except those whose steps make tensors of their own
(importance scores, custom masks), which are made on the CPU there. Then
tie-free tensors of many CUDA tiles, where the kernels' multi-block paths run.
Skipped without a GPU.
"""
import pytest
import torch
import torch.nn as nn

from conftest import FAST, REF, example_input, fill_tie_free, make_net
from test_prune_reference import GLOBAL, SEQUENCES, SINGLE, check_forward_backward, conv_channels, forward, \
    run_both, stale_update
from test_serialization import check_compiled_backward_and_reprune, pruned

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAKES_CPU_TENSORS = ("importance", "custom")


def on_cuda(make):
    return lambda: make().cuda()


def cuda_cases(cases):
    """(name, ...) cases whose names say they make no CPU tensors of their own."""
    return {c[0]: c[1:] for c in cases if not any(w in c[0] for w in MAKES_CPU_TENSORS)}


@pytest.fixture(autouse=True)
def deterministic_cudnn():
    """Gradients are compared bit for bit: no nondeterministic cuDNN algorithms."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


SINGLE_CUDA = cuda_cases(SINGLE)
SEQUENCES_CUDA = cuda_cases(list(SEQUENCES.items()))
GLOBAL_CUDA = cuda_cases(list(GLOBAL.items()))


@pytest.mark.parametrize("name", list(SINGLE_CUDA))
def test_single_prune_matches_reference(name):
    make, call = SINGLE_CUDA[name]
    m_ref, m_fast, _ = run_both(on_cuda(make), call)
    assert all(b.is_cuda for b in m_fast.buffers())
    check_forward_backward(m_ref, m_fast)


@pytest.mark.parametrize("between", [None, forward, stale_update], ids=["plain", "forward", "stale"])
@pytest.mark.parametrize("name", list(SEQUENCES_CUDA))
def test_iterative_pruning_matches_reference(name, between):
    (steps,) = SEQUENCES_CUDA[name]
    m_ref, m_fast, _ = run_both(on_cuda(conv_channels(0)), *steps, between=between)
    check_forward_backward(m_ref, m_fast)


@pytest.mark.parametrize("name", list(GLOBAL_CUDA))
def test_global_unstructured_matches_reference(name):
    (steps,) = GLOBAL_CUDA[name]
    m_ref, m_fast, _ = run_both(on_cuda(make_net), *steps, between=forward)
    check_forward_backward(m_ref, m_fast)


def big_model():
    """Three Linear layers, 2.1e6 tie-free weights in all: hundreds of tiles."""
    return fill_tie_free(nn.Sequential(nn.Linear(1000, 1500), nn.ReLU(), nn.Linear(1500, 400), nn.Linear(400, 10)))


def big_params(m):
    return [(m[0], "weight"), (m[2], "weight"), (m[0], "bias"), (m[3], "weight")]


def test_many_tiles_match_reference():
    """Per-tensor and global prunes, iterated, over tensors of many tiles."""
    run_both(on_cuda(big_model),
             lambda P, m: P.l1_unstructured(m[0], "weight", 0.37),
             lambda P, m: P.l1_unstructured(m[0], "weight", 0.5),
             lambda P, m: P.global_unstructured(big_params(m), P.L1Unstructured, amount=0.6),
             lambda P, m: P.global_unstructured(big_params(m), P.RandomUnstructured, amount=1000),
             between=lambda m, i: m(torch.ones(3, 1000, device="cuda")))


def test_torch_compile_of_pruned_model():
    check_compiled_backward_and_reprune("cuda")


def test_inductor_compile_of_pruned_model_and_op():
    """The default backend (inductor, Triton kernels): the model's output as
    the reference's to rounding (fusions may reorder it); the op's mask inside
    a compiled function bit for bit."""
    torch._dynamo.reset()
    fast, ref = pruned(FAST, "mixed", device="cuda"), pruned(REF, "mixed", device="cuda")
    x = example_input(fast)
    torch.testing.assert_close(torch.compile(fast)(x), ref(x))

    def f(scores, mask):
        return torch.ops.fastprune.unstructured_mask(scores, mask, -1, 0.5, True, False) * scores

    scores = fast.fc.weight_orig.detach()
    mask = fast.fc.weight_mask
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(scores, mask), f(scores, mask), rtol=0, atol=0)
