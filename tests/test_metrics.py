"""Retrieval metrics against a plain loop reference and hand-made cases."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
from scipy.stats import rankdata

from atric.errors import DataError
from atric.metrics import format_metrics_table, retrieval_metrics


def tie_averaged_rank(values: list[float], target: float) -> float:
    """0-based position of ``target`` in ``values`` sorted by descending similarity; ties averaged."""
    ordered = sorted(values, reverse=True)
    positions = [position for position, value in enumerate(ordered) if value == target]
    return sum(positions) / len(positions)


def reference_metrics(sim: np.ndarray, cpc: int) -> dict[str, float]:
    """The protocol written out query by query."""
    n_captions, n_clips = sim.shape
    rows = sim.tolist()
    t2a_ranks, t2a_ap = [], []
    for caption in range(n_captions):
        rank = tie_averaged_rank(rows[caption], rows[caption][caption // cpc])
        t2a_ranks.append(rank)
        t2a_ap.append(1.0 / (rank + 1) if rank < 10 else 0.0)
    a2t_ranks, a2t_ap = [], []
    for clip in range(n_clips):
        column = [rows[caption][clip] for caption in range(n_captions)]
        ranks = sorted(tie_averaged_rank(column, column[caption]) for caption in range(clip * cpc, (clip + 1) * cpc))
        a2t_ranks.append(ranks[0])
        precision_sum = 0.0
        for hit_number, rank in enumerate(ranks, start=1):
            if rank < 10:
                precision_sum += hit_number / (rank + 1)
        a2t_ap.append(precision_sum / min(10, cpc))
    out = {}
    for prefix, ranks, ap in (("t2a", t2a_ranks, t2a_ap), ("a2t", a2t_ranks, a2t_ap)):
        out[f"{prefix}_R1"] = 100.0 * sum(1 for r in ranks if r == 0) / len(ranks)
        for k in (5, 10, 50):
            out[f"{prefix}_R{k}"] = 100.0 * sum(1 for r in ranks if r < k) / len(ranks)
        out[f"{prefix}_MedR"] = statistics.median(ranks) + 1
        out[f"{prefix}_MeanR"] = sum(ranks) / len(ranks) + 1
        out[f"{prefix}_mAP10"] = sum(ap) / len(ap)
        product = out[f"{prefix}_R1"] * out[f"{prefix}_R5"] * out[f"{prefix}_R10"]
        out[f"{prefix}_geometric_mean"] = product ** (1 / 3)
    return out


def assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key
        assert isinstance(actual[key], float), key


@pytest.mark.parametrize(
    ("n_clips", "cpc", "decimals", "seed"),
    [(30, 5, 1, 0), (30, 5, 1, 1), (25, 5, None, 2), (40, 1, 1, 3), (12, 3, 0, 4), (60, 5, 2, 5)],
)
def test_matches_loop_reference_including_ties(n_clips: int, cpc: int, decimals: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sim = rng.uniform(-1, 1, size=(cpc * n_clips, n_clips))
    sim[np.arange(cpc * n_clips), np.arange(cpc * n_clips) // cpc] += 0.4  # some signal: hits happen
    if decimals is not None:
        sim = np.round(sim, decimals)  # many ties, including with the ground truth
    assert_metrics_equal(retrieval_metrics(sim, captions_per_clip=cpc), reference_metrics(sim, cpc))


@pytest.mark.parametrize(
    ("n_clips", "cpc", "decimals", "seed"),
    # Several row blocks, a short last block, widths that are not whole uint64 words, rows laid
    # side by side (narrow matrices) or not (wide ones), ties across blocks.
    [(203, 5, 1, 6), (203, 5, None, 7), (97, 3, 2, 8), (641, 1, 1, 9), (530, 5, 2, 10)],
)
def test_blocked_counting_matches_the_loop_reference_over_many_blocks(
    n_clips: int, cpc: int, decimals: int | None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    sim = rng.uniform(-1, 1, size=(cpc * n_clips, n_clips)).astype(np.float32)
    sim[np.arange(cpc * n_clips), np.arange(cpc * n_clips) // cpc] += 0.6
    if decimals is not None:
        sim = np.round(sim, decimals)
    assert_metrics_equal(retrieval_metrics(sim, captions_per_clip=cpc), reference_metrics(sim, cpc))


def test_huge_finite_values_are_not_mistaken_for_inf() -> None:
    """Their sum overflows to inf; the exact element check then accepts them."""
    rng = np.random.default_rng(11)
    sim = rng.uniform(0.5, 1.0, size=(50, 10)) * np.finfo(np.float64).max
    assert_metrics_equal(retrieval_metrics(sim), reference_metrics(sim, 5))


def test_float32_input_and_all_ties() -> None:
    sim = np.zeros((10, 2), dtype=np.float32)
    metrics = retrieval_metrics(sim)
    assert_metrics_equal(metrics, reference_metrics(sim.astype(np.float64), 5))
    assert metrics["t2a_R1"] == 0.0  # every rank is 0.5: a tie is not a hit
    assert metrics["t2a_MedR"] == 1.5
    assert metrics["a2t_MeanR"] == 5.5  # all ten captions tie: (0 + ... + 9) / 10 + 1


def test_hand_made_one_caption_per_clip() -> None:
    sim = np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.3, 0.8, 0.4]])
    m = retrieval_metrics(sim, captions_per_clip=1)
    # t2a ranks: 0, 0.5 (tie with clip 0), 1.
    assert m["t2a_R1"] == pytest.approx(100 / 3)
    assert m["t2a_R5"] == 100.0
    assert m["t2a_MedR"] == 1.5
    assert m["t2a_MeanR"] == 1.5
    assert m["t2a_mAP10"] == pytest.approx((1 + 1 / 1.5 + 1 / 2) / 3)
    assert m["t2a_geometric_mean"] == pytest.approx((100 / 3 * 100 * 100) ** (1 / 3))
    # a2t ranks: 0, 1, 0.
    assert m["a2t_R1"] == pytest.approx(200 / 3)
    assert m["a2t_MedR"] == 1.0
    assert m["a2t_MeanR"] == pytest.approx(4 / 3)
    assert m["a2t_mAP10"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_hand_made_five_captions_per_clip() -> None:
    sim = np.array(
        [
            [0.9, 0.1],
            [0.2, 0.3],
            [0.2, 0.2],
            [0.1, 0.0],
            [0.1, 0.5],  # clip 0's captions
            [0.0, 0.6],
            [0.0, 0.1],
            [0.0, 0.1],
            [0.0, 0.1],
            [0.0, 0.1],  # clip 1's captions
        ]
    )
    m = retrieval_metrics(sim)
    # t2a ranks: 0, 1, 0.5, 0, 1, 0, 0, 0, 0, 0
    assert m["t2a_R1"] == 70.0
    assert m["t2a_R5"] == 100.0
    assert m["t2a_MedR"] == 1.0
    assert m["t2a_MeanR"] == 1.25
    assert m["t2a_mAP10"] == pytest.approx((7 + 0.5 + 0.5 + 1 / 1.5) / 10)
    # a2t: clip 0's captions rank 0, 1.5, 1.5, 3.5, 3.5 in column 0 (all five on top: AP = 1);
    # clip 1's rank 0, 6, 6, 6, 6 in column 1 (four tie with caption 0's 0.1): AP = (1 + 14/7) / 5.
    assert m["a2t_R1"] == 100.0
    assert m["a2t_MedR"] == 1.0
    assert m["a2t_MeanR"] == 1.0
    assert m["a2t_mAP10"] == pytest.approx((1.0 + 0.6) / 2)


def test_reference_rank_agrees_with_scipy() -> None:
    values = [0.3, 0.1, 0.3, 0.7, 0.3]
    expected = rankdata([-v for v in values], method="average") - 1
    assert [tie_averaged_rank(values, v) for v in values] == expected.tolist()


def test_perfect_and_reversed_retrieval() -> None:
    n = 20
    # A tiny per-caption offset keeps a clip's five captions from tying with each other.
    sim = np.repeat(np.eye(n), 5, axis=0) + 1e-3 * np.tile(np.arange(5), n)[:, None]
    perfect = retrieval_metrics(sim)
    for direction in ("t2a", "a2t"):
        assert perfect[f"{direction}_R1"] == 100.0
        assert perfect[f"{direction}_MedR"] == 1.0
        assert perfect[f"{direction}_mAP10"] == pytest.approx(1.0)
        assert perfect[f"{direction}_geometric_mean"] == pytest.approx(100.0)
    worst = retrieval_metrics(-sim)
    assert worst["t2a_R1"] == 0.0
    assert worst["t2a_MeanR"] == n  # own clip last among n: rank n - 1


def test_fast_on_5000_by_1000() -> None:
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((5000, 1000)).astype(np.float32)
    retrieval_metrics(sim)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        retrieval_metrics(sim)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"retrieval_metrics took {best:.2f} s on 5000 x 1000"


@pytest.mark.parametrize(
    ("sim", "cpc", "message"),
    [
        (np.zeros((11, 2)), 5, r"expected \[5 \* N, N\]"),
        (np.zeros((10, 10)), 5, r"expected \[5 \* N, N\]"),
        (np.zeros(10), 5, "2-D"),
        (np.zeros((0, 0)), 5, "N == 0"),
        (np.zeros((10, 2)), 0, "captions_per_clip"),
    ],
)
def test_shape_errors(sim: np.ndarray, cpc: int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        retrieval_metrics(sim, captions_per_clip=cpc)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_errors(bad: float) -> None:
    sim = np.zeros((10, 2))
    sim[3, 1] = bad
    with pytest.raises(DataError, match="NaN/inf"):
        retrieval_metrics(sim)


def test_tied_captions_of_one_clip_share_first_place() -> None:
    # Protocol consequence: five equally good captions tie at positions 0..4, so the a2t rank is 2.
    metrics = retrieval_metrics(np.repeat(np.eye(4), 5, axis=0))
    assert metrics["t2a_R1"] == 100.0
    assert metrics["a2t_R1"] == 0.0 and metrics["a2t_R5"] == 100.0
    assert metrics["a2t_MedR"] == 3.0
    assert metrics["a2t_mAP10"] == pytest.approx(1.0)


def test_format_metrics_table() -> None:
    sim = np.repeat(np.eye(4), 5, axis=0) + 1e-3 * np.tile(np.arange(5), 4)[:, None]
    table = format_metrics_table(retrieval_metrics(sim))
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:4] == ["dir", "R@1", "R@5", "R@10"]
    assert lines[1].split()[0] == "t2a" and lines[2].split()[0] == "a2t"
    assert "100.00" in lines[1] and "1.000" in lines[1]
    with pytest.raises(DataError):
        format_metrics_table({})


def test_a_forked_child_counts_with_threads_of_its_own() -> None:
    """The counting threads are kept per process: a child forked after the parent used them
    (e.g. a DataLoader worker, a tuning process) must not wait on threads it does not have."""
    import multiprocessing

    rng = np.random.default_rng(12)
    sim = rng.standard_normal((5 * 300, 300)).astype(np.float32)  # several blocks: the threaded path
    expected = retrieval_metrics(sim)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result = pool.apply_async(retrieval_metrics, (sim,))
        assert result.get(timeout=60) == expected
