"""Ranger: RAdam + Lookahead, the optimiser of the paper's code (its ``utils/ranger.py``).

The arithmetic is pytorch_optimizer's ``Ranger(use_gc=False, degenerated_to_sgd=True)``
(its batched ``foreach`` path) op for op, and so is the state_dict: tests/test_ranger.py
holds the two bitwise equal and loads each one's state into the other. It is written here
because importing pytorch_optimizer pulls in transformers and torch.distributed, seconds at
the start of every train stage and trial process.

- no gradient centralisation (the original's has none);
- while RAdam's variance estimate is not yet tractable (its SMA length below 5, the first
  steps), an SGD-with-momentum step of lr / (1 - beta1^t) instead of a negative one;
- decoupled weight decay, p *= 1 - lr * weight_decay, before the moment updates;
- every ``k`` steps the slow weights move ``alpha`` of the way to the fast ones, which
  restart from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


def rectified_step_size(step: int, lr: float, beta2: float, sma_threshold: float) -> tuple[float, float]:
    """(lr x RAdam's rectification term, or lr where the SMA length is below the threshold; the SMA length)."""
    sma_max = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**step
    sma = sma_max - 2 * step * beta2_t / (1.0 - beta2_t)
    if sma < sma_threshold:
        return lr, sma
    rt = math.sqrt((1.0 - beta2_t) * (sma - 4) / (sma_max - 4) * (sma - 2) / sma * sma_max / (sma_max - 2))
    return lr * rt, sma


# torch.optim.Optimizer wraps add_param_group, zero_grad, state_dict and load_state_dict in
# torch._disable_dynamo, which imports torch._dynamo on the first call (1.8 s, the largest single
# import of a train stage) only to keep them out of torch.compile's tracing. Nothing in atric is
# compiled, so they are marked as already excluded and the wrappers call them directly.
_DYNAMO_WRAPPED_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def _skip_dynamo_import() -> None:
    for name in _DYNAMO_WRAPPED_METHODS:
        method = getattr(getattr(Optimizer, name), "__wrapped__", None)  # absent if torch drops the wrapper
        if method is not None and getattr(method, "__dynamo_disable", None) is None:
            method.__dynamo_disable = method  # the attribute torch._disable_dynamo caches its wrapper in


class Ranger(Optimizer):
    """RAdam + Lookahead; see the module docstring for what exactly it computes."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        alpha: float = 0.5,
        k: int = 6,
        sma_threshold: int = 5,
        weight_decay: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not 0.0 <= alpha <= 1.0 or k < 1:
            raise ValueError(f"Ranger: invalid lr={lr}, eps={eps}, weight_decay={weight_decay}, alpha={alpha} or k={k}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Ranger: betas must lie in [0, 1), got {betas}")
        self.sma_threshold = sma_threshold
        # The group keys of pytorch_optimizer's Ranger, so that state_dicts carry over either way.
        defaults = {
            "lr": lr, "betas": betas, "alpha": alpha, "k": k, "step_counter": 0, "weight_decay": weight_decay,
            "weight_decouple": True, "fixed_decay": False, "eps": eps, "foreach": None,
        }  # fmt: skip
        _skip_dynamo_import()
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group.setdefault("step", 0)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["slow_buffer"] = p.clone()
            group["step"] += 1
            if not params:
                continue
            beta1, beta2 = group["betas"]
            step_size, sma = rectified_step_size(group["step"], group["lr"], beta2, self.sma_threshold)
            step_size /= 1.0 - math.pow(beta1, group["step"])
            for tensors in _by_device_and_dtype(params, self.state):
                self._update(group, *tensors, step_size, sma >= self.sma_threshold)
        return loss

    @staticmethod
    def _update(
        group: dict[str, Any],
        params: list[torch.Tensor],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        slow: list[torch.Tensor],
        step_size: float,
        rectified: bool,
    ) -> None:
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(params, 1.0 - group["weight_decay"] * group["lr"])
        torch._foreach_lerp_(exp_avgs, grads, weight=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        if rectified:
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-step_size)
        else:
            torch._foreach_add_(params, exp_avgs, alpha=-step_size)
        if group["step"] % group["k"] == 0:
            torch._foreach_lerp_(slow, params, weight=group["alpha"])
            torch._foreach_copy_(params, slow)


def _by_device_and_dtype(
    params: list[torch.Tensor], state: dict[torch.Tensor, dict[str, torch.Tensor]]
) -> list[tuple[list[torch.Tensor], ...]]:
    """Parameters and their state split into lists that one foreach call can take."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], ...]] = {}
    for p in params:
        lists = groups.setdefault((p.device, p.dtype), ([], [], [], []))
        for target, tensor in zip(lists, (p, state[p]["exp_avg"], state[p]["exp_avg_sq"], state[p]["slow_buffer"])):
            target.append(tensor)
    return list(groups.values())
