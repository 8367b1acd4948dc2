"""The one place that builds a run's parts from params or from a checkpoint: the retrieval
model, the training loss, the optimiser and the learning-rate schedule.

The training loop, evaluation, the benchmarks, search, tuning and the MLflow model export
all call these, so a param (e.g. ``train.margin``) reaches its module through one function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from atric.config import TrainParams
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
