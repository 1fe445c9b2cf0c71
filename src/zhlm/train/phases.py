"""Staged pretraining (`pretrain.phases`): a run cut into phases, each with its own steps,
learning-rate shape and data mixture, MiniCPM-style: a long stable phase on every source,
then a short decay phase weighted toward the better ones.

The loop takes each step's learning rate from its phase (zhlm.train.loop.lr_factor), and
MixtureWindows (zhlm.train.batches) each step's windows from its phase's mixture. Both depend
only on the step, so a run resumed in any phase, or exactly at a boundary, continues as an
uninterrupted one; the optimizer's state carries over from phase to phase.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Phase:
    """One phase: the schema's `phase` definition, with its defaults.

    Its learning rate follows the stage's `schedule` shapes over the phase's own steps: a linear
    warmup from the phase's start, then for wsd constant with a linear decay over its last
    decay_fraction (0: a stable phase, 1: a decay phase), or for cosine a cosine down to the
    stage's min_lr_ratio. The peak is the stage's lr (and muon_lr).
    """
    steps: int
    mixture: dict[str, float] | None = None  # weight per source; None: every source in proportion to its tokens
    warmup_steps: int = 0
    schedule: str = "wsd"
    decay_fraction: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.schedule!r}: cosine or wsd")


def phase_at(phases: Sequence[Phase], step: int) -> tuple[int, int]:
    """(index of the phase that `step` (0-based) falls in, the step's index within that phase)."""
    start = 0
    for k, phase in enumerate(phases):
        if step < start + phase.steps or k == len(phases) - 1:
            return k, step - start
        start += phase.steps
    raise ValueError("no phases")
