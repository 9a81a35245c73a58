"""Router benchmark: the same small model and synthetic multi-task data trained with every router.

The model: token embedding + task embedding, two residual MoE layers (E=8), a linear head. The data: sequences whose
first token names one of 8 tasks; each task maps every token to another through its own permutation, so experts
that specialise per task pay off. Each router trains for the same steps with the same seed and learning rate.

Reports per router: final training loss, held-out loss, load balance (coefficient of variation of tokens per expert,
0 = perfect), fraction of tokens that reached no expert, and time per training step. Writes
``benchmarks/results/routers.json`` and the table in ``docs/routers.md``.

    python benchmarks/routers.py            # about two minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress

import moekit
from moekit.routing import ROUTERS

ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=True)

V, TASKS, L, D, E = 128, 16, 16, 32, 8

# name -> (top_k, router kwargs, extra layer options)
SETUPS = {
    "softmax_topk": (2, {}, {}),
    "topk_softmax": (2, {}, {}),
    "sigmoid_topk": (2, {"n_group": 4, "topk_group": 2}, {"aux_loss": None, "bias_update_rate": 1e-3}),
    "switch": (1, {"jitter": 0.01}, {"capacity_factor": 1.25}),
    "noisy_topk": (2, {}, {"aux_loss": None}),
    "gshard_top2": (2, {}, {"capacity_factor": 2.0, "drop_policy": "batch_priority"}),
    "expert_choice": (2, {}, {"aux_loss": None}),
    "soft_moe": (1, {"slots": 2}, {}),
    "hash": (1, {"vocab_size": V}, {"aux_loss": None}),
    "base": (1, {}, {"aux_loss": None}),
    "sinkhorn": (2, {}, {"aux_loss": None}),
    "top_p": (4, {"p": 0.5}, {}),
    "relu": (4, {"k_target": 2}, {"aux_loss": None}),
    "hierarchical": (2, {"n_group": 2, "topk_group": 1}, {}),
}

# name -> (paper, causal, needs token ids)
INFO = {
    "softmax_topk": ("Shazeer et al. 2017 (no noise); Mixtral, Qwen-MoE, OLMoE", "yes", "no"),
    "topk_softmax": ("GPT-OSS, Granite-MoE", "yes", "no"),
    "sigmoid_topk": ("DeepSeek-V3 (Liu et al. 2024), group-limited + aux-loss-free bias", "yes", "no"),
    "switch": ("Fedus et al. 2021, Switch Transformer", "yes", "no"),
    "noisy_topk": ("Shazeer et al. 2017, noisy top-k + importance/load losses", "yes", "no"),
    "gshard_top2": ("Lepikhin et al. 2020, GShard (+ V-MoE batch priority)", "yes", "no"),
    "expert_choice": ("Zhou et al. 2022, Expert Choice", "**no**", "no"),
    "soft_moe": ("Puigcerver et al. 2023, Soft MoE", "**no**", "no"),
    "hash": ("Roller et al. 2021, Hash Layers", "yes", "**yes**"),
    "base": ("Lewis et al. 2021, BASE Layers", "**no** (training)", "no"),
    "sinkhorn": ("Clark et al. 2022, S-BASE (Sinkhorn)", "**no** (training)", "no"),
    "top_p": ("Huang et al. 2024, dynamic top-p", "yes", "no"),
    "relu": ("Wang et al. 2024, ReMoE (ReLU routing)", "yes", "no"),
    "hierarchical": ("Jordan & Jacobs 1994, hierarchical MoE", "yes", "no"),
}


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(100 + t)) for t in range(TASKS)])
    task = torch.randint(0, TASKS, (n,), generator=g)
    tok = torch.randint(0, V, (n, L), generator=g)
    return tok, task, perms[task[:, None], tok]


class TinyMoEModel(torch.nn.Module):
    def __init__(self, router: str):
        super().__init__()
        top_k, kwargs, extra = SETUPS[router]
        self.hash = router == "hash"
        self.emb, self.task_emb = torch.nn.Embedding(V, D), torch.nn.Embedding(TASKS, D)
        self.moes = torch.nn.ModuleList([moekit.MoE(D, 32, E, top_k, router=router, router_kwargs=kwargs, **extra)
                                         for _ in range(2)])
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(D) for _ in range(2)])
        self.head = torch.nn.Linear(D, V)

    def forward(self, tok, task):
        h = self.emb(tok) + self.task_emb(task)[:, None]
        for norm, moe in zip(self.norms, self.moes):
            h = h + (moe(norm(h), token_ids=tok) if self.hash else moe(norm(h)))
        return self.head(h)


def run(router: str, steps: int, batch: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = TinyMoEModel(router)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tok, task, target = make_data(steps * batch, seed)
    val = make_data(512, seed + 1)
    unrouted: list[float] = []

    def hook(layer, x_TD, routed, plan):
        ids = plan.ids_TK if plan is not None else routed.topk_ids_TK
        if routed.soft is None:
            unrouted.append((ids < 0).all(dim=-1).float().mean().item())

    for moe in model.moes:
        moe.register_routing_hook(hook)
    loads, times, losses = [], [], []
    model.train()
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        t0 = time.perf_counter()
        logits = model(tok[sl], task[sl])
        loss = F.cross_entropy(logits.reshape(-1, V), target[sl].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if i >= steps - 20:
            loads += [m.stats["tokens_per_expert"].float() for m in model.moes]
    model.eval()
    with torch.no_grad():
        val_loss = F.cross_entropy(model(val[0], val[1]).reshape(-1, V), val[2].reshape(-1)).item()
    cv = statistics.mean((ld.std() / ld.mean()).item() for ld in loads)
    return {"router": router, "final_loss": statistics.mean(losses[-20:]), "first_loss": losses[0],
            "val_loss": val_loss, "load_cv": cv, "unrouted_fraction": statistics.mean(unrouted[-40:]) if unrouted
            else 0.0, "ms_per_step": 1e3 * statistics.median(times[5:])}


def write_docs(results: list[dict], steps: int, batch: int) -> str:
    lines = ["| router | paper / used by | causal | needs token ids | final train loss | held-out loss | "
             "load CV | tokens unrouted | ms / step |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        paper, causal, ids = INFO[r["router"]]
        lines.append(f"| `{r['router']}` | {paper} | {causal} | {ids} | {r['final_loss']:.3f} | {r['val_loss']:.3f} | "
                     f"{r['load_cv']:.2f} | {100 * r['unrouted_fraction']:.1f}% | {r['ms_per_step']:.1f} |")
    table = "\n".join(lines)
    doc = ROOT / "docs" / "routers.md"
    text = doc.read_text()
    start, end = "<!-- ROUTER-BENCH:START -->", "<!-- ROUTER-BENCH:END -->"
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    note = (f"{steps} steps of batch {batch} × {L} tokens, AdamW lr 3e-3, seed 0; the loss starts near "
            f"ln({V}) = {torch.log(torch.tensor(float(V))):.2f}. Produced by `python benchmarks/routers.py`.")
    doc.write_text(f"{before}{start}\n{note}\n\n{table}\n{end}{after}")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--routers", nargs="*", default=list(SETUPS), choices=sorted(ROUTERS))
    args = ap.parse_args(argv)
    results = []
    with Progress(console=console) as progress:
        task = progress.add_task("routers", total=len(args.routers))
        for name in args.routers:
            progress.update(task, description=name)
            results.append(run(name, args.steps, args.batch))
            progress.advance(task)
    out = ROOT / "benchmarks" / "results" / "routers.json"
    out.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "results": results}, indent=1))
    print(write_docs(results, args.steps, args.batch))
    console.print(f"written {out} and docs/routers.md")


if __name__ == "__main__":
    main()
