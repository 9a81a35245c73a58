"""Generation benchmark: prefill and decode tokens/s of a small Mixtral-shaped model, on this CPU.

Three ways to run the same weights, in one process:
- transformers as is, with each ``experts_implementation`` (``eager``, ``grouped_mm``, ``batched_mm``; the best of
  them is the peer);
- transformers patched by ``moekit.patch_hf`` (its attention, cache and ``generate``; moekit's MoE layers);
- moekit's own ``TransformerLM``, converted with ``moekit convert --from-hf`` (its KV cache and ``generate``).

Prefill: one forward of a ``PROMPT``-token prompt that fills the cache. Decode: ``(NEW - 1) / (t(NEW) - t(1))`` from
greedy generations of ``NEW`` and 1 tokens, so prefill cancels. Median of ``REPEATS`` rounds after a warm-up round;
each round runs every engine once (round-robin), so load from other processes hits them alike. fp32 and bf16.

Timing: on one thread by default, and ``t`` is the process's CPU time (``time.process_time``), which stays
meaningful when other jobs share the cores (a multi-threaded run's wall time then mostly measures preemption).
Wall-clock numbers are recorded too. Writes ``benchmarks/results/generate_cpu.json`` and the table between the GENERATE-BENCH markers of
docs/huggingface.md.

    python benchmarks/bench_generate.py            (from the repository root; ~3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import moekit
from moekit.benchmark import cpu_name, write_marked_table
from moekit.interop.convert import from_hf_folder
from moekit.models.model import KVCache
from moekit.train.trainer import load_lm
from moekit.utils import tune_cpu_allocator

ROOT = Path.cwd()
OUT = ROOT / "benchmarks" / "results" / "generate_cpu.json"
DOC = ROOT / "docs" / "huggingface.md"
# Mixtral's layer shape at the DESIGN.md benchmark size (D=512, F=1408, E=8, K=2), GQA 8:2 heads, Mistral's vocabulary.
CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2,
              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
              rope_theta=1e6, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
PROMPT, NEW, REPEATS = 128, 32, 5
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
transformers.logging.set_verbosity_error()


class HFEngine:
    def __init__(self, model):
        self.model = model.eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    @torch.no_grad()
    def prefill(self, ids):
        self.model(ids, use_cache=True)

    @torch.no_grad()
    def generate(self, ids, n):
        return self.model.generate(ids, max_new_tokens=n, do_sample=False)


class MoekitEngine:
    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def prefill(self, ids):
        cfg = self.model.config
        self.model(ids, cache=KVCache(cfg, ids.shape[0], ids.shape[1], self.model.embed.weight.dtype, ids.device))

    def generate(self, ids, n):
        return self.model.generate(ids, n, greedy=True)


def measure(engines: dict, ids: torch.Tensor) -> dict[str, dict]:
    """Round-robin timing (each repeat runs every engine once), so load from other processes hits all alike."""
    steps = {"prefill": lambda e: e.prefill(ids), "new": lambda e: e.generate(ids, NEW),
             "one": lambda e: e.generate(ids, 1)}
    clocks = {"cpu": time.process_time, "wall": time.perf_counter}
    times = {name: {(c, k): [] for c in clocks for k in steps} for name in engines}
    for rep in range(REPEATS + 1):  # the first round is the warm-up
        for name, engine in engines.items():
            for key, step in steps.items():
                start = {c: clock() for c, clock in clocks.items()}
                step(engine)
                if rep:
                    for c, clock in clocks.items():
                        times[name][(c, key)].append(clock() - start[c])
    out = {}
    for name, engine in engines.items():
        t = {k: statistics.median(v) for k, v in times[name].items()}
        out[name] = {"tokens": engine.generate(ids, NEW)[0, ids.shape[1]:].tolist()}
        for c in clocks:
            suffix = "" if c == "cpu" else "_wall"
            decode_s = t[(c, "new")] - t[(c, "one")]
            out[name].update({f"prefill_tok_s{suffix}": ids.numel() / t[(c, "prefill")],
                              f"decode_tok_s{suffix}": (NEW - 1) / decode_s if decode_s > 0 else None,
                              f"prefill_ms{suffix}": 1e3 * t[(c, "prefill")], f"generate_ms{suffix}": 1e3 * t[(c, "new")]})
    return out


def run(threads: int) -> dict:
    tune_cpu_allocator()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-gen-"))
    hf_cfg = transformers.MixtralConfig(**CONFIG)
    model = transformers.MixtralForCausalLM(hf_cfg)
    with torch.no_grad():  # unit-scale layers: routing and logits far from uniform, so greedy tokens are not ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(work / "hf")
    from_hf_folder(work / "hf", work / "moekit")
    ids = torch.randint(0, CONFIG["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        dt = str(dtype).removeprefix("torch.")
        engines = {f"transformers[{impl}]": HFEngine(transformers.AutoModelForCausalLM.from_pretrained(
            work / "hf", dtype=dtype, experts_implementation=impl)) for impl in HF_IMPLS}
        patched = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=dtype)
        moekit.patch_hf(patched)
        engines["transformers + moekit.patch_hf"] = HFEngine(patched)
        engines["moekit TransformerLM"] = MoekitEngine(load_lm(work / "moekit")[0].to(dtype))
        results = measure(engines, ids)
        reference = results["transformers[eager]"]["tokens"]
        for name, result in results.items():
            result["same_greedy_tokens_as_transformers"] = result.pop("tokens") == reference
            rows.append({"engine": name, "dtype": dt, **result})
            print(f"{dt:9s} {name:32s} prefill {result['prefill_tok_s']:8.0f} tok/s   decode "
                  f"{_f(result['decode_tok_s'])} tok/s   same tokens: {result['same_greedy_tokens_as_transformers']}",
                  flush=True)
        del engines, patched, results
    params = sum(p.numel() for p in model.parameters())
    return {"config": CONFIG, "parameters": params, "prompt_tokens": PROMPT, "new_tokens": NEW, "batch": 1,
            "repeats": REPEATS, "rows": rows,
            "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version()},
            "timing": "tok/s from process CPU time (time.process_time) on the threads above; *_wall keys: wall clock",
            "note": "2-core CPU shared with several other jobs during the run (load average ~6): wall-clock numbers "
                    "are dominated by preemption; CPU-time numbers on one thread are the comparable ones. Compare "
                    "within a dtype of one run rather than across runs"}


def table(result: dict) -> str:
    lines = [f"Batch 1, {result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens, "
             f"{result['machine']['threads']} thread(s); tokens per second of CPU time (see note).", "",
             "| dtype | engine | prefill tok/s | decode tok/s | vs best transformers (prefill / decode) | "
             "same greedy tokens as transformers[eager] |", "|---|---|---:|---:|---:|:---:|"]
    for dt in ("float32", "bfloat16"):
        rows = [r for r in result["rows"] if r["dtype"] == dt]
        hf = [r for r in rows if r["engine"].startswith("transformers[")]
        best_p = max(r["prefill_tok_s"] for r in hf)
        best_d = max((r["decode_tok_s"] for r in hf if r["decode_tok_s"]), default=None)
        for r in rows:
            d = r["decode_tok_s"]
            ratio_d = f"{d / best_d:.2f}x" if d and best_d else "n/a"
            lines.append(f"| {dt} | {r['engine']} | {r['prefill_tok_s']:,.0f} | {_f(d)} | "
                         f"{r['prefill_tok_s'] / best_p:.2f}x / {ratio_d} | "
                         f"{'yes' if r['same_greedy_tokens_as_transformers'] else 'no'} |")
    return "\n".join(lines)


def write_doc_table(text: str, marker: str = "GENERATE-BENCH") -> None:
    """The table goes to docs/huggingface.md and to the README."""
    for path in (DOC, ROOT / "README.md"):
        write_marked_table(path, text, marker)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: robust on a shared CPU)")
    args = parser.parse_args(argv)
    result = run(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    text = table(result)
    write_doc_table(text)
    print(text)


if __name__ == "__main__":
    main()
