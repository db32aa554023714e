"""Architecture facts the speed work relies on: reordered layers compute exactly what the Keras originals do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.models import ConvNet, KerasCNN, count_parameters


def test_keras_cnn_pools_before_relu_with_identical_outputs_and_gradients():
    torch.manual_seed(0)
    ours = KerasCNN()
    keras_order = KerasCNN()
    keras_order.features = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                                         nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2))
    keras_order.load_state_dict(ours.state_dict())  # same parameter names: old run folders still load
    x = torch.rand(16, 1, 28, 28) - 0.3  # negative values too, so ReLU matters
    y = torch.randint(0, 10, (16,))
    for model in (ours, keras_order):
        F.cross_entropy(model(x), y).backward()
    assert torch.equal(ours(x), keras_order(x))
    for a, b in zip(ours.parameters(), keras_order.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert count_parameters(ours) == 225_034  # Keras' model.summary() for this network


@pytest.mark.parametrize("depth", [1, 2])
def test_convnet_pools_before_its_last_relu_with_the_same_function_and_gradients(depth):
    import copy

    torch.manual_seed(0)
    model = ConvNet((8, 16, 32), depth=depth)
    reference = copy.deepcopy(model)  # the textbook order: conv-BN-ReLU, then max-pool
    for stage in reference.features:
        last = stage[depth - 1]
        stage[depth - 1] = nn.Sequential(last[0], last[1], nn.ReLU())
        stage[depth + 1] = nn.Identity()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for net in (model, reference):
        F.cross_entropy(net(x), y).backward()
    assert torch.equal(model(x), reference(x))
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    assert "features.0.0.1.running_mean" in model.state_dict()  # parameter names as before: old runs still load
