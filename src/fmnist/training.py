"""The one training loop, as small named parts: data as tensors, a train step, an epoch, early stopping, the run.

`train(config) -> TrainResult` is the library entry point (a sweep tool can call it); the CLI is a thin layer
over it. Data lives in memory as tensors and batches are slices of a seeded permutation: no DataLoader.
Training never plots and never prints: it reports typed events (`fmnist.events`) to a `progress` callback and
returns a history. The schema and presets live in `fmnist.config`, the run folder's files in `fmnist.checkpoint`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist import checkpoint, data, devices, distributed, evaluate, events, hardware, model_card
from fmnist.config import DEFAULT_PRESET, PRESETS, TrainConfig, preset_expectations, resolve_config
from fmnist.errors import ConfigError
from fmnist.fast_step import MLPStep
from fmnist.models import (
    CUSTOM,
    check_network,
    check_reloadable,
    check_trust,
    count_parameters,
    create_model,
    import_network,
    network_target,
)

__all__ = ["DEFAULT_PRESET", "PRESETS", "StopRequest", "TrainConfig", "TrainResult", "learning_rate",
           "preset_expectations", "resolve_config", "train"]
log = logging.getLogger(__name__)
Progress = Callable[[events.Event], None]


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimiser step `step` of `total_steps`: a pure function, so resume needs no state."""
    if config.schedule == "constant":
        return config.lr
    warmup_steps = int(config.warmup * total_steps)
    if step < warmup_steps:
        start = config.lr / 25 if config.schedule == "onecycle" else 0.0
        return start + (config.lr - start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * max(0.0, 1.0 - progress)  # onecycle: linear decay to zero after the warm-up


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively (`devices.supports_bf16`), else "fp32"."""
    if precision != "auto":
        return precision
    return "bf16" if devices.supports_bf16(device or torch.device("cpu")) else "fp32"


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser; batch-norm and bias parameters get no weight decay (decaying them only hurts)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True: one kernel per step instead of a Python loop over parameters; measured 1.4 s vs 2.2 s per
    # epoch for the batch-32 tutorial MLP on 2 cores, where optimiser overhead dominates.
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, fused=True)
    # eps=1e-7 (and RMSprop's rho 0.9) are Keras' defaults, so the classic presets match the Keras numbers.
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, alpha=0.9, eps=1e-7, momentum=config.momentum)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=config.lr, eps=1e-7, fused=True)


def normalization_meta(config: TrainConfig) -> checkpoint.Normalization:
    """How pixels are scaled before the model: stored in model.json so `predict` can repeat it."""
    mean, std = data.normalization(config.normalize == "standard")
    return checkpoint.Normalization(scale=1 / 255, mean=mean, std=std)


@dataclass
class TrainResult:
    """What `train` returns: the trained model (eval mode), per-epoch history, final metrics, run folder."""

    model: nn.Module
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    config: TrainConfig
    run_dir: Path | None = None
    interrupted: bool = False
    calibration: checkpoint.Calibration | None = None

    @property
    def classifier(self):
        """The trained model as a `fmnist.Classifier`, in memory: the same answers as `Classifier.load(run_dir)`
        (same weights, normalisation and calibration temperature), without the round trip through the disk."""
        from fmnist.predict import Classifier

        return Classifier(self.model, run_meta(self.config, self.metrics, self.calibration))


class StopRequest:
    """Ask a training to stop at the next step boundary, keeping its last complete epoch (as Ctrl-C does).

    Pass one to `train(stop=...)` and call `request()` from anywhere (another thread, a sweep finishing a trial
    that was stopped early). While training runs, Ctrl-C and SIGTERM request a stop through it; a second signal
    interrupts at once. The handler only sets a flag, so a signal never lands between a checkpoint's two files.
    """

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    @contextlib.contextmanager
    def on_signals(self) -> Iterator[StopRequest]:
        """Route SIGINT and SIGTERM to `request` while the block runs (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class _Stopped(Exception):
    """Raised inside the loop at a safe point once a stop was requested."""


@contextlib.contextmanager
def torch_settings(threads: int | None) -> Iterator[None]:
    """Training's process-wide torch settings for the duration of a block, restored afterwards.

    Weights fed by always-black border pixels get zero gradients, so Adam's moment estimates decay into subnormal
    floats, which x86 processes 10-100x slower: the fused Adam step took 1 ms instead of 0.1 ms on the classic MLP.
    Flushing them to zero (values under 1e-38) changes no result that matters.
    """
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def default_run_dir(preset: str, root: str | Path = "runs") -> Path:
    """`runs/<preset>-<YYYYmmdd-HHMMSS>`."""
    return Path(root) / f"{preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------------------------- data
def load_splits(config: TrainConfig, arrays=None, data_dir=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The train, test and (when configured) validation arrays that `config` describes."""
    train_set, test_set = arrays if arrays is not None else data.load_data(data_dir)
    if config.split == "pooled":
        train_set, test_set = data.pooled_split(train_set, test_set, config.pooled_test_fraction, config.seed)
    if config.train_subset:
        train_set = (train_set[0][:config.train_subset], train_set[1][:config.train_subset])
    if config.test_subset:
        test_set = (test_set[0][:config.test_subset], test_set[1][:config.test_subset])
    splits = {"train": train_set, "test": test_set}
    if config.validation:
        if config.validation >= len(train_set[1]):
            raise ConfigError(f"validation {config.validation} leaves no training images (of {len(train_set[1])})")
        splits["train"], splits["val"] = data.validation_split(*train_set, size=config.validation, seed=config.seed)
    return splits


def test_split(config: TrainConfig, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """The test images a run was measured on (its split and test subset; the training subset does not matter)."""
    return load_splits(config.model_copy(update={"train_subset": None}), data_dir=data_dir)["test"]


@dataclass
class Tensors:
    """A run's images as model inputs and its labels as int64 tensors; validation is None without a split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    seconds: float


def prepare_tensors(config: TrainConfig, arrays, data_dir, device: torch.device) -> Tensors:
    """Load, split and preprocess; the training set moves to the device once (188 MB as float32)."""
    started = time.perf_counter()
    splits = load_splits(config, arrays, data_dir)
    mean, std = data.normalization(config.normalize == "standard")

    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if name not in splits:
            return None, None
        images, labels = splits[name]
        x = data.preprocess(images, mean, std, channels_last=config.channels_last)
        return x, torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = pair("train")
    x_test, y_test = pair("test")
    x_val, y_val = pair("val")
    return Tensors(x_train.to(device), y_train.to(device), x_test, y_test, x_val, y_val,
                   time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class Loop:
    """What every step needs: the model (and its DDP wrapper), optimiser, generator, schedule and precision."""

    config: TrainConfig
    model: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    group: distributed.Context | None
    device: torch.device
    precision: str
    steps_per_epoch: int
    fill: float  # a black pixel after normalisation: what shifts and erasing fill with
    fast: MLPStep | None = None  # the autograd-free step of the classic MLPs, where it computes the same thing

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


def build_loop(config: TrainConfig, train_size: int, group, device: torch.device,
               network: nn.Module | None = None) -> Loop:
    """Model, optimiser and seeded generator; the same seed gives the same weights and batches. `network` is a
    model the caller built (`train(model=...)`), trained as it is; otherwise the config's architecture is built
    after seeding."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if network is None:
        architecture = config.architecture()
        network = create_model(architecture["name"], **architecture["config"])
    model = network.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    trained = distributed.wrap(group, model)  # DDP under torchrun: rank 0's weights now, averaged gradients
    mean, std = data.normalization(config.normalize == "standard")
    precision = resolve_precision(config.precision, device)
    loop = Loop(config, model, trained, optimizer, generator, group, device, precision,
                math.ceil(train_size / config.batch_size), (0.0 - mean) / std)
    augments = bool(config.flip or config.translate or config.erase)
    if MLPStep.applies(model, optimizer, device, precision, group, config.channels_last, augments):
        loop.fast = MLPStep(model, optimizer, config.label_smoothing)
    return loop


def train_step(loop: Loop, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on one batch: returns (loss, logits), both still on the device."""
    if loop.fast is not None:
        return loop.fast(inputs, targets, lr)
    config = loop.config
    for param_group in loop.optimizer.param_groups:
        param_group["lr"] = lr
    if config.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=loop.precision == "bf16"):
        logits = loop.trained(inputs)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loop.optimizer.step()
    return loss, logits


def _batch(loop: Loop, tensors: Tensors, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (augmented) inputs and targets of one global batch, this rank's share of them."""
    config = loop.config
    index = index.to(loop.device)  # drawn on the CPU generator: the same batches on every device
    inputs, targets = tensors.x_train.index_select(0, index), tensors.y_train.index_select(0, index)  # half x[i]'s cost
    if config.flip or config.translate or config.erase:  # the whole global batch on every rank: generators in step
        inputs = data.augment_batch(inputs, loop.generator, config.flip, config.translate, config.erase, loop.fill)
    return distributed.shard(loop.group, inputs, targets)


class EpochTally:
    """Loss and accuracy of an epoch so far, kept on the device: per step, the batch's loss goes into one slot and
    its predicted classes and targets into another (three small copies, no reduction); sums happen only when
    progress is reported. At batch 32 the per-step sums were a sixth of the MLP's step."""

    def __init__(self, steps: int, images: int, device: torch.device):
        self.losses = torch.zeros(steps, device=device)
        self.sizes: list[int] = []
        self.predicted = torch.empty(images, dtype=torch.int64, device=device)
        self.targets = torch.empty(images, dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        count = len(targets)
        self.losses[step] = loss.detach()
        torch.argmax(logits.detach(), 1, out=self.predicted[self.seen:self.seen + count])
        self.targets[self.seen:self.seen + count] = targets
        self.sizes.append(count)
        self.seen += count

    def totals(self) -> tuple[float, int, int]:
        """(summed loss over images, correct, images) so far."""
        sizes = torch.tensor(self.sizes, dtype=self.losses.dtype, device=self.losses.device)
        loss = float(torch.dot(self.losses[:len(sizes)], sizes))
        correct = int((self.predicted[:self.seen] == self.targets[:self.seen]).sum())
        return loss, correct, self.seen


def run_epoch(loop: Loop, tensors: Tensors, epoch: int, stop: StopRequest, emit: Progress) -> dict[str, Any]:
    """Train one epoch (0-based `epoch`); return its loss, accuracy, last lr and seconds."""
    loop.model.train()
    started = time.perf_counter()
    group = loop.group
    tally = EpochTally(loop.steps_per_epoch, len(tensors.y_train), loop.device)
    batches = data.iterate_batches(len(tensors.y_train), loop.config.batch_size, loop.generator)
    for step, index in enumerate(batches):
        if group is None and stop.requested:
            raise _Stopped
        if group is not None and len(index) < group.world:
            continue  # a last batch too small to give every rank an image (all ranks skip it)
        inputs, targets = _batch(loop, tensors, index)
        lr = learning_rate(loop.config, epoch * loop.steps_per_epoch + step, loop.total_steps)
        loss, logits = train_step(loop, inputs, targets, lr)
        tally.add(step, loss, logits, targets)
        if step % 20 == 0 or step == loop.steps_per_epoch - 1:
            total_loss, total_correct, total_seen, stops = distributed.sum_across(
                group, [*tally.totals(), stop.requested])
            if stops:
                raise _Stopped  # on every rank at the same step
            emit(events.Step(epoch + 1, step + 1, total_loss / total_seen, total_correct / total_seen))
    seconds = time.perf_counter() - started
    total_loss, total_correct, total_seen = distributed.sum_across(group, list(tally.totals()))
    distributed.sync_buffers(group, loop.model)
    return {"epoch": epoch + 1, "loss": total_loss / total_seen, "accuracy": total_correct / total_seen,
            "lr": loop.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}


PROBE_WARMUP_STEPS = 6  # the first steps pay for oneDNN's kernel selection and allocations: not counted
PROBE_STEPS = 10
BUDGET_SHARE = 0.85  # of the budget planned for the epochs: on a shared 2-core VM epochs varied by up to 20%
REPLAN_TOLERANCE = 0.15  # re-plan after the first epoch when it ran this much faster or slower than the probe said


def replan_budget(loop: Loop, budget: dict[str, Any], first_epoch_seconds: float, run_dir: Path | None) -> None:
    """Fit the epochs again once the first real epoch is timed.

    A probe of a few steps can be off by 1.5x (a cold process, other jobs on a shared machine); a whole epoch,
    validation included, is the better measure. The remaining epochs are re-sized so that training still ends
    inside the budget, the one-cycle schedule follows the new length (the first epoch is still in its warm-up, so
    only the warm-up's slope changes), and `config.json` and the plan in `metrics.json` say what happened.
    """
    estimate = budget["epoch_seconds_estimate"]
    if abs(first_epoch_seconds - estimate) <= REPLAN_TOLERANCE * estimate:
        return
    left = budget["seconds"] * BUDGET_SHARE - budget["probe_seconds"] - first_epoch_seconds
    epochs = 1 + max(0, int(left // first_epoch_seconds))
    if loop.group is not None:
        epochs = max(1, int(distributed.sum_across(loop.group, [epochs])[0] // loop.group.world))
    if epochs == loop.config.epochs:
        return
    log.info("budget: the first epoch took %.1f s (the probe said %.1f s): %d epochs instead of %d",
             first_epoch_seconds, estimate, epochs, loop.config.epochs)
    budget["replanned"] = {"after_epoch": 1, "epoch_seconds": round(first_epoch_seconds, 2),
                           "epochs_from_probe": loop.config.epochs}
    budget["epochs"] = epochs
    loop.config = loop.config.model_copy(update={"epochs": epochs})
    if run_dir is not None:
        checkpoint.write_config(run_dir, loop.config)


def fit_to_budget(config: TrainConfig, tensors: Tensors, group, device: torch.device,
                  network: nn.Module | None = None) -> tuple[TrainConfig, dict]:
    """The config with as many epochs as fit `config.budget` seconds on this machine, and what was measured.

    A few real training steps run on a throwaway copy of the model (same architecture, batch, precision and
    augmentation; a copy of `network` when the caller passed one), then one validation pass is timed; the global
    RNG is restored, so the run itself draws exactly what it would without a budget. Ranks under torchrun agree on
    the mean of their estimates.
    """
    started = time.perf_counter()
    rng = torch.get_rng_state()
    probe = build_loop(config, len(tensors.y_train), None, device,
                       copy.deepcopy(network) if network is not None else None)
    batches = iter(data.iterate_batches(len(tensors.y_train), config.batch_size, torch.Generator().manual_seed(0)))
    step_times = []
    for _ in range(PROBE_WARMUP_STEPS + PROBE_STEPS):
        index = next(batches, None)
        if index is None:
            batches = iter(data.iterate_batches(len(tensors.y_train), config.batch_size))
            index = next(batches)
        step_started = time.perf_counter()
        loss, _ = train_step(probe, *_batch(probe, tensors, index), config.lr / 25)
        loss.item()  # wait for the step (asynchronous on a GPU)
        step_times.append(time.perf_counter() - step_started)
    step_seconds = float(np.median(step_times[PROBE_WARMUP_STEPS:]))  # the median: one slow step is noise
    validation_seconds = 0.0
    if tensors.x_val is not None or config.track_test:
        timed_from = time.perf_counter()
        evaluate.predict_logits(probe.model, tensors.x_val if tensors.x_val is not None else tensors.x_test)
        validation_seconds = (time.perf_counter() - timed_from) * (1 + config.track_test)
    torch.set_rng_state(rng)
    epoch_seconds = probe.steps_per_epoch * step_seconds + validation_seconds
    left = config.budget * BUDGET_SHARE - (time.perf_counter() - started)
    epochs, too_long = int(left // epoch_seconds), int(epoch_seconds > config.budget * BUDGET_SHARE)
    if group is not None:  # every rank decides alike
        epochs, too_long = distributed.sum_across(group, [epochs, too_long])
        epochs = int(epochs // group.world)
    epochs = max(1, epochs)  # at least one when an epoch fits: the probe's own time is ours, not the user's
    if too_long:
        need = math.ceil((time.perf_counter() - started + epoch_seconds) / BUDGET_SHARE)
        raise ConfigError(f"budget {config.budget:g} s is too short for one epoch here (about {epoch_seconds:.0f} s "
                          f"each); give at least --budget {need}s, or train on fewer images (--train-subset)")
    plan = {"seconds": config.budget, "epochs": epochs, "step_ms": round(step_seconds * 1000, 2),
            "epoch_seconds_estimate": round(epoch_seconds, 2), "probe_seconds": round(time.perf_counter() - started, 2)}
    return config.model_copy(update={"epochs": epochs}), plan


class EarlyStopping:
    """`stop_at` (a target for the monitored metric) and `patience` (epochs without improvement, keeping the
    best weights): says why training should stop, or None."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.best_value: float | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.config.monitor.endswith("loss") else value > than

    def update(self, row: dict[str, Any], model: nn.Module) -> str | None:
        """Take an epoch's history row; return the reason to stop now, or None."""
        config, epoch = self.config, row["epoch"]
        value = row.get(config.monitor)
        if value is None:
            return None
        reason = None
        if config.patience:
            if self.best_value is None or self._better(value, self.best_value):
                self.best_value, self.best_epoch = value, epoch
                self.best_state = copy.deepcopy(model.state_dict())
            elif epoch - self.best_epoch >= config.patience:
                reason = (f"{config.monitor} did not improve for {config.patience} epochs; "
                          f"restored the best weights from epoch {self.best_epoch}")
        if config.stop_at is not None and (value == config.stop_at or self._better(value, config.stop_at)):
            reason = f"{config.monitor} {value:.4f} reached the target {config.stop_at} at epoch {epoch}"
        return reason

    def restore_best(self, model: nn.Module, epochs_run: int) -> None:
        """Load the best epoch's weights, when patience kept some and a later epoch is loaded now."""
        if self.best_state is not None and self.best_epoch != epochs_run:
            model.load_state_dict(self.best_state)


@dataclass
class RunState:
    """Where a run stands: the history so far, training time, why it stopped (if it did)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    stop_reason: str | None = None
    interrupted: bool = False

    @property
    def epoch(self) -> int:
        return len(self.history)


def _end_of_epoch(loop: Loop, tensors: Tensors, state: RunState, row: dict[str, Any], run_dir: Path | None) -> None:
    """Validation (and test, when tracked) metrics for the row, the history, and the resume checkpoint."""
    state.train_seconds += row["seconds"]
    row["train_seconds"] = round(state.train_seconds, 3)
    if tensors.x_val is not None:
        row["val_loss"], row["val_accuracy"] = evaluate.loss_and_accuracy(loop.model, tensors.x_val, tensors.y_val)
    if loop.config.track_test:
        row["test_loss"], row["test_accuracy"] = evaluate.loss_and_accuracy(loop.model, tensors.x_test,
                                                                            tensors.y_test)
    state.history.append(row)
    if run_dir is not None:
        checkpoint.save_resume(run_dir, loop.model, loop.optimizer, loop.generator,
                               {"epoch": state.epoch, "history": state.history,
                                "train_seconds": state.train_seconds})


def run_epochs(loop: Loop, tensors: Tensors, state: RunState, run_dir: Path | None, stop: StopRequest,
               emit: Progress, budget: dict[str, Any] | None = None) -> None:
    """Epochs until the schedule ends, early stopping says so, or a stop is requested (keeping the last
    complete epoch's weights). With a time `budget` planned for this run, the first epoch re-sizes the rest."""
    stopping = EarlyStopping(loop.config)
    last_good = copy.deepcopy(loop.model.state_dict())
    try:
        while state.epoch < loop.config.epochs:
            epoch, started = state.epoch, time.perf_counter()
            emit(events.EpochStart(epoch + 1))
            row = run_epoch(loop, tensors, epoch, stop, emit)
            _end_of_epoch(loop, tensors, state, row, run_dir)
            if budget is not None and epoch == 0:  # the whole epoch: steps, validation, checkpoint
                replan_budget(loop, budget, time.perf_counter() - started, run_dir)
            last_good = copy.deepcopy(loop.model.state_dict())
            state.stop_reason = stopping.update(row, loop.model)
            emit(events.EpochEnd(row["epoch"], row))
            if state.stop_reason:
                break
            if distributed.sum_across(loop.group, [stop.requested])[0]:
                raise _Stopped
    except (_Stopped, KeyboardInterrupt):
        state.interrupted = True
        loop.model.load_state_dict(last_good)
        log.warning("interrupted; keeping the last complete epoch (%d)", state.epoch)
    if state.stop_reason:
        stopping.restore_best(loop.model, state.epoch)
    loop.model.eval()


def train(
    config: TrainConfig | dict[str, Any] | str | None = None,
    *,
    out_dir: str | Path | None = None,
    arrays: tuple | None = None,
    data_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
    stop: StopRequest | None = None,
    model: nn.Module | str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    trust_code: bool = False,
) -> TrainResult:
    """Train a model; with `out_dir`, write the run folder and a resume checkpoint after every epoch.

    `config` is a TrainConfig, a preset name ("fast"), a dict of TrainConfig fields (a `preset` key picks the
    base), or None for the default preset. `arrays` passes `((x_train, y_train), (x_test, y_test))` instead of
    loading the dataset.
    `resume` continues a run folder from its last complete epoch (its stored config wins). Ctrl-C, SIGTERM or
    `stop.request()` stop after restoring the last complete epoch and saving it; `result.interrupted` is then True.
    Under `torchrun` it trains data-parallel (see `fmnist.distributed`): `batch_size` is the global batch, and
    only rank 0 reports progress and writes files. `device` is "cpu" (like torch, the library computes on the CPU
    unless told otherwise; the CLI's default is "auto"), "auto", "cuda" or "cuda:N" (see `fmnist.devices`). It is
    where the work runs, not part of the run's config, so a run trained on a GPU resumes on a CPU and the other
    way round. The returned model is on the CPU, like a loaded one. Torch's thread count and denormal flushing
    are set for the run and restored afterwards.

    `model` trains a network of your own with all of the above: any `torch.nn.Module` mapping (N, 1, 28, 28)
    float images to (N, 10) logits, given as an instance (trained in place and returned as `result.model`; its
    weights are whatever you initialised, the seed drives batches, augmentation and dropout) or as an import path
    "package.module:Class" (built with `model_kwargs` after seeding: same seed, same weights). The run records the
    class's import path and `model_kwargs` (JSON values only) as the config's `custom` and `custom_kwargs`, so with
    `out_dir` it must be importable again: a class defined in `__main__` (a notebook or script) is refused before
    training, and an instance must be what `Class(**model_kwargs)` builds. Loading such a run imports that module,
    which runs its code, so it needs `trust_code=True` (`Classifier.load`, `resume` here); so does a config that
    names its own network (`model="custom"`: it may come from a file). A network passed as `model=` is trusted.
    """
    if resume is not None:
        out_dir = Path(resume)
        config = checkpoint.read_config(out_dir)
    elif config is None or isinstance(config, str):
        config = resolve_config(config or DEFAULT_PRESET)
    elif isinstance(config, dict):
        overrides = dict(config)
        config = resolve_config(overrides.pop("preset", DEFAULT_PRESET), overrides)
    else:
        config.validate()
    config, network = own_network(config, model, model_kwargs, trust_code, out_dir, resume)
    where = devices.resolve_device(device, devices.node_position())
    group = distributed.setup(config.threads, where)
    try:
        with torch_settings(config.threads), (stop or StopRequest()).on_signals() as stopper:
            return _train(config, Path(out_dir) if out_dir is not None else None, arrays, data_dir,
                          resume is not None, progress, group, where, stopper, network)
    finally:
        distributed.teardown(group)


def own_network(config: TrainConfig, model: nn.Module | str | None, model_kwargs: dict[str, Any] | None,
                trust_code: bool, out_dir: str | Path | None, resume: str | Path | None
                ) -> tuple[TrainConfig, nn.Module | None]:
    """The config that records your own network (see `train`), and the instance to train when one was passed.
    Every refusal (untrusted code, an import that fails, a wrong output shape, a class a run folder could not
    import again) comes here, before any data is loaded."""
    if model is None and model_kwargs is not None:
        raise ConfigError("model_kwargs= goes with model=; a config names its network's arguments in custom_kwargs")
    if model is None and config.model != CUSTOM:
        return config, None
    network = None
    if model is None:  # the config names the code: it may come from a file
        check_trust(config.custom, f"run folder {resume}" if resume is not None else "the config", trust_code)
    elif resume is not None:
        raise ConfigError("resume rebuilds the network its run folder names; do not pass model=")
    elif isinstance(model, (nn.Module, str)):
        network = model if isinstance(model, nn.Module) else None
        config = TrainConfig(**{**config.to_dict(), "model": CUSTOM, "custom_kwargs": model_kwargs or {},
                                "custom": network_target(model) if network is not None else model})
    else:
        raise ConfigError(f"model= takes a torch.nn.Module or an import path 'package.module:Class', not a "
                          f"{type(model).__name__}")
    if network is not None:
        check_network(network, config.custom)
    else:
        import_network(config.custom)  # fails before the data loads; build_loop builds it after seeding
    if out_dir is not None:
        check_reloadable(config.custom, network, config.custom_kwargs)
    return config, network


def _train(config: TrainConfig, run_dir: Path | None, arrays, data_dir, resuming: bool, progress: Progress | None,
           group, device: torch.device, stop: StopRequest, network: nn.Module | None = None) -> TrainResult:
    distributed.check_batch(group, config.batch_size)
    main = group is None or group.main
    emit = (progress if main else None) or (lambda event: None)
    tensors = prepare_tensors(config, arrays, data_dir, device)
    budget = None
    if config.budget and not resuming:  # a resumed run keeps the epochs its budget chose
        config, budget = fit_to_budget(config, tensors, group, device, network)
        log.info("budget %.0f s: %d epochs of about %.1f s", budget["seconds"], budget["epochs"],
                 budget["epoch_seconds_estimate"])
    loop = build_loop(config, len(tensors.y_train), group, device, network)
    if main and not resuming:
        warn_if_too_short(config, loop.steps_per_epoch * config.epochs)
    state = RunState()
    if resuming:  # every rank reads the same checkpoint
        saved = checkpoint.load_resume(run_dir, loop.model, loop.optimizer, loop.generator)
        state.history, state.train_seconds = saved["history"], saved["train_seconds"]
        log.info("resuming %s after epoch %d", run_dir, state.epoch)
    if not main:
        run_dir = None  # only rank 0 writes
    if resuming or run_dir is None:
        result = _fit_and_write(loop, tensors, state, budget, run_dir, stop, emit)
    else:  # a new folder is written in place; one holding a run (--overwrite) is replaced whole, at the end,
        # by one built beside it (checkpoint.building), so a failed or killed run leaves the old one intact
        with checkpoint.building(run_dir) as folder:
            checkpoint.write_config(folder, config)
            result = _fit_and_write(loop, tensors, state, budget, folder, stop, emit)
        result.run_dir = run_dir
    emit(events.End(result.metrics, result.run_dir))
    return result


MIN_ONECYCLE_STEPS = 100  # `fast` on 3,000 images for 2 epochs (24 steps at lr 0.2) ended at chance, 8.9%


def warn_if_too_short(config: TrainConfig, total_steps: int) -> None:
    """Say so when a warm-up schedule has too few steps to settle: a high peak learning rate reached within a
    handful of steps can leave the network at chance, and nothing else would tell."""
    if config.schedule == "onecycle" and total_steps < MIN_ONECYCLE_STEPS and config.lr >= 0.05:
        log.warning("only %d optimiser steps for a one-cycle schedule peaking at lr %g: such short runs can end at "
                    "chance; train more epochs or images, or lower --lr (e.g. --lr %g)", total_steps, config.lr,
                    config.lr / 4)


def _fit_and_write(loop: Loop, tensors: Tensors, state: RunState, budget: dict | None, run_dir: Path | None,
                   stop: StopRequest, emit: Progress) -> TrainResult:
    """The epochs, calibration and final measurements, and the run folder's files when there is one."""
    config = loop.config
    emit(events.Start(config, loop.steps_per_epoch, config.epochs, count_parameters(loop.model),
                      len(tensors.y_train), state.epoch, devices.describe(loop.device),
                      loop.group.world if loop.group else 1, loop.precision, run_dir))
    run_epochs(loop, tensors, state, run_dir, stop, emit, budget)
    config = loop.config  # a budget may have re-sized the epochs after the first one
    calibration = calibrate(loop.model, tensors.x_val, tensors.y_val)
    metrics = final_metrics(loop, tensors, state, calibration)
    if budget is not None:
        metrics["budget"] = budget
    model = loop.model.cpu()
    if run_dir is not None:
        write_run(run_dir, model, config, state.history, metrics, calibration)
    return TrainResult(model, state.history, metrics, config, run_dir, state.interrupted, calibration)


def final_metrics(loop: Loop, tensors: Tensors, state: RunState, calibration: checkpoint.Calibration) -> dict:
    """The test set measured once, at the end, plus what describes the run (time, size, device, precision)."""
    config, model = loop.config, loop.model
    logits = evaluate.predict_logits(model, tensors.x_test)
    test_loss, test_accuracy = evaluate.logit_scores(logits, tensors.y_test)
    metrics: dict[str, Any] = {
        "preset": config.preset, "seed": config.seed, "test_accuracy": test_accuracy, "test_loss": test_loss,
        "epochs_run": state.epoch, "epochs_planned": config.epochs, "train_seconds": round(state.train_seconds, 3),
        "data_seconds": round(tensors.seconds, 3), "parameters": count_parameters(model),
        "test_size": len(tensors.y_test), "stop_reason": state.stop_reason, "interrupted": state.interrupted,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if calibration.fitted:  # the loss of the probabilities `evaluate` and `predict` report
        metrics["test_loss_calibrated"], _ = evaluate.logit_scores(logits, tensors.y_test, calibration.temperature)
    if config.tta:
        metrics["test_loss_tta"], metrics["test_accuracy_tta"] = evaluate.loss_and_accuracy(
            model, tensors.x_test, tensors.y_test, tta=True)
    # Per-class scores of the plain test predictions, the one place they are computed for a run: metrics.json and
    # the model card (README.md) both show these numbers.
    report = evaluate.classification_report(F.softmax(logits, 1).numpy(), tensors.y_test.numpy())
    metrics.update(train_size=len(tensors.y_train), macro_f1=report["macro_f1"], per_class=report["per_class"])
    if state.history and "val_accuracy" in state.history[-1]:
        metrics["val_accuracy"], metrics["val_loss"] = state.history[-1]["val_accuracy"], state.history[-1]["val_loss"]
    metrics.update(device=devices.describe(loop.device), processes=loop.group.world if loop.group else 1,
                   precision=loop.precision, cpu=hardware.cpu_model(), cpu_class=devices.cpu_class(),
                   calibration=calibration.model_dump(exclude_none=True))
    return metrics


def calibrate(model: nn.Module, x_val: torch.Tensor | None, y_val: torch.Tensor | None) -> checkpoint.Calibration:
    """Temperature scaling on the validation split, with the expected calibration error before and after.

    Also records the 1st percentile of the top logit on held-out images: inputs scoring below it look unlike
    anything the model was trained on (`predict` says so). Without a validation split nothing is fitted.
    """
    if x_val is None or len(x_val) < 100:
        return checkpoint.Calibration(
            fitted=False, temperature=1.0, note="no validation split: train with --validation 5000 to calibrate "
                                                "confidence")
    logits = evaluate.predict_logits(model, x_val)
    temperature = evaluate.fit_temperature(logits, y_val)
    before = F.softmax(logits, 1).numpy()
    after = F.softmax(logits / temperature, 1).numpy()
    labels = y_val.numpy()
    return checkpoint.Calibration(
        fitted=True, temperature=temperature, images=len(labels),
        ece_before=evaluate.expected_calibration_error(before, labels),
        ece_after=evaluate.expected_calibration_error(after, labels),
        unusual_logit_threshold=float(np.percentile(logits.max(1).values.numpy(), 1)))


def run_meta(config: TrainConfig, metrics: dict[str, Any],
             calibration: checkpoint.Calibration | None = None) -> checkpoint.RunMeta:
    """What model.json says about a trained model: architecture, classes, preprocessing, calibration, metrics."""
    calibration = calibration or checkpoint.Calibration(**metrics.get("calibration", {}))
    return checkpoint.RunMeta(
        architecture=config.architecture(), preset=config.preset, classes=list(data.CLASS_NAMES),
        normalization=normalization_meta(config), channels_last=config.channels_last, calibration=calibration,
        metrics={key: value for key, value in metrics.items() if key != "calibration"}, config=config.to_dict(),
        created=checkpoint.now())


def write_run(run_dir: Path, model: nn.Module, config: TrainConfig, history: list[dict[str, Any]],
              metrics: dict[str, Any], calibration: checkpoint.Calibration | None = None) -> None:
    """The run folder: history.csv, metrics.json, the model card (README.md) and the model pair, each written
    atomically. An earlier model.json (a resumed run's last save) goes first and the new one is written last, so a
    kill between the writes leaves no model rather than new weights, metrics or card under old metadata."""
    meta = run_meta(config, metrics, calibration)
    (run_dir / checkpoint.META_FILE).unlink(missing_ok=True)
    checkpoint.write_history(run_dir, history)
    checkpoint.write_metrics(run_dir, metrics)
    model_card.write(run_dir, meta, metrics, history)
    checkpoint.save_model(model, run_dir, meta)
