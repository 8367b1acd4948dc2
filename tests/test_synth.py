"""The synthetic corpus: determinism, file format, caption/event consistency, held-out wording, safety."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from atric.config import DataParams, SplitSizes, SynthParams
from atric.corpus import synth
from atric.corpus.captions import (
    ADJECTIVES,
    ADVERBS,
    FORWARD_WORDS,
    OVERLAP_WORDS,
    REVERSE_WORDS,
    CaptionEvent,
    heldout_overlap,
    make_captions,
)
from atric.corpus.events import EVENT_TYPES, render_event
from atric.corpus.synth import plan_clip, read_synth_raw, synthesize_corpus
from atric.errors import DataError
from atric.layout import Manifest, ManifestClip

MIN_DUR, MAX_DUR = 1.0, 2.0


def tiny_params(raw_dir: Path, seed: int = 0, train: int = 6) -> DataParams:
    return DataParams(
        raw_dir=str(raw_dir),
        seed=seed,
        synth=SynthParams(
            clips=SplitSizes(train=train, val=3, test=3), min_duration=MIN_DUR, max_duration=MAX_DUR
        ),
    )


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("corpus") / "raw"
    synthesize_corpus(tiny_params(raw), progress=False)
    return raw


def _words_regex(words: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b")


FORWARD_RE, REVERSE_RE, OVERLAP_RE = map(_words_regex, (FORWARD_WORDS, REVERSE_WORDS, OVERLAP_WORDS))
MODIFIER_RE = {m: _words_regex(ADJECTIVES[m] + ADVERBS[m]) for m in ADJECTIVES}
ANY_MODIFIER_RE = _words_regex(tuple(w for m in ADJECTIVES for w in ADJECTIVES[m] + ADVERBS[m]))


def first_mention(caption: str, event_type: str) -> int:
    text = caption.lower()
    hits = [m.start() for kw in EVENT_TYPES[event_type].keywords for m in re.finditer(r"\b" + kw, text)]
    assert hits, f"caption {caption!r} does not mention {event_type}"
    return min(hits)


def check_caption_order(caption: str, events: list[dict]) -> None:
    """Each pair of events mentioned one after the other is joined by a word true to their times."""
    text = caption.lower()
    mentioned = sorted((first_mention(caption, e["type"]), k) for k, e in enumerate(events))
    for j, ((pos_a, a), (pos_b, b)) in enumerate(itertools.pairwise(mentioned)):
        ea, eb = events[a], events[b]
        end_a, end_b = ea["onset"] + ea["duration"], eb["onset"] + eb["duration"]
        between = text[pos_a:pos_b]
        if OVERLAP_RE.search(between):
            assert ea["onset"] < end_b and eb["onset"] < end_a, f"{caption!r}: says overlap, times don't"
        elif REVERSE_RE.search(between):
            assert end_b <= eb["onset"] + 1e-9 or end_b <= ea["onset"] + 1e-9, f"{caption!r}: order wrong"
        elif FORWARD_RE.search(between) or (j == 0 and re.search(r"\bafter\b", text[:pos_a])):
            assert end_a <= eb["onset"] + 1e-9, (
                f"{caption!r}: says {ea['type']} before {eb['type']}; {events}"
            )
        else:
            pytest.fail(f"{caption!r}: no order or overlap word between {ea['type']} and {eb['type']}")


def planned_captions(split: str, count: int, seed: int = 0) -> list[tuple[list[dict], list[str]]]:
    """Plans and captions without rendering audio: fast enough for hundreds of clips."""
    data = DataParams(seed=seed)
    result = []
    for index in range(count):
        plan_seq, _, caption_seq = synth._seed_sequence(seed, split, index, synth._PURPOSE_CLIP).spawn(3)
        _, events = plan_clip(data, split, index, np.random.default_rng(plan_seq))
        caption_events = [CaptionEvent(e.type, e.onset, e.duration, e.modifier) for e in events]
        captions = make_captions(caption_events, split, np.random.default_rng(caption_seq))
        result.append(([e.__dict__ for e in events], captions))
    return result


# ---------------------------------------------------------------- determinism
def test_same_params_give_byte_identical_files_and_other_seed_differs(
    tmp_path: Path, tiny_corpus: Path
) -> None:
    again = tmp_path / "again"
    synthesize_corpus(tiny_params(again), progress=False)
    first, second = tree_bytes(tiny_corpus), tree_bytes(again)
    assert len(first) == 13 and first == second

    other = tmp_path / "other"
    synthesize_corpus(tiny_params(other, seed=1), progress=False)
    other_files = tree_bytes(other)
    assert other_files.keys() == first.keys()
    wavs = [k for k in first if k.endswith(".wav")]
    assert all(first[k] != other_files[k] for k in wavs)


def test_clips_do_not_depend_on_split_sizes(tmp_path: Path, tiny_corpus: Path) -> None:
    bigger = tmp_path / "bigger"
    synthesize_corpus(tiny_params(bigger, train=8), progress=False)
    old, new = tree_bytes(tiny_corpus), tree_bytes(bigger)
    assert len(new) == len(old) + 2
    assert all(new[name] == old[name] for name in old if name.endswith(".wav"))
    old_clips = {c.clip_id: c for c in read_synth_raw(tiny_corpus).clips}
    new_clips = {c.clip_id: c for c in read_synth_raw(bigger).clips}
    assert all(
        new_clips[k].captions == c.captions and new_clips[k].extra == c.extra for k, c in old_clips.items()
    )


# ---------------------------------------------------------------- format
def test_every_clip_file_and_record_is_well_formed(tiny_corpus: Path) -> None:
    doc = json.loads((tiny_corpus / "captions.json").read_text())
    assert (doc["format"], doc["dataset"], doc["sample_rate"]) == ("atric-synth-v1", "SynthCaps", 16000)
    manifest = read_synth_raw(tiny_corpus)
    assert manifest.source == "synth" and manifest.audio_root == str(tiny_corpus)
    assert [len(manifest.split(s)) for s in ("train", "val", "test")] == [6, 3, 3]
    for clip in manifest.clips:
        assert clip.audio == f"audio/{clip.split}/{clip.clip_id}.wav"
        info = sf.info(manifest.audio_path(clip))
        assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "PCM_16", 1, 16000)
        seconds = info.frames / info.samplerate
        assert MIN_DUR - 1e-6 <= seconds <= MAX_DUR + 1e-6
        assert seconds == pytest.approx(clip.duration, abs=1 / 16000)
        audio, _ = sf.read(manifest.audio_path(clip), dtype="int16")
        assert np.abs(audio.astype(np.int32)).max() < 32767  # scaled, not clipped
        assert len(clip.captions) == 5 and all(c.strip() for c in clip.captions)
        events = clip.extra["events"]
        assert 1 <= len(events) <= 3
        assert [e["onset"] for e in events] == sorted(e["onset"] for e in events)
        for event in events:
            assert set(event) == {"type", "onset", "duration", "gain_db", "modifier"}
            assert event["type"] in EVENT_TYPES and event["modifier"] in (None, *ADJECTIVES)
            assert 0 <= event["onset"] and event["onset"] + event["duration"] <= clip.duration + 1e-6
        for caption in clip.captions:
            check_caption_order(caption, events)


def test_captions_name_every_event_in_an_order_true_to_the_onsets() -> None:
    clips = planned_captions("train", 250) + planned_captions("test", 80)
    relations_seen = set()
    modified, mentioned = 0, 0
    for events, captions in clips:
        assert len(captions) == 5
        relations_seen.update(synth.relations_of(events))
        for caption in captions:
            check_caption_order(caption, events)  # also asserts each event is mentioned
            for event in events:
                if event["modifier"]:
                    modified += 1
                    mentioned += bool(MODIFIER_RE[event["modifier"]].search(caption.lower()))
            if not any(e["modifier"] for e in events):
                assert not ANY_MODIFIER_RE.search(caption.lower()), caption
    assert relations_seen == {"then", "overlap"}
    assert 0.6 < mentioned / modified < 0.95  # modifiers are usually, not always, described
    reversed_wording = sum(bool(REVERSE_RE.search(c.lower())) for _, caps in clips for c in caps)
    assert reversed_wording > 20  # some captions mention the later event first


def test_paired_clips_share_event_types_in_another_order() -> None:
    clips = planned_captions("train", 60)
    differing = 0
    for k in range(0, 60, 2):
        types_a = [e["type"] for e in clips[k][0]]
        types_b = [e["type"] for e in clips[k + 1][0]]
        assert sorted(types_a) == sorted(types_b)
        if len(types_a) > 1:
            assert types_a != types_b
            differing += 1
    assert differing >= 15


def test_event_phrases_use_only_their_own_keywords_and_no_connectives() -> None:
    connective = _words_regex(FORWARD_WORDS + REVERSE_WORDS + OVERLAP_WORDS)
    for name, event_type in EVENT_TYPES.items():
        adjectives = [""] + [a + " " for m in ADJECTIVES for a in ADJECTIVES[m]]
        phrases = [p.format(adj=a) for p in event_type.noun_phrases for a in adjectives]
        phrases += [
            c + s for c in event_type.clauses for s in [""] + [" " + a for m in ADVERBS for a in ADVERBS[m]]
        ]
        for phrase in phrases:
            assert any(re.search(r"\b" + kw, phrase) for kw in event_type.keywords), (name, phrase)
            assert not connective.search(phrase), (name, phrase)
            for other_name, other in EVENT_TYPES.items():
                if other_name != name:
                    assert not any(re.search(r"\b" + kw, phrase) for kw in other.keywords), (
                        name,
                        phrase,
                        other_name,
                    )


# ---------------------------------------------------------------- event signatures
def _signature(audio: np.ndarray, sr: int) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(
        y=audio.astype(np.float32), sr=sr, n_fft=1024, hop_length=256, n_mels=40
    )
    log_mel = librosa.power_to_db(mel, ref=np.max, top_db=50)
    return np.concatenate([log_mel.mean(axis=1), log_mel.std(axis=1)])  # spectrum and its variation in time


def test_at_least_20_event_types_with_distinct_signatures() -> None:
    sr, n = 16000, 24000
    assert len(EVENT_TYPES) >= 20
    signatures = {
        name: [_signature(render_event(name, np.random.default_rng(seed), n, sr), sr) for seed in (1, 2)]
        for name in EVENT_TYPES
    }
    separated = []
    for a, b in itertools.combinations(signatures, 2):
        within = max(
            np.linalg.norm(signatures[a][0] - signatures[a][1]),
            np.linalg.norm(signatures[b][0] - signatures[b][1]),
        )
        separated.append(np.linalg.norm(signatures[a][0] - signatures[b][0]) > within)
    assert np.mean(separated) >= 0.85
    # Within-type variation is real: two renders of a type are not one template.
    assert all(not np.allclose(s[0], s[1]) for s in signatures.values())


def test_every_event_type_renders_any_length_finite() -> None:
    for name in EVENT_TYPES:
        for n in (1, 80, 4000):
            audio = render_event(name, np.random.default_rng(0), n, 16000)
            assert audio.shape == (n,) and np.isfinite(audio).all(), name
        assert np.isfinite(render_event(name, np.random.default_rng(0), 8000, 8000)).all()  # low sample rate


# ---------------------------------------------------------------- held-out wording
def test_no_val_or_test_caption_appears_in_train(tiny_corpus: Path) -> None:
    assert heldout_overlap(read_synth_raw(tiny_corpus)) == 0.0
    train = [c for _, caps in planned_captions("train", 300) for c in caps]
    held_out = [c for _, caps in planned_captions("val", 150) + planned_captions("test", 150) for c in caps]
    clips = [ManifestClip(f"t{k}", "train", "x.wav", 1.0, (c,)) for k, c in enumerate(train)]
    clips += [ManifestClip(f"v{k}", "val", "x.wav", 1.0, (c,)) for k, c in enumerate(held_out)]
    manifest = Manifest("SynthCaps", "synth", 16000, ".", tuple(clips))
    assert heldout_overlap(manifest) == 0.0
    # The check itself can see a leak: copy one train caption into val.
    leaked = Manifest(
        "SynthCaps", "synth", 16000, ".", (*clips, ManifestClip("leak", "val", "x.wav", 1.0, (train[0],)))
    )
    assert heldout_overlap(leaked) == pytest.approx(1 / (len(held_out) + 1))


# ---------------------------------------------------------------- safety and reading
def test_refuses_to_overwrite_a_directory_that_is_not_a_synth_corpus(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "audio").mkdir(parents=True)
    (raw / "audio" / "my_recording.wav").write_bytes(b"precious")
    (raw / "clotho_captions_development.csv").write_text("file_name,caption_1\n")
    with pytest.raises(DataError, match="refusing"):
        synthesize_corpus(tiny_params(raw), progress=False)
    assert (raw / "audio" / "my_recording.wav").read_bytes() == b"precious"

    lookalike = tmp_path / "lookalike"
    lookalike.mkdir()
    (lookalike / "captions.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="refusing"):
        synthesize_corpus(tiny_params(lookalike), progress=False, force=True)
    assert json.loads((lookalike / "captions.json").read_text()) == {"format": "something-else"}


def test_identical_corpus_is_skipped_and_a_crash_keeps_the_old_one(
    tmp_path: Path, tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "raw"
    assert synthesize_corpus(tiny_params(raw), progress=False).status == "written"
    before = tree_bytes(raw)
    assert synthesize_corpus(tiny_params(raw), progress=False).status == "up-to-date"

    calls = []

    def failing_make_clip(*args: object) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_make_clip(*args)

    real_make_clip = synth.make_clip
    monkeypatch.setattr(synth, "make_clip", failing_make_clip)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthesize_corpus(tiny_params(raw, seed=5), progress=False)
    assert tree_bytes(raw) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no staging directory left behind
    monkeypatch.undo()

    assert synthesize_corpus(tiny_params(raw, seed=5), progress=False).status == "written"
    assert tree_bytes(raw) != before


def test_read_synth_raw_reports_missing_and_malformed_captions_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "captions.json")) + ".*not found"):
        read_synth_raw(tmp_path)
    path = tmp_path / "captions.json"
    path.write_text('{"format": "atric-synth-v1", "clips": [')
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not valid JSON"):
        read_synth_raw(tmp_path)
    path.write_text(
        json.dumps({"format": "atric-synth-v1", "sample_rate": 16000, "clips": [{"clip_id": "a"}]})
    )
    with pytest.raises(DataError, match=re.escape(str(path)) + r".*clips\[0\]"):
        read_synth_raw(tmp_path)
    path.write_text(json.dumps({"format": "clotho", "clips": []}))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*format"):
        read_synth_raw(tmp_path)


@pytest.mark.slow
def test_make_data_raw_puts_the_generated_corpus_into_dvcs_cache(tmp_path: Path) -> None:
    """`make run`'s corpus step: generated, then in DVC's cache, so `dvc status` is clean (it said
    "data.dvc: changed outs: not in cache: data/raw", and `dvc exp run --temp/--queue` failed)."""
    import subprocess
    import sys

    import fakes

    work = fakes.copy_repo_with_params(tmp_path / "repo", {})
    venv = Path(sys.executable).parent.parent
    env = fakes.dvc_env()
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "clone"]):
        subprocess.run(command, cwd=work, env=env, check=True, capture_output=True)
    # The project's venv as it is (-o: not "updated" because the copy's pyproject.toml is newer).
    done = subprocess.run(["make", "-s", f"VENV={venv}", "-o", f"{venv}/bin/.installed", "data/raw"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "differs from the one data.dvc recorded" not in done.stderr  # the same bytes as committed
    status = subprocess.run(["dvc", "status", "data.dvc"], cwd=work, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
    assert subprocess.run(["git", "diff", "--quiet", "data.dvc"], cwd=work).returncode == 0
