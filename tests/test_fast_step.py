"""The classic MLPs' autograd-free step (fmnist.fast_step) computes what the plain step computes."""

from __future__ import annotations

import pytest
import torch

from fmnist import data, training
from fmnist.config import resolve_config
from fmnist.fast_step import MLPStep

CPU = torch.device("cpu")


def batches(count: int = 300, batch: int = 32):
    """A few hundred generated images as the model sees them, and labels, in batches of `batch`."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8).numpy()
    inputs = data.preprocess(images, *data.normalization(False))
    labels = torch.arange(count) % 10
    return [(inputs[i:i + batch], labels[i:i + batch]) for i in range(0, count, batch)]


def trained_pair(preset: str, **overrides):
    """Two loops with the same seed trained on the same batches, one with the fast step, one without."""
    config = resolve_config(preset, overrides)
    fast = training.build_loop(config, 300, None, CPU)
    plain = training.build_loop(config, 300, None, CPU)
    plain.fast = None
    assert isinstance(fast.fast, MLPStep)
    losses = []
    for epoch in range(2):
        for step, (inputs, targets) in enumerate(batches()):
            lr = training.learning_rate(config, epoch * 10 + step, 20)
            fast_loss, fast_logits = training.train_step(fast, inputs, targets, lr)
            plain_loss, plain_logits = training.train_step(plain, inputs, targets, lr)
            losses.append((float(fast_loss), float(plain_loss.detach())))
            torch.testing.assert_close(fast_logits, plain_logits.detach(), rtol=1e-4, atol=1e-4)
    return fast, plain, losses


@pytest.mark.parametrize("preset,overrides", [
    ("classic-adam", {}),
    ("classic-adam", {"activation": "tanh", "label_smoothing": 0.1, "hidden": [64, 32]}),
    ("classic-adam", {"activation": "sigmoid", "optimizer": "adamw", "weight_decay": 0.01}),
    ("classic-sgd", {}),
    ("classic-sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "schedule": "onecycle", "lr": 0.05}),
])
def test_the_fast_step_trains_the_same_weights_as_the_plain_step(preset, overrides):
    fast, plain, losses = trained_pair(preset, **overrides)
    for (name, fast_weight), plain_weight in zip(fast.model.state_dict().items(), plain.model.state_dict().values(),
                                                 strict=True):
        torch.testing.assert_close(fast_weight, plain_weight, rtol=1e-4, atol=1e-5, msg=name)
    assert max(abs(a - b) for a, b in losses) < 1e-5
    fast_state, plain_state = fast.optimizer.state_dict(), plain.optimizer.state_dict()
    assert fast_state["param_groups"] == plain_state["param_groups"]  # lr written back too
    assert fast_state["state"].keys() == plain_state["state"].keys()
    for key, slots in plain_state["state"].items():
        assert fast_state["state"][key].keys() == slots.keys()
        for name, value in slots.items():
            torch.testing.assert_close(fast_state["state"][key][name], value, rtol=1e-4, atol=1e-6)


def test_plain_sgd_is_applied_inside_the_backward_matrix_products_only_when_it_has_no_state():
    """Géron's plain SGD takes the in-place update (its weights are checked against the plain step above);
    momentum or weight decay keep the fused optimiser kernel."""
    assert training.build_loop(resolve_config("classic-sgd", {}), 300, None, CPU).fast.plain_sgd
    for overrides in ({"momentum": 0.9}, {"weight_decay": 5e-4}, {"optimizer": "adam"}):
        assert not training.build_loop(resolve_config("classic-sgd", overrides), 300, None, CPU).fast.plain_sgd


def test_the_weights_really_change():
    """The comparison above would pass for two steps that did nothing: they did not."""
    fast, _, _ = trained_pair("classic-adam")
    initial = training.build_loop(resolve_config("classic-adam", {}), 300, None, CPU).model.state_dict()
    assert not torch.equal(fast.model.state_dict()["layers.1.weight"], initial["layers.1.weight"])


@pytest.mark.parametrize("overrides", [
    {"dropout": 0.2}, {"activation": "gelu"}, {"optimizer": "rmsprop"}, {"precision": "bf16"},
    {"flip": True}, {"channels_last": True},
])
def test_anything_else_takes_the_plain_step(overrides):
    loop = training.build_loop(resolve_config("classic-adam", overrides), 300, None, CPU)
    assert loop.fast is None


def test_the_cnns_take_the_plain_step():
    assert training.build_loop(resolve_config("keras-cnn", {}), 300, None, CPU).fast is None
