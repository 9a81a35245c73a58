"""Training loop for moekit language models: AdamW, warm-up + cosine, clipping, accumulation, bf16 autocast,
periodic evaluation, JSONL metrics, atomic checkpoints and bit-identical resume.

Determinism: the batch of step ``s``, micro-batch ``m`` comes from a generator seeded with ``(seed, s, m)``, and the
global RNG state (router jitter and noise) is saved in every checkpoint, so on CPU a resumed run reproduces the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..models import LMConfig, TransformerLM
from ..utils import dataclass_from_dict
from .checkpoint import (CheckpointError, load_checkpoint, load_model_state, optimizer_state_dict, save_checkpoint)
from .data import Corpus, get_batch, iter_eval_batches

console = Console(stderr=True)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Validates itself; see the field names for meaning."""

    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    bf16: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup", "ckpt_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict such as ``to_dict()`` wrote; missing keys take their defaults, unknown keys fail."""
        return dataclass_from_dict(cls, d)

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(steps=1200, batch_size=16, seq_len=128, lr=6e-3, warmup=100, eval_every=50, ckpt_every=400),
    "small": TrainConfig(steps=3000, batch_size=32, seq_len=256, lr=1.5e-3, warmup=200, eval_every=100,
                         ckpt_every=500),
}


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) % (2**63))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def load_lm(ckpt: str | Path) -> tuple[TransformerLM, dict]:
    """Rebuild a model from a checkpoint folder; returns ``(model, meta)``."""
    meta, tensors, _ = load_checkpoint(ckpt)
    try:
        model = TransformerLM(LMConfig.from_dict(meta["model_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: trainer.json has no valid model_config ({e})") from None
    load_model_state(model, tensors, where=str(ckpt))
    model.eval()
    return model, meta


class Trainer:
    """Train one model; ``run()`` returns a summary dict.

    Args:
        model_config, train_config: what to train and how.
        corpus: a prepared :class:`moekit.train.data.Corpus`.
        out_dir: where ``checkpoint/`` and ``metrics.jsonl`` go.
        resume: continue from ``out_dir/checkpoint`` (must exist).
        label: name shown in the progress bar.
    """

    def __init__(self, model_config: LMConfig, train_config: TrainConfig, corpus: Corpus, out_dir: str | Path,
                 *, resume: bool = False, label: str = "train", quiet: bool = False,
                 on_log: Callable[[dict], None] | None = None):
        self.mcfg, self.cfg, self.corpus = model_config, train_config, corpus
        self.out = Path(out_dir)
        self.label, self.quiet, self.on_log = label, quiet, on_log
        self.ckpt_dir = self.out / "checkpoint"
        self.metrics_file = self.out / "metrics.jsonl"
        self.step = 0
        if resume:
            self._resume()
        else:
            if self.ckpt_dir.exists():
                raise ValueError(f"{self.ckpt_dir} already holds a checkpoint; pass --resume to continue it, or "
                                 "choose another --out (nothing was overwritten)")
            torch.manual_seed(train_config.seed)
            self.model = TransformerLM(model_config)
            self.opt = build_optimizer(self.model, train_config)
        self.moe_layers = self.model.moe_layers()
        for layer in self.moe_layers:  # the aux losses see the same 1/accum scaling as the main loss
            layer.aux_loss_scale = 1.0 / train_config.grad_accum

    # ---------------------------------------------------------------------------------------------- resume
    def _resume(self) -> None:
        meta, tensors, opt_tensors = load_checkpoint(self.ckpt_dir)
        saved_model = LMConfig.from_dict(meta["model_config"])
        if saved_model != self.mcfg:
            raise ValueError(f"{self.ckpt_dir} was trained with a different model config; resume with the same "
                             "--preset and options")
        saved_train = asdict(TrainConfig.from_dict(meta["train_config"]))
        now = asdict(self.cfg)
        if {k: v for k, v in saved_train.items() if k != "steps"} != {k: v for k, v in now.items() if k != "steps"}:
            raise ValueError(f"{self.ckpt_dir} was trained with different training options "
                             f"({_diff(saved_train, now)}); resume with the same ones (only --steps may change)")
        if saved_train["steps"] != now["steps"]:
            console.print(f"[yellow]resuming with steps={now['steps']} (was {saved_train['steps']}): the learning-"
                          "rate schedule changes from here on[/]")
        if meta.get("data_fingerprint") != self.corpus.meta.get("fingerprint"):
            raise ValueError(f"{self.ckpt_dir} was trained on different data; resume with the same --data")
        self.model = TransformerLM(self.mcfg)
        load_model_state(self.model, tensors, where=str(self.ckpt_dir))
        self.opt = build_optimizer(self.model, self.cfg)
        if opt_tensors is None:
            raise CheckpointError(f"{self.ckpt_dir} has no optimizer state; it cannot be resumed")
        self.opt.load_state_dict(optimizer_state_dict(opt_tensors, meta["optimizer"]))
        self.step = int(meta["step"])
        torch.set_rng_state(torch.tensor(meta["rng_state"], dtype=torch.uint8))
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint (a run killed after its last save)."""
        if not self.metrics_file.exists():
            return
        keep = [ln for ln in self.metrics_file.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.metrics_file.write_text("".join(ln + "\n" for ln in keep))

    def save(self) -> None:
        meta = {"model_config": self.mcfg.to_dict(), "train_config": asdict(self.cfg), "step": self.step,
                "rng_state": torch.get_rng_state().tolist(), "data_fingerprint": self.corpus.meta.get("fingerprint"),
                "parameters": self.model.num_parameters()}
        save_checkpoint(self.ckpt_dir, self.model, self.opt, meta)

    # ------------------------------------------------------------------------------------------------ loop
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for x, y in iter_eval_batches(self.corpus, "val", self.cfg.batch_size, self.cfg.seq_len,
                                      self.cfg.eval_batches):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
                losses.append(self.model(x, y)[1].float().item())
        self.model.train()
        return sum(losses) / len(losses)

    def _balance(self) -> float:
        """Mean over MoE layers of max/mean tokens per expert in the last forward (1.0 = perfectly balanced)."""
        vals = []
        for layer in self.moe_layers:
            load = layer.stats.get("tokens_per_expert")
            if load is not None and load.sum() > 0:
                load = load.float()
                vals.append((load.max() / load.mean()).item())
        return sum(vals) / len(vals) if vals else float("nan")

    def _log(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.on_log:
            self.on_log(record)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        last_eval = None
        t_window, tok_window = time.perf_counter(), 0
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            disable=self.quiet)
        with progress:
            task = progress.add_task(self.label, total=cfg.steps, completed=self.step, info="")
            while self.step < cfg.steps:
                step = self.step
                lr = cfg.lr_at(step)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(cfg.grad_accum):
                    x, y = get_batch(self.corpus, "train", cfg.batch_size, cfg.seq_len,
                                     batch_generator(cfg.seed, step, micro))
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                        _, loss = self.model(x, y)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item() / cfg.grad_accum
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.step = step + 1
                tok_window += tokens_per_step

                record: dict[str, Any] = {"step": self.step, "loss": loss_sum, "lr": lr}
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if log_now:
                    elapsed = time.perf_counter() - t_window
                    record.update(tokens_per_s=tok_window / max(elapsed, 1e-9), grad_norm=grad_norm,
                                  balance=self._balance(), tokens=self.step * tokens_per_step)
                    aux = [layer.stats["aux_loss"].item() for layer in self.moe_layers if "aux_loss" in layer.stats]
                    if aux:
                        record["aux_loss"] = sum(aux) / len(aux)
                    t_window, tok_window = time.perf_counter(), 0
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last_eval = record["val_loss"] = self.evaluate()
                if log_now or "val_loss" in record:
                    self._log(record)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save()
                info = f"loss {loss_sum:.3f}"
                if "tokens_per_s" in record:
                    info += f"  {record['tokens_per_s']:,.0f} tok/s"
                    if self.moe_layers:
                        info += f"  balance {record['balance']:.2f}"
                if last_eval is not None:
                    info += f"  val {last_eval:.3f}"
                progress.update(task, completed=self.step, info=info)
                if not console.is_terminal and not self.quiet and "val_loss" in record:
                    # no live bar in a log file or CI: one line per evaluation instead
                    console.print(f"{self.label} step {self.step}/{cfg.steps}  {info}", highlight=False)
        self.save()
        return {"steps": self.step, "final_val_loss": last_eval, "checkpoint": str(self.ckpt_dir),
                "metrics": str(self.metrics_file), "parameters": self.model.num_parameters()}


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a.get(k) != b.get(k)) or "none"


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []
