"""Bad configuration or input raises a ValueError that names the problem."""

import pytest
import torch

import moekit


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=5), "top_k=5 is larger than num_experts=4"),
    (dict(d_model=8, d_ff=16, num_experts=0, top_k=1), "num_experts must be a positive integer"),
    (dict(d_model=8, d_ff=16, num_experts=-2, top_k=1), "num_experts must be a positive integer"),
    (dict(d_model=0, d_ff=16, num_experts=4, top_k=1), "d_model must be a positive integer"),
    (dict(d_model=8, d_ff=2.5, num_experts=4, top_k=1), "d_ff must be a positive integer"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=0), "top_k must be a positive integer"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, capacity_factor=0), "capacity_factor must be > 0"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, capacity_factor=-1.5), "capacity_factor must be > 0"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, drop_policy="random"), "drop_policy must be one of"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, activation="tanh"), "unknown activation 'tanh'"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, backend="cuda_magic"), "unknown backend 'cuda_magic'"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, router="nope"), "unknown router 'nope'"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, aux_loss="l2"), "aux_loss must be one of"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, aux_loss_coef=-1), "aux_loss_coef must be a number >= 0"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, shared_experts=-1), "shared_experts must be"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, shared_expert_gate=True), "needs shared_experts >= 1"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, bias_update="sometimes"), "bias_update must be"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=2, router="switch"), "exactly one expert"),
    (dict(d_model=8, d_ff=16, num_experts=4, top_k=1, activation="gpt_oss", activation_kwargs={"beta": 1}),
     "takes alpha and limit"),
    (dict(d_model=8, d_ff=16, num_experts=4), "MoE needs top_k"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moekit.MoE(**kwargs)


@pytest.mark.parametrize("x, match", [
    (torch.randn(3, 7), r"last dimension must be d_model=8, got shape \(3, 7\)"),
    (torch.randn(()), "last dimension must be d_model=8"),
    (torch.randint(0, 5, (3, 8)), "must be floating point, got dtype torch.int64"),
    (torch.ones(3, 8, dtype=torch.bool), "must be floating point"),
])
def test_bad_input(x, match):
    layer = moekit.MoE(8, 16, 4, 2)
    with pytest.raises(ValueError, match=match):
        layer(x)


def test_bad_input_type_and_config_mix():
    layer = moekit.MoE(8, 16, 4, 2)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        layer([[0.0] * 8])
    with pytest.raises(ValueError, match="either config= or"):
        moekit.MoE(8, config=layer.config)
    with pytest.raises(ValueError, match="router instance has"):
        moekit.MoE(8, 16, 4, 2, router=moekit.build_router("softmax_topk", 8, 6, 2))
    with pytest.raises(ValueError, match="got 3 expert modules for num_experts=4"):
        moekit.MoE(8, 16, 4, 2, experts=[torch.nn.Identity()] * 3)
    with pytest.raises(ValueError, match="unknown MoEConfig fields"):
        moekit.MoEConfig.from_dict({**layer.config.to_dict(), "n_experts": 3})
    with pytest.raises(ValueError, match="unknown experts backend"):
        layer.experts.backend = "fast"
