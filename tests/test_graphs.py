"""CUDA graphs of the MoE layer (moekit.cuda_graphed): replays equal eager runs, forward and backward, and bad
input is refused with a clear error. The replay tests need a GPU and skip without one."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import moekit

from .helpers import max_err, run_fwd_bwd

HAS_CUDA = torch.cuda.is_available()
needs_cuda_triton = pytest.mark.skipif(not (HAS_CUDA and importlib.util.find_spec("triton")),
                                       reason="needs a CUDA device and Triton")


def _layer(backend: str = "triton") -> moekit.MoE:
    torch.manual_seed(0)
    return moekit.MoE(d_model=32, d_ff=48, num_experts=8, top_k=2, backend=backend)


def test_cpu_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors.*call the module directly"):
        moekit.cuda_graphed(_layer("fused"), torch.randn(4, 32))
    with pytest.raises(TypeError, match="sample input tensor"):
        moekit.cuda_graphed(_layer("fused"), [torch.randn(4, 32)])


@needs_cuda_triton
class TestCUDA:
    def test_inference_replay_equals_eager(self):
        layer = _layer().cuda().eval()
        x = torch.randn(2, 5, 32, device="cuda")
        graphed = moekit.cuda_graphed(layer, x)
        for seed in range(3):  # new inputs are copied in; routing follows them
            xi = torch.randn(2, 5, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            with torch.no_grad():
                ref = layer(xi)
            y = graphed(xi)
            assert y.shape == ref.shape and max_err(y, ref) == 0.0

    def test_other_shapes_are_refused(self):
        graphed = moekit.cuda_graphed(_layer().cuda().eval(), torch.randn(4, 32, device="cuda"))
        with pytest.raises(ValueError, match=r"captured for input \(4, 32\).*got \(5, 32\)"):
            graphed(torch.randn(5, 32, device="cuda"))

    def test_training_replay_equals_eager(self):
        eager = _layer().cuda().train()
        layer = copy.deepcopy(eager)
        x = torch.randn(24, 32, device="cuda")
        moekit.cuda_graphed(layer, x.clone().requires_grad_(True), backward=True)
        y, dx, g = run_fwd_bwd(layer, x)
        y_ref, dx_ref, g_ref = run_fwd_bwd(eager, x)
        assert max_err(y, y_ref) < 1e-5 and max_err(dx, dx_ref) < 1e-5
        assert set(g) == set(g_ref)
        for k in g:
            assert max_err(g[k], g_ref[k]) < 1e-5, k
