"""Constructor arguments that make every registered router buildable in tests."""

# name -> (top_k, router_kwargs)
CASES = {
    "softmax_topk": (2, {}),
    "topk_softmax": (2, {}),
    "sigmoid_topk": (2, {"n_group": 2, "topk_group": 1}),
    "switch": (1, {}),
    "noisy_topk": (2, {}),
    "gshard_top2": (2, {}),
    "expert_choice": (2, {}),
    "soft_moe": (1, {"slots": 2}),
    "hash": (1, {"vocab_size": 16}),
    "base": (1, {}),
    "sinkhorn": (2, {}),
    "top_p": (3, {"p": 0.5}),
    "relu": (3, {}),
    "hierarchical": (2, {"n_group": 2, "topk_group": 1}),
}
