"""The ``moekit`` command: train, compare, generate, convert, bench."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .utils import cache_root

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="moekit: train, compare, inspect and benchmark Mixture-of-Experts models.")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # no hard breaks inside paths
    raise typer.Exit(code=2)


def load_corpus(data: Optional[Path]):
    """Prepare (or reuse) the token cache of the default corpus or of ``data``."""
    from .train.data import prepare_corpus

    if data is None:
        key = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    else:
        key = "data-" + hashlib.sha1(str(Path(data).resolve()).encode()).hexdigest()[:16]
    return prepare_corpus(data, cache_root() / "corpus" / key)


def _configs(preset: str, steps: Optional[int], batch_size: Optional[int], lr: Optional[float], bf16: bool,
             seed: Optional[int], router: Optional[str], num_experts: Optional[int], top_k: Optional[int]):
    from .models import get_preset
    from .train.trainer import TRAIN_PRESETS

    model_cfg = get_preset(preset)
    train_cfg = TRAIN_PRESETS[preset]
    changes = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed).items() if v is not None}
    if bf16:
        changes["bf16"] = True
    train_cfg = replace(train_cfg, **changes)
    model_changes = {k: v for k, v in dict(router=router, num_experts=num_experts, top_k=top_k).items()
                     if v is not None}
    if model_changes:
        model_cfg = replace(model_cfg, **model_changes)
    return model_cfg, train_cfg


def _params_line(p: dict) -> str:
    return f"{p['total'] / 1e6:.2f}M parameters, {p['active'] / 1e6:.2f}M active per token"


PRESET_HELP = "Model and training preset: tiny (a few CPU minutes) or small."
DATA_HELP = "UTF-8 text file or folder to train on (default: this Python's standard library source)."


@app.command()
def train(
    preset: str = typer.Option("tiny", help=PRESET_HELP),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    out: Optional[Path] = typer.Option(None, help="Output folder for the checkpoint and metrics.jsonl "
                                                  "(default runs/<preset>-moe or runs/<preset>-dense)."),
    resume: bool = typer.Option(False, help="Continue the checkpoint in --out (bit-identical on CPU)."),
    dense: bool = typer.Option(False, help="Train the dense baseline (same active parameters) instead of the MoE."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the preset's)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per step (default: the preset's)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: the preset's)."),
    bf16: bool = typer.Option(False, help="Run forward and backward under bf16 autocast."),
    seed: Optional[int] = typer.Option(None, help="Seed for initialisation and data order."),
    router: Optional[str] = typer.Option(None, help="Router of the MoE layers (e.g. softmax_topk, sigmoid_topk)."),
    num_experts: Optional[int] = typer.Option(None, help="Experts per MoE layer."),
    top_k: Optional[int] = typer.Option(None, help="Experts per token."),
) -> None:
    """Train a byte-level MoE language model (or its dense baseline)."""
    from .train.checkpoint import CheckpointError
    from .train.data import DataError
    from .train.trainer import Trainer

    try:
        model_cfg, train_cfg = _configs(preset, steps, batch_size, lr, bf16, seed, router, num_experts, top_k)
        if dense:
            model_cfg = model_cfg.dense_baseline()
        out = out or Path("runs") / f"{preset}-{'dense' if dense else 'moe'}"
        corpus = load_corpus(data)
        trainer = Trainer(model_cfg, train_cfg, corpus, out, resume=resume, label="dense" if dense else "moe")
        err.print(f"model: {_params_line(trainer.model.num_parameters())}; data: "
                  f"{corpus.num_tokens('train'):,} train / {corpus.num_tokens('val'):,} val bytes")
        summary = trainer.run()
    except (ValueError, CheckpointError, DataError) as e:
        _fail(str(e))
    console.print(f"done: {summary['steps']} steps, final validation loss {summary['final_val_loss']:.4f}")
    console.print(f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}")


@app.command()
def compare(
    preset: str = typer.Option("tiny", help=PRESET_HELP),
    data: Optional[Path] = typer.Option(None, help=DATA_HELP),
    out: Optional[Path] = typer.Option(None, help="Output folder (default runs/compare-<preset>)."),
    steps: Optional[int] = typer.Option(None, help="Training steps for both models (default: the preset's)."),
    bf16: bool = typer.Option(False, help="Train both under bf16 autocast."),
    seed: Optional[int] = typer.Option(None, help="Seed for both runs."),
    overwrite: bool = typer.Option(False, help="Replace an earlier comparison in --out (its moe/, dense/, "
                                               "compare.json and plot) instead of refusing."),
) -> None:
    """Train the MoE model and a dense model of equal active parameters; plot and tabulate the result."""
    from .train.compare import compare as run_compare
    from .train.data import DataError

    try:
        model_cfg, train_cfg = _configs(preset, steps, None, None, bf16, seed, None, None, None)
        out = out or Path("runs") / f"compare-{preset}"
        corpus = load_corpus(data)
        summary = run_compare(model_cfg, train_cfg, corpus, out, overwrite=overwrite)
    except (ValueError, DataError) as e:
        _fail(str(e))
    print_compare(summary, out)


def print_compare(summary: dict, out: Path) -> None:
    table = Table(title="MoE vs dense at equal active parameters and steps")
    table.add_column("")
    table.add_column("MoE", justify="right")
    table.add_column("dense", justify="right")
    m, d = summary["moe"], summary["dense"]
    table.add_row("parameters (total)", f"{m['total'] / 1e6:.2f}M", f"{d['total'] / 1e6:.2f}M")
    table.add_row("parameters (active per token)", f"{m['active'] / 1e6:.2f}M", f"{d['active'] / 1e6:.2f}M")
    table.add_row("final validation loss", f"{m['final_val_loss']:.4f}", f"{d['final_val_loss']:.4f}")
    table.add_row("training tokens / s", f"{m['tokens_per_s']:,.0f}", f"{d['tokens_per_s']:,.0f}")
    reach = summary["moe_steps_to_dense_final_loss"]
    reach_s = "not reached" if reach is None else f"{reach:.0f} of {summary['steps']} ({100 * reach / summary['steps']:.0f}%)"
    table.add_row("steps for MoE to reach dense's final loss", reach_s, "")
    console.print(table)
    console.print(f"plot: {summary['plot']}\nresults: {out / 'compare.json'}\n"
                  f"checkpoints: {out / 'moe' / 'checkpoint'}, {out / 'dense' / 'checkpoint'}")


@app.command()
def generate(
    ckpt: Path = typer.Option(..., help="Checkpoint folder (or the run folder that contains checkpoint/); "
                                        "moekit-trained or converted with `moekit convert --from-hf`."),
    prompt: str = typer.Option("def ", help="Text to continue."),
    prompt_ids: Optional[str] = typer.Option(None, help="Comma-separated token ids to continue instead of --prompt "
                                                        "(for converted models that came without a tokenizer)."),
    max_new_tokens: int = typer.Option(200, help="Tokens (bytes, for byte-level models) to generate."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (ignored with --greedy)."),
    top_p: Optional[float] = typer.Option(0.95, help="Nucleus sampling: keep the smallest set of tokens with this "
                                                     "total probability."),
    greedy: bool = typer.Option(False, help="Always take the most likely token."),
    seed: int = typer.Option(0, help="Sampling seed."),
    stop_at_eos: bool = typer.Option(True, help="Stop at the model's end-of-sequence token, if it has one."),
) -> None:
    """Continue a prompt with a checkpoint (KV cache; greedy or temperature/top-p sampling), streaming the text as
    it is generated."""
    import torch

    from .interop.text import load_codec
    from .train.checkpoint import CheckpointError
    from .train.trainer import load_lm

    path = ckpt / "checkpoint" if (ckpt / "checkpoint").is_dir() else ckpt
    try:
        model, meta = load_lm(path)
        codec = load_codec(path, meta, model.config.vocab_size)
        if prompt_ids is not None:
            try:
                tokens = [int(t) for t in prompt_ids.replace(" ", "").split(",") if t]
            except ValueError:
                _fail(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}")
        elif codec is None:
            _fail(f"{path} has no tokenizer (no tokenizer.json) and is not a byte-level model: pass --prompt-ids, "
                  "or copy the tokenizer files of the original model into the checkpoint folder")
        else:
            tokens = codec.encode(prompt)
        if not tokens:
            _fail("the prompt must not be empty")
        ids = torch.tensor([tokens], dtype=torch.long)
        as_text = codec is not None and prompt_ids is None
        console.print(codec.start(tokens) if as_text else " ".join(map(str, tokens)), end="", highlight=False,
                      markup=False)

        def stream(token: int) -> None:
            text = codec.push(token) if as_text else f" {token}"
            if text:
                console.print(text, end="", highlight=False, markup=False, soft_wrap=True)

        stop = codec.stop_ids if (codec is not None and stop_at_eos) else None
        model.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
                       generator=torch.Generator().manual_seed(seed), stream=stream, stop_ids=stop)
        if as_text:
            console.print(codec.flush(), end="", highlight=False, markup=False)
        console.print()
    except (ValueError, CheckpointError) as e:
        _fail(str(e))


@app.command()
def convert(
    from_hf: Optional[Path] = typer.Option(None, "--from-hf", help="Hugging Face model folder to read (config.json "
                                           "+ *.safetensors, one file or shards with an index)."),
    to_hf: Optional[Path] = typer.Option(None, "--to-hf", help="moekit checkpoint folder to write as a Hugging Face "
                                         "model folder (transformers from_pretrained loads it)."),
    out: Path = typer.Option(..., help="Output folder: a moekit checkpoint (--from-hf) or a Hugging Face folder "
                                       "(--to-hf)."),
    layout: Optional[str] = typer.Option(None, help="--to-hf expert layout: per_expert (hub checkpoints) or fused "
                                                    "(transformers v5). Default: the layout the model came in."),
    model_type: Optional[str] = typer.Option(None, help="--to-hf of a moekit-trained model: the transformers family "
                                                        "to write (mixtral, qwen2_moe, qwen3_moe, olmoe; default: "
                                                        "the first that matches)."),
    max_shard_size: Optional[str] = typer.Option(None, help="--to-hf: shard the weights, e.g. 5GB or 500MB."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Convert Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) to moekit's LM and back.

    Reads safetensors only (never pickles); the round trip gives back every tensor bit for bit."""
    from .interop.convert import from_hf_folder, to_hf_folder
    from .interop.hf_files import HFCheckpointError
    from .train.checkpoint import CheckpointError

    if (from_hf is None) == (to_hf is None):
        _fail("pass exactly one of --from-hf HF_FOLDER (to a moekit checkpoint) or --to-hf CHECKPOINT (to a Hugging "
              "Face folder)")
    try:
        if from_hf is not None:
            if layout or model_type or max_shard_size:
                _fail("--layout, --model-type and --max-shard-size apply to --to-hf only")
            summary = from_hf_folder(from_hf, out, overwrite=overwrite)
        else:
            ckpt = to_hf / "checkpoint" if (to_hf / "checkpoint").is_dir() else to_hf
            summary = to_hf_folder(ckpt, out, model_type=model_type, layout=layout, overwrite=overwrite,
                                   max_shard_bytes=_parse_size(max_shard_size) if max_shard_size else None)
    except (HFCheckpointError, CheckpointError, ValueError) as e:
        _fail(str(e))
    table = Table(title=f"converted {'from' if from_hf else 'to'} Hugging Face")
    table.add_column("")
    table.add_column("", overflow="fold")
    for key, value in summary.items():
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else f"{value:,}"
                      if isinstance(value, int) else str(value))
    console.print(table)


def _parse_size(text: str) -> int:
    """``"5GB"`` → bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size must look like 500MB or 5GB, got {text!r}")


@app.command()
def bench(
    quick: bool = typer.Option(False, help="A small smoke grid (T in {1, 128}, fp32, forward) instead of the full one."),
    out: Optional[Path] = typer.Option(None, help="JSON results file (default benchmarks/results/layer_cpu.json)."),
) -> None:
    """Benchmark the MoE layer against transformers' experts backends, a dense FFN and the measured roofline."""
    from .benchmark import main as bench_main

    args = ["--quick"] if quick else []
    if out is not None:
        args += ["--out", str(out)]
    bench_main(args)


@app.command()
def report(
    ckpt: Path = typer.Option(..., help="Run folder written by `moekit train` (with checkpoint/ and metrics.jsonl) "
                                        "or its checkpoint/ folder."),
    data: Optional[Path] = typer.Option(None, help="Text file or folder to route (default: this Python's standard "
                                                   "library source, the default training corpus); use the data "
                                                   "the model was trained on."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default <run>/report/report.html); the JSON "
                                                  "and the PNG plots are written beside it."),
    labels: Optional[Path] = typer.Option(None, help="JSON file mapping file paths or glob patterns (relative to "
                                                     "the data folder) to domain labels, e.g. "
                                                     "'{\"email/*\": \"mail\"}' (default: each file's top-level "
                                                     "package or folder)."),
    split: str = typer.Option("val", help="Corpus split to analyse: val (held-out files) or train."),
    tokens: int = typer.Option(65536, help="Bytes to route through the model (rounded up to whole windows)."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in bytes (default: the training seq_len)."),
) -> None:
    """Write a routing report: load, balance over training, specialisation, co-activation, a coloured text sample
    (one self-contained HTML file, its JSON, and PNGs)."""
    from .analysis.labels import LabelError
    from .analysis.report import build_report
    from .train.checkpoint import CheckpointError
    from .train.data import DataError

    try:
        if split not in ("val", "train"):
            raise ValueError(f"--split must be 'val' or 'train', got {split!r}")
        result = build_report(ckpt, load_corpus(data), out, domain_labels=labels, split=split, tokens=tokens,
                              seq_len=seq_len)
    except (ValueError, CheckpointError, DataError, LabelError) as e:
        _fail(str(e))
    for line in result["summary"]:
        console.print(f"- {line}", highlight=False, markup=False)
    console.print(f"report: {result['html']}\njson: {result['json']}\nplots: "
                  f"{', '.join(p.name for p in result['pngs'].values())}", highlight=False)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
