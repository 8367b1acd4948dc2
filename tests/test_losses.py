"""Losses against hand-computed values and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from atric.errors import ConfigError, DataError
from atric.losses import InfoNCELoss, MaxMarginRankingLoss, build_loss


def test_max_margin_hand_computed_2x2() -> None:
    sim = torch.tensor([[0.5, 0.4], [0.6, 0.7]])
    # Caption-side terms: relu(.2-.5+.4)=.1, relu(.2-.7+.6)=.1.
    # Clip-side terms: relu(.2-.5+.6)=.3 (clip 0 vs caption 1), relu(.2-.7+.4)=0. Mean of 4 terms.
    loss = MaxMarginRankingLoss(margin=0.2)(sim, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(0.5 / 4)


def test_max_margin_averages_captions_of_a_clip_first() -> None:
    # Rows 0 and 1 (clip 0) average to (0.5, 0.4): the same square matrix as the 2x2 case.
    sim = torch.tensor([[0.6, 0.3], [0.4, 0.5], [0.6, 0.7]])
    loss = MaxMarginRankingLoss(margin=0.2)(sim, torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx(0.125)
    # Caption order in the batch does not matter, only which clip each belongs to.
    permuted = MaxMarginRankingLoss(margin=0.2)(sim[[2, 0, 1]], torch.tensor([1, 0, 0]))
    assert permuted.item() == pytest.approx(0.125)


def test_max_margin_is_a_mean_not_a_sum() -> None:
    loss = MaxMarginRankingLoss(margin=0.2)
    # All similarities equal: every one of the 2*3*2 = 12 terms is exactly the margin.
    assert loss(torch.zeros(3, 3), torch.arange(3)).item() == pytest.approx(0.2)
    # Positives beat negatives by more than the margin: no loss.
    assert loss(torch.eye(3), torch.arange(3)).item() == pytest.approx(0.0)


def test_max_margin_3x3_against_a_loop() -> None:
    sim = torch.tensor([[0.3, 0.1, 0.4], [0.2, 0.5, 0.45], [0.0, 0.35, 0.3]])
    terms = []
    for i in range(3):
        for j in range(3):
            if i != j:
                terms.append(max(0.0, 0.2 - sim[i, i].item() + sim[i, j].item()))
                terms.append(max(0.0, 0.2 - sim[i, i].item() + sim[j, i].item()))
    expected = sum(terms) / len(terms)
    assert MaxMarginRankingLoss()(sim, torch.arange(3)).item() == pytest.approx(expected)


def test_max_margin_single_clip_is_zero_with_graph() -> None:
    sim = torch.tensor([[0.3], [0.1]], requires_grad=True)
    loss = MaxMarginRankingLoss()(sim, torch.tensor([0, 0]))
    assert loss.item() == 0.0
    loss.backward()
    assert sim.grad is not None


def nll(positive_logits: list[float], all_logits: list[float]) -> float:
    """-log(sum over positives exp / sum over all exp), written out."""
    return -math.log(sum(math.exp(v) for v in positive_logits) / sum(math.exp(v) for v in all_logits))


def test_infonce_hand_computed_2x2() -> None:
    loss = InfoNCELoss(init_temperature=1.0, learnable=False)
    value = loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])).item()
    assert value == pytest.approx(math.log(1 + math.exp(-1)))


def test_infonce_hand_computed_multi_positive() -> None:
    temperature = 0.5
    sim = [[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]]  # captions 0 and 1 describe clip 0
    scaled = [[v / temperature for v in row] for row in sim]
    t2a = (nll([scaled[0][0]], scaled[0]) + nll([scaled[1][0]], scaled[1]) + nll([scaled[2][1]], scaled[2])) / 3
    column0 = [row[0] for row in scaled]
    column1 = [row[1] for row in scaled]
    a2t = (nll([column0[0], column0[1]], column0) + nll([column1[2]], column1)) / 2
    loss = InfoNCELoss(init_temperature=temperature, learnable=False)
    assert loss(torch.tensor(sim), torch.tensor([0, 0, 1])).item() == pytest.approx((t2a + a2t) / 2, rel=1e-6)


def test_infonce_captions_of_the_same_clip_are_positives() -> None:
    loss = InfoNCELoss(init_temperature=0.1, learnable=False)
    caption_clip = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor(
        [[0.6, 0.1, 0.2], [0.3, 0.2, 0.1], [0.1, 0.5, 0.0], [0.2, 0.1, 0.4]], requires_grad=True
    )
    loss(sim, caption_clip).backward()
    # Raising any caption's similarity to its own clip lowers the loss (never pushed away as a negative).
    own = sim.grad[torch.arange(4), caption_clip]
    assert (own < 0).all()
    # Raising a caption's similarity to another clip raises it.
    other = sim.grad.clone()
    other[torch.arange(4), caption_clip] = 0
    assert (other[other != 0] > 0).all()
    # A second caption of clip 0 matching it perfectly can only help, as an extra positive.
    better = sim.detach().clone()
    better[1, 0] = 0.9
    assert loss(better, caption_clip) < loss(sim.detach(), caption_clip)


def test_infonce_temperature_is_learnable_and_clamped() -> None:
    loss = InfoNCELoss(init_temperature=0.07)
    assert loss.temperature == pytest.approx(0.07)
    sim = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
    loss(sim, torch.tensor([0, 1])).backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad != 0
    assert [name for name, _ in loss.named_parameters()] == ["log_scale"]

    clamped = InfoNCELoss(init_temperature=0.001, learnable=False)  # 1/T = 1000 -> clamped to 100
    at_limit = InfoNCELoss(init_temperature=0.01, learnable=False)
    assert clamped.temperature == pytest.approx(0.01)
    assert clamped(sim, torch.tensor([0, 1])).item() == pytest.approx(at_limit(sim, torch.tensor([0, 1])).item())
    assert list(InfoNCELoss(learnable=False).parameters()) == []


def test_build_loss() -> None:
    assert isinstance(build_loss("max_margin", margin=0.3), MaxMarginRankingLoss)
    assert build_loss("max_margin", margin=0.3).margin == 0.3
    assert isinstance(build_loss("infonce", init_temperature=0.05), InfoNCELoss)
    with pytest.raises(ConfigError, match="max_margin, infonce"):
        build_loss("triplet")
    with pytest.raises(ConfigError, match="bad arguments"):
        build_loss("max_margin", temperature=0.1)


@pytest.mark.parametrize("loss", [MaxMarginRankingLoss(), InfoNCELoss()], ids=["max_margin", "infonce"])
def test_loss_input_errors(loss: torch.nn.Module) -> None:
    sim = torch.zeros(3, 2)
    with pytest.raises(DataError, match="no caption"):
        loss(sim, torch.tensor([0, 0, 0]))  # clip 1 has no caption
    with pytest.raises(DataError, match="one entry per sim row"):
        loss(sim, torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        loss(sim, torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="integer"):
        loss(sim, torch.tensor([0.0, 1.0, 1.0]))
