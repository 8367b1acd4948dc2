"""atric's Ranger against pytorch_optimizer's, the library it replaces at run time (bitwise)."""

from __future__ import annotations

import copy

import pytest
import pytorch_optimizer  # a test dependency (pyproject [test]): a missing one must fail, not skip
import torch

from atric.ranger import Ranger


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))


def _groups(model: torch.nn.Module, extra: torch.nn.Parameter) -> list[dict]:
    # as factory.build_optimizer: the model with weight decay, a loss parameter without
    return [{"params": list(model.parameters()), "weight_decay": 1e-3}, {"params": [extra], "weight_decay": 0.0}]


def _train(optimizer: torch.optim.Optimizer, model: torch.nn.Module, extra: torch.nn.Parameter, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, 6, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = (model(x) * extra).square().mean()
        loss.backward()
        if step == 3:
            model[0].bias.grad = None  # a parameter without a gradient this step
        optimizer.step()


def _pair(steps: int):
    ours_model, theirs_model = _model(), _model()
    ours_extra, theirs_extra = (torch.nn.Parameter(torch.tensor(1.5)) for _ in range(2))
    ours = Ranger(_groups(ours_model, ours_extra), lr=0.01, weight_decay=1e-3)
    theirs = pytorch_optimizer.Ranger(
        _groups(theirs_model, theirs_extra), lr=0.01, weight_decay=1e-3, degenerated_to_sgd=True, use_gc=False
    )
    _train(ours, ours_model, ours_extra, steps)
    _train(theirs, theirs_model, theirs_extra, steps)
    return (ours, ours_model, ours_extra), (theirs, theirs_model, theirs_extra)


def test_ranger_matches_pytorch_optimizer_bitwise_through_warm_up_and_lookahead() -> None:
    # 20 steps: the SGD warm-up (SMA length < 5 for the first steps), rectified steps after
    # it, and three Lookahead synchronisations (k = 6).
    (ours, ours_model, ours_extra), (theirs, theirs_model, theirs_extra) = _pair(20)
    for a, b in zip([*ours_model.parameters(), ours_extra], [*theirs_model.parameters(), theirs_extra], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours.state.values(), theirs.state.values(), strict=True):
        assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)
    assert [g["step"] for g in ours.param_groups] == [g["step"] for g in theirs.param_groups] == [20, 20]


def test_state_dicts_carry_over_both_ways() -> None:
    """A checkpoint written with pytorch_optimizer's Ranger resumes here, identically, and back."""
    (ours, ours_model, ours_extra), (theirs, theirs_model, theirs_extra) = _pair(7)
    saved_ours, saved_theirs = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
    assert saved_ours["param_groups"] == saved_theirs["param_groups"]
    # continue each from the other's state
    ours.load_state_dict(saved_theirs)
    theirs.load_state_dict(saved_ours)
    _train(ours, ours_model, ours_extra, 5)
    _train(theirs, theirs_model, theirs_extra, 5)
    for a, b in zip([*ours_model.parameters(), ours_extra], [*theirs_model.parameters(), theirs_extra], strict=True):
        assert torch.equal(a, b)


def test_invalid_hyperparameters_are_refused() -> None:
    p = [torch.nn.Parameter(torch.zeros(1))]
    for bad in ({"lr": -1.0}, {"alpha": 1.5}, {"k": 0}, {"betas": (0.9, 1.0)}):
        with pytest.raises(ValueError, match="Ranger"):
            Ranger(p, **bad)


def test_training_with_ranger_does_not_import_torch_dynamo() -> None:
    """torch.optim.Optimizer imports torch._dynamo (~2 s) on the first zero_grad/state_dict call
    unless Ranger marks those methods; a train stage's start-up depends on it."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from atric.ranger import Ranger\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = Ranger([p], lr=0.1)\n"
        "sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)\n"
        "for _ in range(7):\n"
        "    opt.zero_grad(); (p ** 2).sum().backward(); opt.step()\n"
        "sched.step(); opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
