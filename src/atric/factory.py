"""The one place that builds a run's parts from params or from a checkpoint: the retrieval
model, the training loss, the optimiser and the learning-rate schedule.

The training loop, evaluation, the benchmarks, search, tuning and the MLflow model export
all call these, so a param (e.g. ``train.margin``) reaches its module through one function.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from atric.config import TrainParams
from atric.errors import ConfigError
from atric.losses import build_loss as _build_named_loss
from atric.model import RetrievalModel


def build_model(train: TrainParams, expert_dims: dict[str, int], text_dim: int) -> RetrievalModel:
    return RetrievalModel(
        expert_dims,
        text_dim,
        audio_pooling=train.pooling,
        text_pooling=train.text_pooling,
        embed_dim=train.embed_dim,
        audio_clusters=train.audio_clusters,
        text_clusters=train.text_clusters,
        ghost_clusters=train.ghost_clusters,
        lstm_hidden=train.lstm_hidden,
        fusion=train.fusion,
        transformer_width=train.transformer_width,
        transformer_heads=train.transformer_heads,
    )


# The train params that size the model; a unit or typing mistake in one (10^7 clusters) once
# allocated 5-6 GB, then failed with a traceback and a FAILED MLflow run.
MODEL_SIZE_KEYS = ("embed_dim", "audio_clusters", "text_clusters", "ghost_clusters", "lstm_hidden", "transformer_width")
TRAINING_BYTES_PER_PARAM = 16  # fp32 weights, their gradients and two optimiser moments
ORDINARY_FACTOR = 16  # sizes up to this many times their defaults are not counted
MEMORY_SHARE = 8


def parameter_count(train: TrainParams, expert_dims: dict[str, int], text_dim: int) -> int:
    """The model's parameter count, built on the meta device: no memory is allocated."""
    with torch.device("meta"):
        model = build_model(train, expert_dims, text_dim)
    return sum(p.numel() for p in model.parameters())


def check_model_size(
    train: TrainParams, expert_dims: dict[str, int], text_dim: int, memory_bytes: int | None = None
) -> None:
    """ConfigError naming the key when the model's training state (weights, gradients, optimiser
    moments) needs over 1/``MEMORY_SHARE`` of the machine's memory (``memory_bytes``, default:
    physical memory): the activations of a batch scale with the same sizes and take several times
    more. The key named is the one whose default value would shrink the model most."""
    defaults = type(train)()
    if memory_bytes is None and all(
        getattr(train, key) <= ORDINARY_FACTOR * max(1, getattr(defaults, key)) for key in MODEL_SIZE_KEYS
    ):
        return  # every size within 16x its default: fits any machine that trains (and skips ~0.8 s of meta set-up)
    memory = memory_bytes or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    count = parameter_count(train, expert_dims, text_dim)
    need = count * TRAINING_BYTES_PER_PARAM
    if need <= memory // MEMORY_SHARE:
        return

    def saved(key: str) -> int:
        return count - parameter_count(train.model_copy(update={key: getattr(defaults, key)}), expert_dims, text_dim)

    key = max(MODEL_SIZE_KEYS, key=saved)
    raise ConfigError(
        f"train.{key}={getattr(train, key)}: the model would have {count:,} parameters, {need / 2**30:.1f} GiB "
        f"to train (weights, gradients, optimiser state), over 1/{MEMORY_SHARE} of this machine's {memory / 2**30:.0f} GiB "
        f"(a batch's activations take several times more); "
        f"lower it (default {getattr(defaults, key)})"
    )


def model_from_checkpoint(checkpoint: dict[str, Any]) -> RetrievalModel:
    """The trained model a loaded checkpoint holds (on the CPU, in eval mode)."""
    model = RetrievalModel.from_config(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def build_loss(train: TrainParams) -> nn.Module:
    """The training loss ``train.loss`` with its own params (margin or initial temperature)."""
    if train.loss == "infonce":
        return _build_named_loss("infonce", init_temperature=train.temperature)
    return _build_named_loss(train.loss, margin=train.margin)


def build_optimizer(train: TrainParams, model: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    # The loss's parameters (InfoNCE's temperature) get no weight decay: decay would pull
    # log(1/T) towards 0, i.e. T towards 1, which is not regularisation (CLIP does the same).
    groups = [{"params": list(model.parameters()), "weight_decay": train.weight_decay}]
    loss_params = list(loss.parameters())
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0})
    if train.optimizer == "ranger":
        from atric.ranger import Ranger  # RAdam + Lookahead, the original's optimiser

        return Ranger(groups, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)


def build_scheduler(train: TrainParams, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """``step``: StepLR stepped once an epoch (the paper). ``noam``: stepped once per optimiser
    step (``scheduler_steps_per_batch``), the Noam warm-up normalised to peak at ``train.lr``."""
    if train.scheduler == "noam":
        warmup = train.warmup_steps

        def noam(done: int) -> float:  # the factor for optimiser step done + 1
            step = done + 1
            return min(step / warmup, (warmup / step) ** 0.5)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, noam)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=train.lr_step_gamma)


def scheduler_steps_per_batch(train: TrainParams) -> bool:
    return train.scheduler == "noam"
