"""The forced aligner against transformers' ``Qwen3ASRForTokenClassification`` on a tiny random checkpoint.

Prompt ids are checked against the ids transformers' ``Qwen3ASRProcessor`` builds from the official toolkit's
input string; timestamp logits to max |jax - ref| / max |ref| <= 1e-4 with identical classes, alone and in
mixed-length batches; words equal transformers' ``decode_forced_alignment`` (clamped to the audio's end); bucketed
shapes reuse the compiled function; named errors; the ``align`` command end to end with SRT/VTT parse-back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

import qasr_jax
from qasr_jax import cli
from qasr_jax.aligner import Aligner, Word, _similar_groups
from qasr_jax.decoding.buckets import aligner_rows
from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.io.units import UnsupportedLanguageError
from qasr_jax.testing import speech, synthetic
from qasr_jax.testing.reference import save_official
from qasr_jax.testing.subtitles import parse_srt, parse_vtt
from qasr_jax.testing.tokenizer_files import write_tokenizer

TOL = 1e-4
CLIPS = {  # audio, transcript, language
    "hello": (lambda: speech("hello_en.wav"), "Hello, world!", "English"),
    "zh": (lambda: speech("zh.wav"), "你好，世界", "Chinese"),
    "long": (lambda: speech("long_en.wav"), "The quick brown fox jumps over the lazy dog. Speech recognition turns "
             "spoken words into text, and the encoder looks at eight seconds at once.", "en"),
    "mixed": (lambda: synthetic(0.3, 4), "我用JAX写code, don't rock'n'roll 2024!", "zh"),
}


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ref(checkpoints):
    return checkpoints("aligner")


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    """The -hf checkpoint folder with tokenizer files added (the fixture's folders have none)."""
    path = tmp_path_factory.mktemp("aligner") / "hf"
    shutil.copytree(ref.hf, path)
    write_tokenizer(path, "official")
    return str(path)


@pytest.fixture(scope="module")
def aligner(folder):
    return Aligner.from_pretrained(folder)


@pytest.fixture(scope="module")
def processor(folder):
    """transformers' processor, which the official toolkit feeds its aligner string to."""
    return Qwen3ASRProcessor(feature_extractor=Qwen3ASRFeatureExtractor(), tokenizer=AutoTokenizer.from_pretrained(folder))


def official_inputs(processor, wave, text, language):
    """Input ids and features built like the official toolkit: units joined by <timestamp><timestamp>."""
    words = processor.split_words_for_alignment(text, language)
    string = "<|audio_start|><|audio_pad|><|audio_end|>" + "<timestamp><timestamp>".join(words) + "<timestamp><timestamp>"
    inputs = processor(text=[string], audio=[wave], return_tensors="pt", padding=True)
    return inputs, words


def reference_logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], input_features=inputs["input_features"],
                     input_features_mask=inputs["input_features_mask"]).logits


def item(aligner, name):
    audio, text, language = CLIPS[name]
    wave, units = aligner._prepare(audio(), text, language, name)
    return aligner._item(wave, units)


@pytest.mark.parametrize("name", list(CLIPS))
def test_prompt_ids_match_official_processor(aligner, processor, name):
    audio, text, language = CLIPS[name]
    inputs, words = official_inputs(processor, audio(), text, language)
    it = item(aligner, name)
    assert it.units == words
    assert it.ids == inputs["input_ids"][0].tolist()
    assert (np.asarray(it.ids)[it.slots] == 151705).all() and len(it.slots) == 2 * len(words)


@pytest.mark.parametrize("name", list(CLIPS))
def test_timestamp_logits_match_reference(aligner, processor, ref, name):
    audio, text, language = CLIPS[name]
    inputs, _ = official_inputs(processor, audio(), text, language)
    want = reference_logits(ref.torch_model, inputs)[0].numpy()
    it = item(aligner, name)
    want = want[it.slots]  # (2 * units, 5000)
    got = aligner._logits([it])[0]
    assert got.shape == want.shape
    assert rel(got, want) <= TOL
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_batched_equals_single_and_reference(aligner, processor, ref):
    names = ["long", "hello", "mixed", "zh"]
    items = [item(aligner, n) for n in names]
    batched = aligner._logits(items)
    singles = []
    for name, it, got in zip(names, items, batched):
        audio, text, language = CLIPS[name]
        want = reference_logits(ref.torch_model, official_inputs(processor, audio(), text, language)[0])[0]
        want = want.numpy()[it.slots]
        alone = aligner._logits([it])[0]
        assert rel(got, want) <= TOL and rel(got, alone) <= TOL
        assert (got.argmax(-1) == want.argmax(-1)).all()
        singles.append(aligner._words(it, alone.argmax(-1)))
    # And the public API: align_batch (sorted into batches of 2 by length) gives the words of each clip alone.
    clips = [CLIPS[n] for n in names]
    words = aligner.align_batch([c[0]() for c in clips], [c[1] for c in clips], [c[2] for c in clips], batch_size=2)
    assert words == singles


@pytest.fixture(scope="module")
def early(ref, tmp_path_factory):
    """A variant whose head favours classes 0-29 (0-2.3 s), so that times vary inside short clips.

    With the fixture's weights nearly every prediction lies past the audio's end; here most fall inside the clip
    and come out of order, which exercises the repair and the clamp. Returns (reference model, folder).
    """
    model = copy.deepcopy(ref.torch_model)
    with torch.no_grad():
        model.score.weight[30:] = 0.0
        model.score.weight[:30] *= 4.0
    path = tmp_path_factory.mktemp("early") / "official"
    save_official(model, ref.cfg, str(path))
    write_tokenizer(path, "hf")
    return model, str(path)


def test_bfloat16_close_to_reference(folder, processor, ref):
    """bf16 weights and compute: timestamp logits within 2e-2 of the float32 reference, its class where clear."""
    aligner = Aligner.from_pretrained(folder, dtype="bfloat16")
    audio, text, language = CLIPS["mixed"]
    it = item(aligner, "mixed")
    want = reference_logits(ref.torch_model, official_inputs(processor, audio(), text, language)[0])[0].numpy()
    want = want[it.slots]
    got = aligner._logits([it])[0]
    assert rel(got, want) <= 2e-2
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2e-2 * np.abs(want).max()
    assert clear.sum() >= len(it.slots) // 2
    assert (got.argmax(-1)[clear] == want.argmax(-1)[clear]).all()


def test_words_match_transformers_decode(early, processor):
    model, path = early
    aligner = Aligner.from_pretrained(path)  # official layout + tokenizer.json
    checked_inside = 0
    for name in ["hello", "zh", "mixed"]:
        audio, text, language = CLIPS[name]
        wave = audio()
        inputs, words = official_inputs(processor, wave, text, language)
        logits = reference_logits(model, inputs)
        want = processor.decode_forced_alignment(logits, inputs["input_ids"], [words], 151705)[0]
        got = aligner.align(wave, text, language)
        end_of_audio = np.floor(len(wave) / 16) / 1000
        assert [w.text for w in got] == words
        for w, r in zip(got, want):
            assert (w.start, w.end) == (min(r["start_time"], end_of_audio), min(r["end_time"], end_of_audio))
            checked_inside += r["end_time"] < end_of_audio
        assert all(a.end <= b.start for a, b in zip(got, got[1:]))
    assert checked_inside >= 3  # the comparison saw times inside the audio, not only clamped ones


def test_batches_never_mix_lengths_more_than_2x_apart():
    """Sorted sizes 1 1 2 2 3 5 9 10 10 in batches of at most 4: a batch ends when full or when the next size
    exceeds twice its first: [1 1 2 2] (full), [3 5] (then 9 > 2 x 3), [9 10 10]."""
    sizes = [1, 1, 2, 2, 3, 5, 9, 10, 10]
    assert _similar_groups(sizes, 4, lambda n: n) == [[1, 1, 2, 2], [3, 5], [9, 10, 10]]
    assert _similar_groups(sizes, 1, lambda n: n) == [[n] for n in sizes]
    assert _similar_groups([], 8, lambda n: n) == []
    assert [aligner_rows(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]


def test_bucketed_shapes_compile_once(aligner):
    """Two clips of different length, units and tokens inside one bucket reuse one compiled function."""
    aligner.align(synthetic(9.3, 7), "one two three", "English")  # 10 s of frames, about 131 tokens, 6 slots
    with count_compilations() as compiled:
        aligner.align(synthetic(9.8, 8), "four five six seven", "English")  # 10 s of frames, about 140 tokens, 8 slots
    assert compiled.count == 0


def test_errors(aligner):
    wave = speech("hello_en.wav")
    with pytest.raises(UnsupportedLanguageError) as err:
        aligner.align(wave, "Merhaba dünya", "Turkish")
    assert "Chinese, English, Cantonese, French, German, Italian, Japanese, Korean, Portuguese, Russian, Spanish" \
        in str(err.value)
    with pytest.raises(ValueError, match="text is empty"):
        aligner.align(wave, "  \n", "English")
    with pytest.raises(ValueError, match="no alignable unit"):
        aligner.align(wave, "... -- !?", "English")
    with pytest.raises(ValueError, match="one text and one language per audio"):
        aligner.align_batch([wave, wave], ["a"], "en")
    with pytest.raises(TypeError, match="list of transcripts"):
        aligner.align_batch([wave], "hello", "en")
    with pytest.raises(FileNotFoundError):
        aligner.align("/no/such/clip.wav", "hello", "en")
    with pytest.raises(FileNotFoundError):
        Aligner.from_pretrained("./no/such/folder")


def test_rejects_a_speech_recognizer(checkpoints, folder):
    asr = qasr_jax.load(checkpoints("asr").hf)
    with pytest.raises(ValueError, match="not a forced aligner"):
        Aligner(asr, Tokenizer.from_dir(folder))


def test_audio_over_the_limit_needs_split(aligner):
    short = Aligner(aligner.model, aligner.tokenizer, max_seconds=6.0)
    audio, text, language = CLIPS["long"]
    with pytest.raises(ValueError, match=r"10\.1 s long.*at most 6 s.*split=True"):
        short.align(audio(), text, language)


def test_five_minutes_in_one_pass(aligner):
    """300 s is the limit: it aligns in one pass (times inside the audio); 300.01 s is refused without split."""
    words = aligner.align(synthetic(300.0, 9), "a b c", "en")
    assert [w.text for w in words] == ["a", "b", "c"]
    assert all(0 <= w.start <= w.end <= 300.0 for w in words)
    with pytest.raises(ValueError, match="at most 300 s"):
        aligner.align(np.zeros(300 * 16000 + 160, np.float32), "a b c", "en")


def scripted(aligner, place):
    """The aligner with its forward pass replaced: ``place(k)`` gives the (start, end) classes of window unit k."""
    short = Aligner(aligner.model, aligner.tokenizer, max_seconds=6.0)
    windows = []

    def classes(items):
        windows.extend((len(it.wave), list(it.units)) for it in items)
        return [np.array([c for k in range(len(it.units)) for c in place(k)], np.int32) for it in items]

    short._classes = classes
    return short, windows


def test_split_windows_by_hand(aligner):
    """10 s of silence, 12 units, windows of at most 6 s, unit k of a window at 0.8k s for 0.4 s.

    Silence is quietest everywhere, so each window is cut at the first 100 ms of its last 1.5 s: 4.55 s long.
    Window 1 gets ceil(12 * 4.55/10 * 1.25) + 2 = 9 units; those ending by 4.55 - 4.55/4 = 3.4125 s are sure:
    w0-w3 (ends 0.4 .. 2.8). Window 2 starts at 2.8 s, gets min(8, ceil(8 * 4.55/7.2 * 1.25) + 2) = 8 units and
    keeps w4-w7; window 3 starts at 2.8 + 2.8 = 5.6 s with 4.4 s left, under the limit, and takes w8-w11.
    """
    short, windows = scripted(aligner, lambda k: (10 * k, 10 * k + 5))
    text = " ".join(f"w{k}" for k in range(12))
    words = short.align(np.zeros(160000, np.float32), text, "en", split=True)
    assert [(n, len(u)) for n, u in windows] == [(72800, 9), (72800, 8), (70400, 4)]
    offsets = [0.0] * 4 + [2.8] * 4 + [5.6] * 4
    want = [Word(f"w{k}", round(o + 0.8 * (k % 4), 3), round(o + 0.8 * (k % 4) + 0.4, 3)) for k, o in enumerate(offsets)]
    assert words == want


def test_split_window_with_nothing_sure_moves_on(aligner):
    """Every unit predicted past the window's end: nothing is sure, so each window advances by its length less the
    guard (4.55 - 1.1375 s). Window 2 (6.5875 s left) gets min(12, ceil(12 * 4.55/6.5875 * 1.25) + 2) = 12 units;
    the last window (3.175 s from 6.825 s) takes all 12, each clamped to its end: 10.0 s."""
    short, windows = scripted(aligner, lambda k: (4999, 4999))
    words = short.align(np.zeros(160000, np.float32), "a b c d e f g h i j k l", "en", split=True)
    assert [(n, len(u)) for n, u in windows] == [(72800, 9), (72800, 12), (50800, 12)]
    assert words == [Word(c, 10.0, 10.0) for c in "abcdefghijkl"]


def run_cli(argv, capsys):
    code = cli.main(["align", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_align_command_end_to_end(early, tmp_path, capsys, monkeypatch):
    """hello_en.wav says "Hello world": SRT and VTT parse back, times monotonic and inside the 1.25 s clip."""
    _, path = early
    # cli.main runs in this process: keep JAX's global config (and ~/.cache) free of the on-disk compilation cache.
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    clip = str(tmp_path / "hello.wav")
    shutil.copy(f"{__file__.rsplit('/', 1)[0]}/data/hello_en.wav", clip)
    transcript = tmp_path / "hello.txt"
    transcript.write_text("Hello world.\n", encoding="utf-8")
    duration = len(speech("hello_en.wav")) / 16000
    cues = {}
    for fmt, parse in [("srt", parse_srt), ("vtt", parse_vtt)]:
        code, out, err = run_cli([clip, "Hello, world!", "--language", "en", "--model", path, "-f", fmt], capsys)
        assert code == 0, err
        cues[fmt] = parse(out)
        assert [c[2] for c in cues[fmt]] == ["Hello", "world"]
        times = [t for c in cues[fmt] for t in c[:2]]
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= duration
    assert cues["srt"] == cues["vtt"]
    dest = tmp_path / "out.json"
    code, out, err = run_cli([clip, str(transcript), "-l", "English", "-m", path, "-o", str(dest)], capsys)
    assert code == 0 and out == ""
    data = json.loads(dest.read_text(encoding="utf-8"))
    assert [(d["start"], d["end"], d["text"]) for d in data] == cues["srt"]
    code, out, err = run_cli([clip, "Hello", "-l", "Arabic", "-m", path], capsys)
    assert code == 2 and err.startswith("qasr-jax align: error: ") and "Cantonese" in err and out == ""
    # txt: one word a line; tsv: a header, then integer milliseconds and the word.
    code, out, err = run_cli([clip, "Hello, world!", "-l", "en", "-m", path, "-f", "txt"], capsys)
    assert code == 0 and out == "Hello\nworld\n", err
    code, out, err = run_cli([clip, "Hello, world!", "-l", "en", "-m", path, "-f", "tsv"], capsys)
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and rows[0] == ["start", "end", "text"], err
    assert [(int(a) / 1000, int(b) / 1000, t) for a, b, t in rows[1:]] == cues["srt"]


def test_word_is_a_frozen_record():
    w = Word("hi", 0.1, 0.2)
    assert (w.text, w.start, w.end) == ("hi", 0.1, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.start = 1.0  # type: ignore[misc]
