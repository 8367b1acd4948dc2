"""Poolings, the gated embedding unit and the retrieval model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from atric.errors import ConfigError, DataError
from atric.model import POOLINGS, GatedEmbeddingUnit, RetrievalModel, build_pooling
from atric.model.normalize import l2_normalize, l2_normalize_blocks

DIM = 6
LENGTHS = (5, 2, 7)  # clips of different lengths in one batch
FRAMES = 9  # padded length, longer than every clip


def make_pooling(name: str, dim: int = DIM, **overrides: int) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"clusters": 3, "ghost_clusters": 1, "lstm_hidden": 5, "transformer_width": 8, "transformer_heads": 2, **overrides}
    return build_pooling(name, dim, **kwargs)


def padded_batch(
    clips: list[torch.Tensor], garbage: bool, nan: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad clips to FRAMES with zeros or with large random values (and a NaN unless ``nan=False``:
    finite padding takes the poolings' path that does not copy the frames to zero it)."""
    if garbage:
        x = 100.0 * torch.randn(len(clips), FRAMES, DIM)
        if nan:
            x[0, -1, 0] = float("nan")
    else:
        x = torch.zeros(len(clips), FRAMES, DIM)
    mask = torch.zeros(len(clips), FRAMES, dtype=torch.bool)
    for row, clip in enumerate(clips):
        x[row, : clip.shape[0]] = clip
        mask[row, : clip.shape[0]] = True
    return x, mask


def random_clips(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(length, DIM, generator=generator) for length in LENGTHS]


@pytest.mark.parametrize("name", POOLINGS)
@pytest.mark.parametrize(
    ("garbage", "nan"),
    [(False, False), (True, False), (True, True)],
    ids=["zero-pad", "finite-garbage-pad", "nan-garbage-pad"],
)
def test_padding_never_changes_the_embedding(name: str, garbage: bool, nan: bool) -> None:
    pooling = make_pooling(name).eval()
    clips = random_clips()
    x, mask = padded_batch(clips, garbage, nan)
    with torch.no_grad():
        batched = pooling(x, mask)
        for row, clip in enumerate(clips):
            alone = pooling(clip.unsqueeze(0), torch.ones(1, clip.shape[0], dtype=torch.bool))
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("name", POOLINGS)
def test_training_mode_statistics_ignore_padding(name: str) -> None:
    # In training mode NetVLAD's BatchNorm uses batch statistics: they must come from real frames only.
    pooling = make_pooling(name).train()
    clips = random_clips()
    torch.manual_seed(3)
    zero_x, mask = padded_batch(clips, garbage=False)
    garbage_x, _ = padded_batch(clips, garbage=True)
    torch.testing.assert_close(pooling(zero_x, mask), pooling(garbage_x, mask), atol=1e-5, rtol=0)
    finite_x, _ = padded_batch(clips, garbage=True, nan=False)
    torch.testing.assert_close(pooling(zero_x, mask), pooling(finite_x, mask), atol=1e-5, rtol=0)
    # More padding (padded frames are zeroed inside, so garbage alone could not tell) must not
    # shift the batch statistics either.
    longer_x = torch.cat([garbage_x, torch.randn(len(clips), 6, DIM)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(len(clips), 6, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(pooling(zero_x, mask), pooling(longer_x, longer_mask), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", POOLINGS)
def test_real_frames_anywhere_in_the_mask(name: str) -> None:
    # Real frames need not be a prefix: the pooling must use them in order and skip the holes.
    pooling = make_pooling(name).eval()
    clip = random_clips()[0]  # 5 frames
    x = 50.0 * torch.randn(1, FRAMES, DIM)
    positions = torch.tensor([1, 2, 4, 7, 8])
    x[0, positions] = clip
    mask = torch.zeros(1, FRAMES, dtype=torch.bool)
    mask[0, positions] = True
    with torch.no_grad():
        holes = pooling(x, mask)
        compact = pooling(clip.unsqueeze(0), torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(holes, compact, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mean", DIM), ("max", DIM), ("lstm", 5), ("netvlad", 3 * DIM), ("netrvlad", 3 * DIM), ("seqtransf", 8)],
)
def test_output_dims(name: str, expected: int) -> None:
    pooling = make_pooling(name).eval()
    x, mask = padded_batch(random_clips(), garbage=False)
    out = pooling(x, mask)
    assert pooling.output_dim == expected
    assert out.shape == (len(LENGTHS), expected)


def test_lstm_hidden_sets_the_dim_and_ghost_clusters_do_not_change_it() -> None:
    assert build_pooling("lstm", DIM, clusters=4, ghost_clusters=0, lstm_hidden=2048).output_dim == 2048
    assert build_pooling("netvlad", DIM, clusters=4, ghost_clusters=2, lstm_hidden=5).output_dim == 4 * DIM


@pytest.mark.parametrize("name", POOLINGS)
def test_gradients_reach_parameters_and_only_real_frames(name: str) -> None:
    pooling = make_pooling(name).train()
    x, mask = padded_batch(random_clips(), garbage=True)
    x = torch.nan_to_num(x).requires_grad_(True)
    out = pooling(x, mask)
    (out * torch.randn_like(out)).sum().backward()
    for param_name, param in pooling.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name
    assert (x.grad[~mask] == 0).all()  # padding has no influence, so no gradient
    assert x.grad[mask].abs().sum() > 0


def test_mean_pooling_value() -> None:
    pooling = make_pooling("mean", dim=2)
    x = torch.tensor([[[3.0, 4.0], [2.0, 0.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, True, False]])
    # frames normalise to (0.6, 0.8) and (1, 0); mean (0.8, 0.4); normalised.
    expected = torch.tensor([[0.8, 0.4]]) / math.hypot(0.8, 0.4)
    torch.testing.assert_close(pooling(x, mask), expected)


def test_max_pooling_padding_never_wins() -> None:
    pooling = make_pooling("max", dim=2)
    x = torch.tensor([[[-3.0, -1.0], [-2.0, -5.0], [0.0, 0.0]]])  # zero padding would win the max
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pooling(x, mask), torch.tensor([[-2.0, -1.0]]))


def test_lstm_pooling_is_mean_of_hidden_states() -> None:
    pooling = make_pooling("lstm").eval()
    clip = random_clips()[1]
    with torch.no_grad():
        hidden, _ = pooling.lstm(clip.unsqueeze(0))
        out = pooling(clip.unsqueeze(0), torch.ones(1, clip.shape[0], dtype=torch.bool))
    torch.testing.assert_close(out, hidden.mean(dim=1))


@pytest.mark.parametrize("name", ["netvlad", "netrvlad"])
def test_netvlad_matches_a_plain_loop(name: str) -> None:
    torch.manual_seed(0)
    pooling = build_pooling(name, DIM, clusters=3, ghost_clusters=2, lstm_hidden=5).eval()
    with torch.no_grad():  # non-trivial BatchNorm running statistics and affine terms
        pooling.assign_bn.running_mean.uniform_(-0.5, 0.5)
        pooling.assign_bn.running_var.uniform_(0.5, 2.0)
        pooling.assign_bn.weight.uniform_(0.5, 1.5)
        pooling.assign_bn.bias.uniform_(-0.5, 0.5)
    clip = random_clips()[0]
    bn = pooling.assign_bn
    blocks = []
    with torch.no_grad():
        for k in range(3):  # the 2 ghost clusters (indices 3, 4) take part in the softmax only
            total = torch.zeros(DIM)
            for frame in clip:
                logits = frame @ pooling.assign
                logits = (logits - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
                weight = torch.softmax(logits, dim=0)[k]
                centre = pooling.centres[k] if name == "netvlad" else torch.zeros(DIM)
                total += weight * (frame - centre)
            blocks.append(total / total.norm())
        expected = torch.cat(blocks)
        expected = expected / expected.norm()
        out = pooling(clip.unsqueeze(0), torch.ones(1, clip.shape[0], dtype=torch.bool))
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", POOLINGS)
def test_row_without_real_frames_gives_zeros(name: str) -> None:
    pooling = make_pooling(name).eval()
    x, mask = padded_batch(random_clips(), garbage=True)
    mask[1] = False
    with torch.no_grad():
        out = pooling(x, mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    assert out[0].abs().sum() > 0


def test_unknown_pooling_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        make_pooling("attention")
    for name in POOLINGS:
        assert name in str(info.value)


def test_bad_inputs_are_data_errors() -> None:
    pooling = make_pooling("mean")
    with pytest.raises(DataError, match="mask"):
        pooling(torch.randn(2, 4, DIM), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(DataError, match="feature dim"):
        pooling(torch.randn(2, 4, DIM + 1), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(DataError, match="bool"):
        pooling(torch.randn(2, 4, DIM), torch.ones(2, 4))


def test_gated_embedding_unit() -> None:
    torch.manual_seed(0)
    unit = GatedEmbeddingUnit(7, 4)
    x = torch.randn(5, 7, requires_grad=True)
    out = unit(x)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    out[:, 0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unit.parameters())
    # The gate really gates: the unnormalised output is the projection scaled by a value in (0, 1).
    unit.eval()
    with torch.no_grad():
        y = unit.project(x)
        gate = torch.sigmoid(unit.gate_bn(unit.gate(y)))
        torch.testing.assert_close(unit(x), F.normalize(y * gate, dim=-1))


def model_kwargs(experts: dict[str, int], fusion: str, audio_pooling: str = "netvlad") -> dict:
    return {
        "expert_dims": experts,
        "text_dim": 4,
        "audio_pooling": audio_pooling,
        "text_pooling": "netvlad",
        "embed_dim": 8,
        "audio_clusters": 3,
        "text_clusters": 2,
        "ghost_clusters": 1,
        "lstm_hidden": 5,
        "fusion": fusion,
    }


def audio_batch(experts: dict[str, int], clips: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {}
    for index, (name, dim) in enumerate(experts.items()):
        frames = 4 + index
        mask = torch.ones(clips, frames, dtype=torch.bool)
        mask[0, 2:] = False
        batch[name] = (torch.randn(clips, frames, dim, generator=generator), mask)
    return batch


def text_batch(captions: int) -> tuple[torch.Tensor, torch.Tensor]:
    words = torch.randn(captions, 5, 4, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(captions, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return words, mask


@pytest.mark.parametrize("experts", [{"vggish": 6}, {"vggish": 6, "panns.cnn10": 3}], ids=["1-expert", "2-experts"])
@pytest.mark.parametrize("fusion", ["uniform", "text_weighted"])
def test_retrieval_model(experts: dict[str, int], fusion: str) -> None:
    torch.manual_seed(0)
    model = RetrievalModel(**model_kwargs(experts, fusion))
    audio = audio_batch(experts, clips=3)
    words, mask = text_batch(captions=6)
    sim = model(audio, words, mask)
    assert sim.shape == (6, 3)
    assert (sim.abs() <= 1 + 1e-5).all()  # convex combination of cosines

    audio_out = model.encode_audio(audio)
    text_out, weights = model.encode_text(words, mask)
    assert set(audio_out) == set(text_out) == set(experts)
    for name in experts:
        assert audio_out[name].shape == (3, 8) and text_out[name].shape == (6, 8)
        torch.testing.assert_close(audio_out[name].norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(text_out[name].norm(dim=-1), torch.ones(6))
    assert weights.shape == (6, len(experts))
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))
    if fusion == "uniform":
        assert (weights == 1.0 / len(experts)).all()
    expected = sum(
        weights[:, i : i + 1] * (text_out[name] @ audio_out[name].t()) for i, name in enumerate(model.experts)
    )
    torch.testing.assert_close(model.similarity((text_out, weights), audio_out), expected)

    sim.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    if fusion == "text_weighted" and len(experts) == 2:
        assert grads["fusion_head.weight"].abs().sum() > 0


def test_config_round_trip_rebuilds_the_same_model() -> None:
    torch.manual_seed(0)
    experts = {"vggish": 6, "logmel": 3}
    model = RetrievalModel(**model_kwargs(experts, "text_weighted", audio_pooling="lstm")).eval()
    config = model.config()
    restored_config = json.loads(json.dumps(config))  # e.g. through a checkpoint's JSON metadata
    rebuilt = RetrievalModel.from_config(restored_config).eval()
    assert rebuilt.config() == config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    audio = audio_batch(experts, clips=2)
    words, mask = text_batch(captions=4)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(audio, words, mask), model(audio, words, mask))
    # The listing order of experts does not matter.
    reordered = RetrievalModel(**model_kwargs({"logmel": 3, "vggish": 6}, "text_weighted", audio_pooling="lstm"))
    assert reordered.config() == config
    assert config["expert_dims"] == {"logmel": 3, "vggish": 6}


def test_config_mismatch_is_detectable() -> None:
    model = RetrievalModel(**model_kwargs({"vggish": 6}, "uniform"))
    other = RetrievalModel(**model_kwargs({"vggish": 6}, "uniform", audio_pooling="mean"))
    assert model.config() != other.config()
    with pytest.raises(ConfigError, match="incomplete"):
        RetrievalModel.from_config({k: v for k, v in model.config().items() if k != "embed_dim"})


def test_model_errors() -> None:
    with pytest.raises(ConfigError, match="fusion"):
        RetrievalModel(**model_kwargs({"vggish": 6}, "attention"))
    with pytest.raises(ConfigError, match="at least one"):
        RetrievalModel(**model_kwargs({}, "uniform"))
    with pytest.raises(ConfigError, match="valid poolings"):
        RetrievalModel(**model_kwargs({"vggish": 6}, "uniform", audio_pooling="avg"))
    model = RetrievalModel(**model_kwargs({"vggish": 6}, "uniform"))
    with pytest.raises(DataError, match="missing"):
        model.encode_audio({"logmel": audio_batch({"logmel": 6}, 2)["logmel"]})


@pytest.mark.parametrize(("name", "order_sensitive"), [("mean", False), ("max", False), ("lstm", True), ("seqtransf", True)])
def test_temporal_poolings_see_the_order_of_frames(name: str, order_sensitive: bool) -> None:
    pooling = make_pooling(name).eval()
    clip = torch.randn(1, 7, DIM)
    mask = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        forward, backward = pooling(clip, mask), pooling(clip.flip(1), mask)
    assert (not torch.allclose(forward, backward, atol=1e-4)) == order_sensitive


def test_l2_normalize_blocks_equals_two_l2_normalize_calls_forward_and_backward() -> None:
    # NetVLAD's intra- then whole-vector normalisation in one function with a folded backward:
    # the same values and gradient as autograd through the two calls, with a zero block (clamped
    # norm), a near-zero block and an all-zero row among them.
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        torch.manual_seed(0)
        x = torch.randn(4, 5, 7, dtype=dtype)
        x[1, 2] = 0.0
        x[2, 0] *= 1e-13
        x[3] = 0.0
        mine, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = l2_normalize_blocks(mine).reshape(4, 35)
        expected = l2_normalize(l2_normalize(theirs).reshape(4, 35))
        torch.testing.assert_close(out, expected, rtol=0, atol=tolerance)
        upstream = torch.randn_like(out)
        (out * upstream).sum().backward()
        (expected * upstream).sum().backward()
        for row in range(4):  # per row: a clamped norm makes a row's gradient ~1e24
            scale = theirs.grad[row].abs().max()
            torch.testing.assert_close(
                mine.grad[row] / scale, theirs.grad[row] / scale, rtol=0, atol=tolerance
            )
    double = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize_blocks, (double,))


def test_l2_normalize_equals_f_normalize_forward_bitwise_and_backward_to_rounding() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 20, 50)
    x[3] = 0.0  # zero rows: the norm is clamped, F.normalize's gradient is grad / eps there
    x[5, 2] = 1e-14
    grad = torch.randn_like(x)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert torch.equal(l2_normalize(mine), F.normalize(theirs, dim=-1))
    l2_normalize(mine).backward(grad)
    F.normalize(theirs, dim=-1).backward(grad)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(mine.grad[3], theirs.grad[3])
    double = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (double,))
