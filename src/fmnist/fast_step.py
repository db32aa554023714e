"""The classic MLPs' training step without autograd: the same arithmetic as the plain step, a third of its cost.

At batch 32 the tutorial's Dense-128 network computes a few microseconds of matrix products per step; the rest of
the plain step (~300 us on 2 cores) is Python around autograd, the modules and `Optimizer.step`. For an MLP of
Linear layers with ReLU, tanh or sigmoid, this step writes the forward pass, the cross-entropy gradient and the
backward pass as the same ATen kernels autograd would run (`addmm`, `threshold_backward`, `tanh_backward`, ...),
then updates the weights with the fused kernel that `torch.optim.Adam/AdamW/SGD(fused=True)` calls, on the
optimiser's own state: checkpoints, resume and `optimizer.state_dict()` are exactly those of the plain step.
Weights agree with the plain step to float rounding (tests/test_fast_step.py).

It applies only where it computes the same thing: fp32 on the CPU, one process, no dropout or augmentation, a
fused Adam/AdamW/SGD; anything else (the CNNs, RMSprop, torchrun, bf16, a GPU) takes the plain step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmnist.models import MLP, NUM_CLASSES

# forward function and the ATen backward that autograd uses, taking (grad, the activation's output)
_ACTIVATIONS = {
    nn.ReLU: (torch.relu, lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0)),
    nn.Tanh: (torch.tanh, torch.ops.aten.tanh_backward),
    nn.Sigmoid: (torch.sigmoid, torch.ops.aten.sigmoid_backward),
}
_FUSED = {torch.optim.Adam: "_fused_adam_", torch.optim.AdamW: "_fused_adamw_", torch.optim.SGD: "_fused_sgd_"}


def mlp_layers(model: nn.Module) -> tuple[list[nn.Linear], Any] | None:
    """The Linear layers and the activation class of a plain fmnist MLP, or None when it has anything else."""
    if type(model) is not MLP:
        return None
    layers = list(model.layers)[1:]  # after Flatten
    linears, kinds = layers[0::2], {type(layer) for layer in layers[1::2]}
    if not all(isinstance(layer, nn.Linear) for layer in linears) or len(layers) != 2 * len(linears) - 1:
        return None  # dropout layers break the Linear/activation alternation
    if len(kinds) > 1 or not kinds <= set(_ACTIVATIONS):
        return None  # GELU's backward is not written here
    return linears, next(iter(kinds), nn.ReLU)


def _fused_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer) not in _FUSED or not hasattr(torch, _FUSED[type(optimizer)]):
        return False
    return all(group.get("fused") and not group.get("maximize") and not group.get("amsgrad")
               and not group.get("differentiable") for group in optimizer.param_groups)


def _merged_groups(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[tuple[dict, list[int]]]:
    """Each set of parameter groups that differ only in their parameters, as (one of the groups, positions in
    `params`): the classic presets' decay and no-decay groups both have weight decay 0, so one kernel call per
    step updates all weights instead of two (a tenth of the step at batch 32)."""
    slot = {id(p): i for i, p in enumerate(params)}
    merged: dict[tuple, tuple[dict, list[int]]] = {}
    for group in optimizer.param_groups:
        settings = tuple(sorted((key, repr(value)) for key, value in group.items() if key not in ("params", "lr")))
        merged.setdefault(settings, (group, []))[1].extend(slot[id(p)] for p in group["params"])
    return list(merged.values())


class MLPStep:
    """One optimiser step of an fmnist MLP on one batch, written out; `applies` says when it is exact."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, label_smoothing: float):
        self.linears, activation = mlp_layers(model)
        self.activate, self.activation_backward = _ACTIVATIONS[activation]
        self.params = [p for layer in self.linears for p in (layer.weight, layer.bias)]
        self.optimizer = optimizer
        self.groups = _merged_groups(optimizer, self.params)
        self.plain_sgd = type(optimizer) is torch.optim.SGD and all(
            not group["momentum"] and not group["weight_decay"] for group in optimizer.param_groups)
        # each class's target distribution: (1 - s) one-hot + s / C, as F.cross_entropy(label_smoothing=s) uses
        self.targets = torch.eye(NUM_CLASSES) * (1 - label_smoothing) + label_smoothing / NUM_CLASSES

    @staticmethod
    def applies(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, precision: str,
                group, channels_last: bool, augments: bool) -> bool:
        return (device.type == "cpu" and precision == "fp32" and group is None and not channels_last
                and not augments and mlp_layers(model) is not None and _fused_optimizer(optimizer))

    @torch.no_grad()  # no autograd graph: the gradients are written out below
    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) like `training.train_step`; the weights and optimiser state are updated in place."""
        count = len(targets)
        activations = [inputs.reshape(count, -1)]
        for layer in self.linears[:-1]:
            activations.append(self.activate(torch.addmm(layer.bias, activations[-1], layer.weight.t())))
        last = self.linears[-1]
        logits = torch.addmm(last.bias, activations[-1], last.weight.t())
        log_probs = torch.log_softmax(logits, 1)
        wanted = self.targets[targets]
        loss = torch.vdot(wanted.view(-1), log_probs.view(-1)).div_(-count)
        grad = log_probs.exp_().sub_(wanted).div_(count)  # d loss / d logits: softmax - target, per image
        for group in self.optimizer.param_groups:  # as Optimizer.step would find it
            group["lr"] = lr
        if self.plain_sgd:
            self._backward_and_sgd(grad, activations, lr)
            return loss, logits
        grads: list[torch.Tensor] = [grad] * len(self.params)
        for index in range(len(self.linears) - 1, -1, -1):
            grads[2 * index], grads[2 * index + 1] = grad.t().mm(activations[index]), grad.sum(0)
            if index:
                grad = self.activation_backward(grad.mm(self.linears[index].weight), activations[index])
        self._update(grads, lr)
        return loss, logits

    def _backward_and_sgd(self, grad: torch.Tensor, activations: list[torch.Tensor], lr: float) -> None:
        """Plain SGD (no momentum, no weight decay) inside the backward pass: `W -= lr * grad.T @ input` is one
        in-place matrix product, so no weight gradient is written and read back (a tenth of Géron's step). Each
        layer's weights change only after the gradient for the layer below has used them."""
        for index in range(len(self.linears) - 1, -1, -1):
            layer, upstream = self.linears[index], grad
            if index:
                grad = self.activation_backward(grad.mm(layer.weight), activations[index])
            layer.weight.addmm_(upstream.t(), activations[index], alpha=-lr)
            layer.bias.sub_(upstream.sum(0), alpha=lr)

    def _update(self, grads: list[torch.Tensor], lr: float) -> None:
        """The fused kernel of this optimiser per parameter group, with its state initialised as torch does."""
        state = self.optimizer.state
        for group, slots in self.groups:
            params, group_grads = [self.params[i] for i in slots], [grads[i] for i in slots]
            if isinstance(self.optimizer, torch.optim.SGD):
                self._sgd(group, params, group_grads, state)
                continue
            for p in params:
                if not state[p]:
                    state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            steps = [state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)
            kernel = getattr(torch, _FUSED[type(self.optimizer)])
            kernel(params, group_grads, [state[p]["exp_avg"] for p in params],
                   [state[p]["exp_avg_sq"] for p in params], [], steps, amsgrad=False, lr=lr,
                   beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                   eps=group["eps"], maximize=False)

    @staticmethod
    def _sgd(group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], state) -> None:
        momentum = group["momentum"]
        buffers = [state[p].get("momentum_buffer") for p in params] if momentum else []
        first = bool(momentum) and all(buffer is None for buffer in buffers)
        if first:
            buffers = [torch.empty_like(grad) for grad in grads]
        torch._fused_sgd_(params, grads, buffers, weight_decay=group["weight_decay"], momentum=momentum,
                          lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                          maximize=False, is_first_step=first)
        for p, buffer in zip(params, buffers, strict=False):
            state[p]["momentum_buffer"] = buffer

