"""What training reports while it runs: small typed events passed to a `progress` callback.

Consumers (the CLI's printer, sweeps, notebooks) match on the class, e.g. `isinstance(event, EpochEnd)`, and read
typed fields instead of dictionary keys. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fmnist.config import TrainConfig


@dataclass(frozen=True)
class Start:
    """Training is about to run its first step (or its first step after resuming)."""

    config: TrainConfig
    steps_per_epoch: int
    epochs: int
    parameters: int
    train_size: int
    start_epoch: int
    device: str
    processes: int
    precision: str
    run_dir: Path | None = None  # the folder being written now (a staging folder beside the run when overwriting)


@dataclass(frozen=True)
class EpochStart:
    epoch: int  # 1-based


@dataclass(frozen=True)
class Step:
    """Running means over the epoch so far, every few steps."""

    epoch: int
    step: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class EpochEnd:
    """An epoch finished; `row` is its history.csv row (loss, accuracy, lr, seconds, val_* and test_* if any)."""

    epoch: int
    row: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class End:
    """Training and the final measurements are done (and the run folder, if any, is in its final place)."""

    metrics: dict[str, Any]
    run_dir: Path | None = None  # the finished run folder; None when training wrote none


Event = Start | EpochStart | Step | EpochEnd | End


@dataclass(frozen=True)
class TrialStart:
    """A sweep trial started with these drawn settings."""

    trial: str
    params: dict[str, Any]


@dataclass(frozen=True)
class TrialResult:
    """A sweep trial reported an epoch's value of the sweep's metric."""

    trial: str
    epoch: int | None
    metric: str
    value: float


@dataclass(frozen=True)
class TrialError:
    """A sweep trial failed (its error is in sweep.json)."""

    trial: str


SweepEvent = TrialStart | TrialResult | TrialError
