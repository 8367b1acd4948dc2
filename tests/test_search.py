"""Search (atric.search, src/index.py, src/search.py) on a tiny trained model.

The layout is written here rather than by fakes.write_fake_layout: text queries need
real words, so captions are made of a small vocabulary whose word2vec-format vectors
(written with gensim) carry each clip's "sound category", as its logmel-shaped (dim 128)
features do; the captions are embedded by the real text stage (embed_captions).
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from gensim.models import KeyedVectors

from atric import engine
from atric.config import Params, TextParams
from atric.data import open_split, pad_frames
from atric.embed import split_similarity
from atric.errors import DataError
from atric.features import build_expert
from atric.layout import SPLITS, Clip, Layout, write_features, write_index
from atric.model import RetrievalModel
from atric.search import Searcher, SearchIndex, build_index, caption_hit_rate, index_path, load_index
from atric.text import KeyedVectorSource, embed_captions

REPO = Path(__file__).resolve().parents[1]
RUN = "logmel-mean"
CATEGORIES = {
    "dog": "barks",
    "car": "passes",
    "rain": "falls",
    "bell": "rings",
    "bird": "sings",
    "engine": "idles",
    "door": "slams",
    "baby": "cries",
}
FILLERS = ["a", "the", "loudly", "softly", "then", "nearby", "far", "away", "while", "outside"]
CLIPS = {"train": 32, "val": 8, "test": 8}
WORD_DIM = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def write_layout(root: Path, vectors_path: Path, seed: int = 0) -> None:
    """Captions from the category vocabulary, word vectors and features sharing each category's topic."""
    rng = np.random.default_rng(seed)
    names = list(CATEGORIES)
    topics = rng.normal(size=(len(names), 16)).astype(np.float32)
    to_words = rng.normal(size=(16, WORD_DIM)).astype(np.float32) / 4
    to_audio = rng.normal(size=(16, 128)).astype(np.float32)
    words, vectors = [], []
    for c, (noun, verb) in enumerate(CATEGORIES.items()):
        for word in (noun, verb):
            words.append(word)
            vectors.append(topics[c] @ to_words + 0.1 * rng.normal(size=WORD_DIM))
    for word in FILLERS:
        words.append(word)
        vectors.append(0.3 * rng.normal(size=WORD_DIM))
    kv = KeyedVectors(WORD_DIM)
    kv.add_vectors(words, np.asarray(vectors, np.float32))
    kv.save_word2vec_format(str(vectors_path), binary=False)

    layout = Layout("Fake", root)
    settings = json.dumps(build_expert("logmel").settings(), sort_keys=True)
    for split, count in CLIPS.items():
        clips, arrays = [], []
        for i in range(count):
            c = (i + 3 * SPLITS.index(split)) % len(names)
            noun, verb = names[c], CATEGORIES[names[c]]
            captions = tuple(
                " ".join(
                    [str(rng.choice(FILLERS)), noun, verb, str(rng.choice(FILLERS)), str(rng.choice(FILLERS))]
                )
                for _ in range(5)
            )
            clip_id = f"{split}_{i:03d}"
            clips.append(Clip(clip_id, captions))
            frames = int(rng.integers(3, 12))
            noise = rng.normal(size=(frames, 128)).astype(np.float32)
            arrays.append((clip_id, topics[c] @ to_audio + 0.5 * noise))
        write_index(layout.index_path(split), clips, split)
        write_features(
            layout.features_path("logmel", split),
            arrays,
            {"expert": "logmel", "dim": 128, "settings": settings, "sample_rate": 16000},
        )
    embed_captions(layout, str(vectors_path), SPLITS, TextParams(max_words=32))


def raw_params(root: Path, vectors_path: Path) -> dict[str, Any]:
    return {
        "data": {"dataset": "Fake", "root": str(root / "data")},
        "text": {"vectors": str(vectors_path), "max_words": 32},
        "train": {
            "experts": ["logmel"],
            "pooling": "mean",
            "text_pooling": "mean",
            "embed_dim": 16,
            "lr": 0.01,
            "epochs": 8,
            "batch_size": 16,
            "device": "cpu",
            "optimizer": "adamw",
            "models_dir": str(root / "models"),
            "metrics_dir": str(root / "metrics"),
        },
        "search": {"index_dir": str(root / "indexes"), "batch_size": 4},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train a tiny run and index it via the stage's CLI."""
    root = tmp_path_factory.mktemp("search")
    vectors_path = root / "words.txt"
    write_layout(root / "data", vectors_path)
    raw = raw_params(root, vectors_path)
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    params = Params.model_validate(raw)
    torch.manual_seed(0)
    result = engine.train(params)
    assert result.run_name == RUN
    proc = cli(root, "src/index.py", "--run", RUN, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"{RUN}: indexed train 32, val 8, test 8 clips, 240 captions" in proc.stdout
    assert "val captions as queries: own clip in the top 10 for 40/40" in proc.stdout  # 8 val clips
    return {"root": root, "params": params, "raw": raw, "vectors": vectors_path}


def cli(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlruns.db'}",
        "PYTHONPATH": str(REPO / "src"),
    }
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def search_in_process(
    cwd: Path, args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """src/search.py's real main and error exit, without a fresh interpreter per bad input."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["search.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "src" / "search.py"), run_name="__main__")
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def model_and_val(params: Params) -> tuple[RetrievalModel, Any]:
    checkpoint = engine.load_checkpoint(engine.RunPaths.of(params.train, RUN).best)
    model = RetrievalModel.from_config(checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    data = open_split(
        Layout(params.data.dataset, params.data.root),
        "val",
        experts=["logmel"],
        vectors=params.text.vectors,
        padded_lengths=checkpoint["max_frames"],
    )
    return model, data


# ---------------------------------------------------------------- the index
def test_index_file_matches_checkpoint_and_layout(trained: dict[str, Any]) -> None:
    params = trained["params"]
    path = index_path(params, RUN)
    assert path == trained["root"] / "indexes" / f"{RUN}.h5"
    index = load_index(path)
    best = engine.RunPaths.of(params.train, RUN).best
    checkpoint = engine.load_checkpoint(best)
    assert index.attrs["run"] == RUN
    assert index.attrs["params_hash"] == checkpoint["params_hash"]
    assert index.attrs["text_vectors"] == str(trained["vectors"])
    assert json.loads(index.attrs["experts"]) == ["logmel"]
    assert len(index.clip_ids) == 48 and index.clip_ids[0] == "train_000" and index.clip_ids[32] == "val_000"
    assert list(np.unique(index.splits)) == ["test", "train", "val"]
    assert index.audio.shape == (1, 48, 16) and index.caption_text.shape == (1, 240, 16)
    np.testing.assert_allclose(np.linalg.norm(index.audio, axis=-1), 1.0, atol=1e-5)
    assert index.captions[index.caption_offsets[32]] == load_captions(params, "val")[0][0]
    assert not list(path.parent.glob("*.tmp"))
    # Below the approximate-search threshold: no .faiss, no ann attr (the exact index as before).
    assert "ann" not in index.attrs and index.ann is None and not path.with_suffix(".faiss").exists()


def load_captions(params: Params, split: str) -> list[tuple[str, ...]]:
    from atric.layout import read_index

    return [
        c.captions for c in read_index(Layout(params.data.dataset, params.data.root).index_path(split), split)
    ]


# ---------------------------------------------------------------- text queries
def test_text_query_json_matches_evaluation_scores(trained: dict[str, Any]) -> None:
    """A val caption as the query, restricted to val: the scores are evaluation's similarity row."""
    params = trained["params"]
    caption = load_captions(params, "val")[3][1]  # clip 3's second caption: row 16
    proc = cli(
        trained["root"], "src/search.py", caption, "--top-k", "5", "--split", "val", "--json", "--model", RUN
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == RUN and doc["top_k"] == 5
    (result,) = doc["queries"]
    assert result["query"] == caption and result["oov"] == []
    hits = result["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h["split"] == "val" for h in hits)

    model, data = model_and_val(params)
    sim = split_similarity(model, data, device=torch.device("cpu"), batch_size=8)
    row = torch.from_numpy(sim[16])
    top = torch.topk(row, 5)
    assert [h["clip_id"] for h in hits] == [data.clips[i].clip_id for i in top.indices.tolist()]
    np.testing.assert_allclose(scores, top.values.numpy(), atol=1e-5)
    assert hits[0]["clip_id"] == "val_003"  # the trained model finds the caption's own clip
    assert hits[0]["caption"] == load_captions(params, "val")[3][0]  # the clip's first caption


def test_caption_hit_rate_equals_rate_from_similarity(trained: dict[str, Any]) -> None:
    params = trained["params"]
    model, data = model_and_val(params)
    sim = split_similarity(model, data, device=torch.device("cpu"), batch_size=8)
    for k in (1, 3):
        top = np.argsort(-sim, axis=1)[:, :k]
        expected = float(np.mean([i // 5 in top[i] for i in range(sim.shape[0])]))
        assert caption_hit_rate(params, RUN, "val", k=k) == pytest.approx(expected)
    assert caption_hit_rate(params, RUN, "val", k=1) > 0.5  # chance is 1/8: the model learned


def test_table_output_several_queries_and_partial_oov(
    trained: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["a dog barks zzqx then", "the bell rings", "--top-k", "3", "--model", RUN]
    code, stdout, stderr = search_in_process(trained["root"], args, capsys, monkeypatch)
    assert code == 0, stderr
    assert "unknown words left out: zzqx" in stderr
    lines = stdout.splitlines()
    assert lines[0] == f"'a dog barks zzqx then' ({RUN}):"
    header = lines[1]
    assert header.split() == ["rank", "clip", "split", "score", "caption"]
    rows = lines[2:5]
    ranks = [int(r.split()[0]) for r in rows]
    assert ranks == [1, 2, 3]
    # Aligned: clip ids start under "clip", scores end under the end of "score".
    clip_at, score_end = header.index("clip"), header.index("score") + len("score")
    for r in rows:
        assert r[clip_at:].startswith(("train_", "val_", "test_"))
        assert r[score_end] == " " and float(r[:score_end].split()[-1]) <= 1.0
    assert "dog barks" in rows[0]  # the trained model puts a dog clip first
    assert lines[5] == "" and lines[6] == f"'the bell rings' ({RUN}):"
    assert "bell rings" in lines[8]


def test_searcher_batch_equals_single_queries(trained: dict[str, Any]) -> None:
    searcher = Searcher.open(trained["params"], RUN)
    queries = ["a dog barks", "rain falls outside", "the engine idles softly"]
    batched = searcher.search_text(queries, top_k=4)
    for query, result in zip(queries, batched, strict=True):
        (single,) = searcher.search_text([query], top_k=4)
        assert [h.clip_id for h in single.hits] == [h.clip_id for h in result.hits]
        np.testing.assert_allclose([h.score for h in single.hits], [h.score for h in result.hits], atol=1e-6)


# ---------------------------------------------------------------- audio queries
def test_audio_query_ranks_captions_like_the_model(trained: dict[str, Any], tmp_path: Path) -> None:
    params = trained["params"]
    wav = tmp_path / "beep.wav"
    t = np.arange(16000) / 16000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    args = ["--audio", str(wav), "--split", "val", "--top-k", "4", "--json", "--model", RUN]
    proc = cli(trained["root"], "src/search.py", *args)
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["queries"]
    assert result["audio"] == str(wav)
    hits = result["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert all(h["other_clips"] == 0 for h in hits)  # no two val captions of the same text here

    # Direct: the logmel expert on the file, padded as in training, against every val caption.
    model, data = model_and_val(params)
    from atric.audio import load_audio

    frames = build_expert("logmel").embed([load_audio(wav, 16000)])[0]
    with torch.no_grad():
        audio = model.encode_audio({"logmel": pad_frames([frames], data.max_frames["logmel"])})
        from atric.data import pad_words

        words, mask = pad_words(data.words)
        sim = model.similarity(model.encode_text(words, mask), audio)[:, 0]
    top = torch.topk(sim, 4)
    captions = [c for clip in data.clips for c in clip.captions]
    assert [h["caption"] for h in hits] == [captions[i] for i in top.indices.tolist()]
    assert [h["clip_id"] for h in hits] == [data.clips[i // 5].clip_id for i in top.indices.tolist()]
    np.testing.assert_allclose([h["score"] for h in hits], top.values.numpy(), atol=1e-5)


# ---------------------------------------------------------------- approximate index
def test_index_stage_writes_and_search_uses_the_approximate_index(
    trained: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The threshold lowered to 10 clips: the stage writes <run>.faiss, named in the .h5, and
    search answers from it; 48 clips make one list, so the results are the exact ones."""
    raw = {**trained["raw"], "search": {"index_dir": str(tmp_path / "indexes")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    params = Params.model_validate(raw)
    exact = Searcher.open(trained["params"], RUN)
    build_index(params, RUN, exact_below=10)
    path = index_path(params, RUN)
    faiss_file = path.with_suffix(".faiss")
    assert faiss_file.is_file() and not list(path.parent.glob(".*.tmp"))
    index = load_index(path)
    info = json.loads(index.attrs["ann"])
    assert info["file"] == f"{RUN}.faiss" and info["clips"] == 48 and info["exact_below"] == 10
    assert index.ann is not None and index.ann.index.ntotal == 48
    searcher = Searcher.open(params, RUN)
    ann, used = searcher.index.ann, []
    assert ann is not None
    search = ann.search
    monkeypatch.setattr(ann, "search", lambda *args: used.append(len(args[0])) or search(*args))
    queries = ["a dog barks", "rain falls outside"]
    for ours, theirs in zip(searcher.search_text(queries, 5), exact.search_text(queries, 5), strict=True):
        assert [h.clip_id for h in ours.hits] == [h.clip_id for h in theirs.hits]
        np.testing.assert_allclose([h.score for h in ours.hits], [h.score for h in theirs.hits], atol=1e-5)
    assert used == [2]  # both queries, one call
    # The CLI searches it too.
    code, out, err = search_in_process(
        tmp_path, ["a dog barks", "--model", RUN, "--json"], capsys, monkeypatch
    )
    assert code == 0, err
    assert (
        json.loads(out)["queries"][0]["results"][0]["clip_id"]
        == exact.search_text(["a dog barks"], 1)[0].hits[0].clip_id
    )
    # A .faiss file of another build is refused, with how to fix it.
    other = faiss_file.read_bytes()
    build_index(params, RUN, ["val", "test"], exact_below=10)
    faiss_file.write_bytes(other)
    code, _, err = search_in_process(tmp_path, ["a dog barks", "--model", RUN], capsys, monkeypatch)
    assert code == 2 and str(faiss_file) in err and "rebuild the index" in err
    # Rebuilt below the threshold: exact again, the stale .faiss gone.
    build_index(params, RUN)
    assert not faiss_file.exists() and load_index(path).ann is None


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["   "], "empty query"),
        ([], "empty query"),
        (["zzqx qqvb"], "out of vocabulary: zzqx, qqvb"),
        (["?!"], "has no words"),
    ],
)
def test_bad_text_queries_exit_2(
    trained: dict[str, Any], args: list[str], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    code, out, err = search_in_process(trained["root"], [*args, "--model", RUN], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err


def test_unreadable_audio_exits_2(
    trained: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    code, _, err = search_in_process(
        trained["root"], ["--audio", str(bad), "--model", RUN], capsys, monkeypatch
    )
    assert code == 2 and "cannot read audio" in err and str(bad) in err
    code, _, err = search_in_process(
        trained["root"], ["--audio", str(tmp_path / "none.wav"), "--model", RUN], capsys, monkeypatch
    )
    assert code == 2 and "audio file not found" in err


def test_missing_index_tells_how_to_build_it(
    trained: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = {**trained["raw"], "search": {"index_dir": str(tmp_path / "nowhere")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    code, _, err = search_in_process(tmp_path, ["a dog barks", "--model", RUN], capsys, monkeypatch)
    assert code == 2 and "no search index" in err and f"python src/index.py --run {RUN}" in err


def test_index_of_another_model_is_refused(
    trained: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same run name, other weights (e.g. retrained after indexing): the old index is refused."""
    params = trained["params"]
    best = engine.RunPaths.of(params.train, RUN).best
    checkpoint = engine.load_checkpoint(best)
    key = next(k for k in checkpoint["model"] if k.endswith("project.weight"))
    checkpoint["model"][key] = checkpoint["model"][key] + 0.01
    other = tmp_path / "models" / RUN / "best.pt"
    other.parent.mkdir(parents=True)
    torch.save(checkpoint, other)
    (tmp_path / "indexes").mkdir()
    (tmp_path / "indexes" / f"{RUN}.h5").write_bytes(index_path(params, RUN).read_bytes())  # the old index
    raw = {
        **trained["raw"],
        "train": {**trained["raw"]["train"], "models_dir": str(tmp_path / "models")},
        "search": {"index_dir": str(tmp_path / "indexes")},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    code, _, err = search_in_process(tmp_path, ["a dog barks", "--model", RUN], capsys, monkeypatch)
    assert code == 2 and "built by a different model" in err and "checkpoint sha256" in err
    assert f"python src/index.py --run {RUN}" in err
    # Rebuilding the index for the new weights makes it searchable again.
    build_index(Params.model_validate(raw), RUN, ["val"])
    code, out, _ = search_in_process(tmp_path, ["a dog barks", "--model", RUN, "--json"], capsys, monkeypatch)
    assert code == 0 and len(json.loads(out)["queries"][0]["results"]) == 8  # top 10 of 8 val clips


def test_split_not_indexed_is_an_error(trained: dict[str, Any], tmp_path: Path) -> None:
    raw = {**trained["raw"], "search": {"index_dir": str(tmp_path / "idx")}}
    params = Params.model_validate(raw)
    build_index(params, RUN, ["test"])
    searcher = Searcher.open(params, RUN)
    assert set(searcher.index.splits) == {"test"}
    with pytest.raises(Exception, match="split 'val' is not in the index"):
        searcher.search_text(["a dog barks"], 3, split="val")


def test_default_run_is_the_champion(
    trained: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --model the champion is searched (the run reports/champion.json names; stubbed
    here, the file's own tests are in test_report.py)."""
    import atric.ops.champion

    asked: list[str] = []

    def champion(params: Params) -> str:
        asked.append(params.data.dataset)
        return RUN

    monkeypatch.setattr(atric.ops.champion, "champion_run", champion)
    code, out, err = search_in_process(trained["root"], ["a dog barks", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert asked == ["Fake"] and json.loads(out)["model"] == RUN

    def no_champion(params: Params) -> str:
        raise DataError("reports/champion.json: no champion chosen yet")

    monkeypatch.setattr(atric.ops.champion, "champion_run", no_champion)
    code, _, err = search_in_process(trained["root"], ["a dog barks"], capsys, monkeypatch)
    assert code == 2 and "no champion chosen yet" in err and "--model RUN" in err


def test_fused_scores_equal_model_similarity_with_several_experts() -> None:
    """Two experts, text-weighted fusion: the concatenated, pre-weighted matrices give the model's scores."""
    torch.manual_seed(0)
    model = RetrievalModel(
        {"fa": 6, "fb": 4},
        WORD_DIM,
        audio_pooling="mean",
        text_pooling="mean",
        embed_dim=5,
        audio_clusters=2,
        text_clusters=2,
        ghost_clusters=0,
        lstm_hidden=4,
        fusion="text_weighted",
    ).eval()
    rng = np.random.default_rng(1)
    audio = {name: pad_frames([rng.normal(size=(4, d)).astype(np.float32) for _ in range(7)], 4) for name, d in
             (("fa", 6), ("fb", 4))}  # fmt: skip
    words = [rng.normal(size=(int(rng.integers(1, 5)), WORD_DIM)).astype(np.float32) for _ in range(14)]
    with torch.no_grad():
        clips = model.encode_audio(audio)
        from atric.data import pad_words

        text = model.encode_text(*pad_words(words))
        expected = model.similarity(text, clips)  # [14 captions, 7 clips]
    index = SearchIndex(
        clip_ids=[f"c{i}" for i in range(7)],
        splits=np.array(["val"] * 7, dtype=object),
        audio=torch.stack([clips["fa"], clips["fb"]]).numpy(),
        caption_offsets=np.arange(0, 15, 2),
        captions=[f"caption {m}" for m in range(14)],
        caption_text=torch.stack([text[0]["fa"], text[0]["fb"]]).numpy(),
        caption_weights=text[1].numpy(),
        attrs={"experts": json.dumps(["fa", "fb"])},
    )
    assert not torch.allclose(text[1][:, 0], torch.full((14,), 0.5))  # the weights do vary
    searcher = Searcher(model, KeyedVectorSource("none", KeyedVectors(WORD_DIM)), index, max_words=8)
    scores, indices = searcher.top_clips(searcher.embed_texts(words), 7)
    np.testing.assert_allclose(scores.numpy(), torch.sort(expected, dim=1, descending=True).values, atol=1e-6)
    assert torch.equal(indices, torch.argsort(expected, dim=1, descending=True))
    # Audio -> captions: clip 3 against every caption, with each caption's own fusion weights.
    query = torch.cat([clips["fa"][3:4], clips["fb"][3:4]], dim=1)
    np.testing.assert_allclose((searcher.caption_matrix @ query.t())[:, 0], expected[:, 3], atol=1e-6)


@pytest.mark.parametrize(
    ("dataset", "damage", "message"),
    [
        ("caption_offsets", lambda a: np.concatenate([a[:1], a[1:][::-1]]), r"caption_offsets do not split the 240 captions among the 48 clips"),
        ("caption_offsets", lambda a: a * 1000, r"caption_offsets do not split"),
        ("audio", lambda a: np.where(np.arange(a.shape[1])[None, :, None] == 3, np.nan, a), r"audio holds NaN or inf values"),
        ("caption_text", lambda a: a + np.inf, r"caption_text holds NaN or inf values"),
    ],
)
def test_a_damaged_index_is_one_line_naming_the_field(
    trained: dict[str, Any], tmp_path: Path, dataset: str, damage: Any, message: str
) -> None:
    """A corrupt caption_offsets was a traceback; a NaN clip row ranked first with score nan."""
    import shutil

    import h5py

    path = tmp_path / "index.h5"
    shutil.copy(index_path(trained["params"], RUN), path)
    with h5py.File(path, "a") as h5:
        values = damage(h5[dataset][()])
        del h5[dataset]
        h5[dataset] = values
    with pytest.raises(DataError, match=message):
        load_index(path)
