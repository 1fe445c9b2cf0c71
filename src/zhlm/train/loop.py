"""One training loop for pretraining, SFT and DPO.

A stage supplies a batch source (`zhlm.train.batches.BatchSource`: the global
batch of each step, and the count of loss units in a batch) and a
`loss_fn(model, batch) -> (loss_sum, metrics)`: the loss summed over the units
the batch source counts, and summed metrics. Each optimizer step divides by the
count of the whole global batch, so the gradient does not depend on how the
batch is cut into micro-batches and processes; metrics are divided the same way.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zhlm.config import phase_errors
from zhlm.inference import pick_device
from zhlm.io import CorruptFile, atomic_path, fsync, read_checked, remove_stale_temps, write_checked
from zhlm.train import distributed
from zhlm.train.batches import Batch, BatchSource
from zhlm.train.lora import LoraSettings, is_adapter_parameter
from zhlm.train.phases import Phase, phase_at

LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]

log = logging.getLogger("zhlm.train")


@dataclass
class TrainConfig:
    """One training stage's settings: the schema's `training` definition, with its defaults
    (workflow/schemas/config.schema.yaml is the source; a test holds the two together)."""
    steps: int = 200
    global_batch: int = 32          # sequences (or pairs) per optimizer step, over all processes
    micro_batch: int = 8            # sequences per forward/backward on one process
    seq_len: int = 256              # tokens per training window / longest example
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"        # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2     # wsd: share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    dtype: str = "auto"             # auto (bf16 where the GPU or CPU has bf16 instructions, else fp32) | bf16 | fp32
    compile: bool = False
    device: str = "auto"
    eval_every: int = 50
    checkpoint_every: int = 50
    nproc: int = 1                  # processes per node (the launcher's; here for the fingerprint)
    nodes: int = 1
    eval_windows: int = 32          # pretrain: validation windows per evaluation
    eval_examples: int = 256        # sft: held-out conversations per evaluation
    beta: float = 0.1               # dpo: strength of the KL constraint
    sft_weight: float = 0.0         # dpo: weight of the chosen answers' NLL added to the loss (RPO)
    anchor_weight: float = 0.0      # dpo: weight of the NLL of one sft conversation per pair added to it
    unlikelihood_weight: float = 0.0  # dpo: weight of the unlikelihood of the rejected answers' repeated tokens
    optimizer: str = "adamw"        # adamw | muon (Muon for the hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02           # muon: the hidden matrices' learning rate
    zero_init_out_proj: bool = False  # pretrain: o_proj and down_proj start at zero
    pretrain_mix: float = 0.0       # sft: share of pretraining-text windows among the training examples
    sft_mix: float = 0.0            # finetune: share of the sft stage's conversations among them
    group_by_length: bool = False   # sft, dpo: batches of examples of similar length (less padding)
    lora: LoraSettings | None = None  # sft, dpo: train a LoRA adapter instead of every weight
    phases: list[Phase] | None = None  # pretrain: staged pretraining (zhlm.train.phases); None: one phase

    def __post_init__(self):
        if isinstance(self.lora, dict):  # as the config gives it
            self.lora = LoraSettings(**self.lora)
        if self.phases is not None:
            self.phases = [Phase(**p) if isinstance(p, dict) else p for p in self.phases]
            phases = [dataclasses.asdict(p) for p in self.phases]
            if errors := phase_errors({"steps": self.steps, "phases": phases}):
                raise ValueError("; ".join(errors))
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.schedule!r}: cosine or wsd")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: adamw or muon")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The schedule, as a factor of each parameter group's peak learning rate: the stage's shape
    over its steps, or with phases each phase's shape over the phase's own steps."""
    if cfg.phases:
        k, step = phase_at(cfg.phases, step)
        phase = cfg.phases[k]
        return shape_factor(step, phase.steps, phase.warmup_steps, phase.schedule, phase.decay_fraction,
                            cfg.min_lr_ratio)
    return shape_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.decay_fraction, cfg.min_lr_ratio)


def shape_factor(step: int, steps: int, warmup_steps: int, schedule: str, decay_fraction: float,
                 floor: float) -> float:
    """A linear warmup, then cosine down to `floor`, or constant then a linear decay to it (wsd)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = steps - int(steps * decay_fraction)
    if step < decay_start:
        return 1.0
    return 1 - (1 - floor) * (step - decay_start + 1) / max(1, steps - decay_start)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The AdamW learning rate at `step` (the one the log shows)."""
    return cfg.lr * lr_factor(cfg, step)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16, as on AMD Zen 4 or Intel Cooper
    Lake, or AMX): there bf16 autocast runs the demo's pretraining steps 1.45x and its SFT steps
    1.3x faster than fp32 (benchmarks/bench_step_cost.py); elsewhere bf16 is emulated and slower."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or for "auto" where the hardware runs it fast: a GPU with bf16, a CPU with
    bf16 instructions (cpu_has_bf16)."""
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
    return None


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, trials: int = 5) -> float:
    """The best matmul throughput of a few short trials on this device: the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


class Optimizers:
    """Several optimizers stepped as one: Muon for the hidden matrices, AdamW for the rest."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict):
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW for everything (weight decay on matrices only), or with `optimizer: muon` Muon for the
    decoder layers' matrices (nanochat's split: Muon orthogonalises each matrix's update, which
    suits the hidden matrices; the embeddings, the head and the norms stay on AdamW).

    Only the parameters that require a gradient are trained: with LoRA, the adapters. LoRA's
    factors A (r, in) and B (out, r) stay on AdamW under Muon too: Muon would orthogonalise each
    thin factor on its own, which is not an orthogonalised update of their product B @ A, and
    LoRA's scale alpha / r and learning rates are set for AdamW (as peft and TRL train it).

    Each group keeps its peak learning rate as "initial_lr"; the loop scales it by the schedule.
    """
    def on_muon(name, p):
        return cfg.optimizer == "muon" and p.dim() == 2 and ".layers." in f".{name}" and not is_adapter_parameter(name)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if on_muon(n, p)]
    rest = [p for n, p in named if not on_muon(n, p)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over each parameter) is 3x faster than the per-tensor loop on a CPU too.
    optimizers = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                    fused=device.type in ("cuda", "cpu"))]
    if hidden:
        # Muon's update has a fixed scale per matrix, so no weight decay (as in nanochat).
        optimizers.append(torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=0.0))
    for o in optimizers:
        for group in o.param_groups:
            group["initial_lr"] = group["lr"]
    return Optimizers(*optimizers)


def start(settings: dict, inputs: list, extra: dict | None = None) -> tuple[TrainConfig, torch.device, str]:
    """Read the settings, join torchrun's process group, seed every RNG, pick the device, and name the run.

    The fingerprint that names the run covers the settings, `extra` (say, the
    model's shape) and the inputs' sizes and mtimes: a checkpoint of another run
    is not resumed.
    """
    import hashlib
    import json

    cfg = TrainConfig(**settings)
    distributed.init()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    stamp = [(str(p), os.path.getsize(p), os.path.getmtime(p)) for p in inputs]
    run = [dataclasses.asdict(cfg), extra, stamp]
    fingerprint = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()
    return cfg, pick_device(cfg.device), fingerprint


class StopRequested(SystemExit):
    """SIGTERM or SIGINT arrived and a checkpoint was written: exit with 128 + the signal number."""


class _SignalFlag:
    """Turns SIGTERM/SIGINT (SLURM preemption, Ctrl-C) into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# The checkpoints a stage keeps, newest first: resume tries each in turn.
CHECKPOINTS = ("last.pt", "prev.pt")


def save_checkpoint(ckpt_dir: Path, model, optimizer, step: int, history: list[dict], fingerprint: str) -> None:
    """Write ckpt_dir/last.pt, checksummed; the previous last.pt becomes prev.pt once the new one
    is verified on disk, so a corrupted last.pt still leaves a checkpoint to resume from.

    The state is serialised in memory first: its size is known, and the file is written with
    plain writes, where a full disk is an ENOSPC naming the file (torch.save to a path says
    "basic_ios::clear: iostream error").
    """
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "history": history,
        "fingerprint": fingerprint,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    last, prev = (ckpt_dir / name for name in CHECKPOINTS)
    # The oldest goes first, so the disk holds at most two checkpoints: last.pt and the new one.
    prev.unlink(missing_ok=True)

    def keep_last_as_prev():
        if last.exists():
            os.replace(last, prev)

    write_checked(last, buffer.getbuffer(), before_rename=keep_last_as_prev)
    fsync(ckpt_dir)


def read_checkpoint(path: Path) -> dict:
    """The state saved in `path`; CorruptFile if it is truncated, altered or does not load."""
    payload = read_checked(path)
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as exc:  # a checksum that matches makes this a bug of the writer, but say which file
        raise CorruptFile(f"{path}: its checksum matches but torch cannot load it: {exc}") from exc


def restore(state: dict, model, optimizer: Optimizers) -> tuple[int, list[dict]]:
    """Put model, optimizer and RNG states back as they were when `state` was saved."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["history"]


def set_aside(path: Path) -> Path:
    """Rename a corrupt file to NAME.corrupt-TIME: out of resume's way, but kept for a look."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"]


def write_log(history: list[dict], out_dir: Path) -> None:
    """train_log.csv and loss.png (train and validation loss against step)."""
    with atomic_path(out_dir / "train_log.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS + sorted({k for h in history for k in h} - set(LOG_FIELDS)))
        writer.writeheader()
        writer.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(out_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def resume(ckpt_dir: Path, model, optimizer, fingerprint: str) -> tuple[int, list[dict]]:
    """(step, history) of the newest good checkpoint of this run, or (0, []) when there is none.

    A checkpoint that fails its checksum or does not load is moved aside, named in a
    warning, and the one before it tried; nothing is restored from a bad one.
    """
    state, source, corrupt = None, None, []
    for path in (ckpt_dir / name for name in CHECKPOINTS):
        if not path.exists():
            continue
        try:
            state, source = read_checkpoint(path), path
            break
        except CorruptFile as exc:
            corrupt.append((path, exc))
    distributed.barrier()  # every process has read the checkpoints before one is moved
    if distributed.rank() == 0:
        for path, exc in corrupt:
            log.warning("corrupt checkpoint: %s; moved it to %s", exc, set_aside(path))
    if state is None:
        if corrupt:
            log.warning("no usable checkpoint in %s: starting from scratch", ckpt_dir)
        return 0, []
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it was written by a run with other settings or inputs", source)
        return 0, []
    step, history = restore(state, model, optimizer)
    log.info("resumed from %s at step %d", source, step)
    return step, history


def optimizer_step(model, wrapped, optimizer, data: BatchSource, compute_loss: LossFn, cfg: TrainConfig,
                   step: int, autocast) -> dict:
    """One optimizer step on the global batch of `step`: this process's rows, in micro-batches.

    Returns the step's log row: loss and metrics per unit of the global batch, lr, grad norm.
    """
    rank, world = distributed.rank(), distributed.world_size()
    device = next(model.parameters()).device
    per_rank = cfg.global_batch // world
    batch = data.global_batch(step)
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}  # (per_rank, ...)
    total = distributed.all_sum(float(data.count(mine)), device)  # loss units in the global batch
    lr, factor = learning_rate(cfg, step), lr_factor(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    loss_sum, metrics = 0.0, {}
    model.train()
    micro_steps = per_rank // cfg.micro_batch
    for m in range(micro_steps):
        micro = {k: v[m * cfg.micro_batch:(m + 1) * cfg.micro_batch].to(device) for k, v in mine.items()}
        # Gradients are all-reduced once, after the last micro-batch.
        with distributed.no_sync(wrapped, m < micro_steps - 1), autocast():
            part, part_metrics = compute_loss(wrapped, micro)
            # DDP averages gradients over processes; the loss is already normalised
            # by the global count, so scale it back to a sum.
            (part * world / total).backward()
        loss_sum += part.item()
        for k, v in part_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row = {"step": step + 1, "loss": distributed.all_sum(loss_sum, device) / total, "lr": lr, "grad_norm": grad_norm}
    if cfg.phases:
        row["phase"] = phase_at(cfg.phases, step)[0]
    return row | {k: distributed.all_sum(v, device) / total for k, v in metrics.items()}


def train(model: torch.nn.Module, data: BatchSource, loss_fn: LossFn, cfg: TrainConfig, *, out_dir, ckpt_dir,
          fingerprint: str = "", evaluate: Callable[[torch.nn.Module], dict] | None = None,
          flops_per_item: float = 0.0, tokens_per_item: float = 0.0, progress: bool = True) -> list[dict]:
    """Train `model` for cfg.steps, resuming from `ckpt_dir` if a checkpoint of the same run is there.

    `fingerprint` names the run (its settings and inputs): a checkpoint left by a
    different run is ignored. `flops_per_item` / `tokens_per_item` (per sequence
    of the global batch) feed the tokens/s and MFU figures. Returns the log
    history. Raises StopRequested after checkpointing when SIGTERM/SIGINT arrives.
    """
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    rank, world = distributed.rank(), distributed.world_size()
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ValueError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch × processes "
                         f"({cfg.micro_batch} × {world})")
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, cfg, device)
    if rank == 0:
        for folder in (out_dir, ckpt_dir):
            for stale in remove_stale_temps(folder):
                log.info("removed %s, a temporary file left by a killed run", stale)
    step, history = resume(ckpt_dir, model, optimizer, fingerprint)
    amp = autocast_dtype(cfg, device)
    peak = matmul_peak_flops(device, amp or torch.float32) if flops_per_item else 0.0
    wrapped = distributed.wrap(model, device)
    # Compiling the loss function, not just the model, lets the cross-entropy over the
    # vocabulary fuse with the lm_head instead of materialising float32 logits and
    # their gradient.
    compute_loss = torch.compile(loss_fn) if cfg.compile else loss_fn

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp else nullcontext()

    bar = tqdm(total=cfg.steps, initial=step, desc=out_dir.name, disable=not progress or rank != 0,
               dynamic_ncols=True)
    with _SignalFlag() as stop:
        while step < cfg.steps:
            t0 = time.perf_counter()
            row = optimizer_step(model, wrapped, optimizer, data, compute_loss, cfg, step, autocast)
            step += 1
            seconds = time.perf_counter() - t0
            row["tokens_per_s"] = tokens_per_item * cfg.global_batch / seconds
            row["mfu"] = flops_per_item * cfg.global_batch / seconds / (peak * world) if peak else None
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                row |= evaluate(model)
            history.append(row)
            # Every process stops at the same step if any of them got the signal.
            stopping = distributed.all_sum(float(stop.signum or 0), device)
            if rank == 0 and (step % cfg.checkpoint_every == 0 or stopping):
                save_checkpoint(ckpt_dir, model, optimizer, step, history, fingerprint)
                write_log(history, out_dir)
            # After the checkpoint: on a signal, the terminal may be gone.
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                            mfu=f"{row['mfu']:.1%}" if row["mfu"] else "-")
            if stopping:
                distributed.barrier()
                bar.close()
                signum = stop.signum or signal.SIGTERM
                log.warning("stopped by signal %d at step %d; the checkpoint in %s resumes it", signum, step, ckpt_dir)
                raise StopRequested(128 + signum)
    bar.close()
    if rank == 0:
        write_log(history, out_dir)
    return history


def finish(ckpt_dir) -> None:
    """Remove the checkpoints once the stage's final files are written. Corrupt ones set aside
    stay: the log names them, for a look at what damaged them."""
    if distributed.rank() == 0:
        for name in CHECKPOINTS:
            (Path(ckpt_dir) / name).unlink(missing_ok=True)
