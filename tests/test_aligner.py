"""The forced aligner against transformers' ``Qwen3ASRForTokenClassification`` on a tiny random checkpoint.

Prompt ids are checked against the ids transformers' ``Qwen3ASRProcessor`` builds from the official toolkit's
input string; timestamp logits to max |jax - ref| / max |ref| <= 1e-4 with identical classes, alone and in
mixed-length batches; words equal transformers' ``decode_forced_alignment`` (clamped to the audio's end); bucketed
shapes reuse the compiled function; named errors; the ``align`` command end to end with SRT/VTT parse-back.
"""

from __future__ import annotations

import argparse
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
from qasr_jax.aligner import Aligner, Word, add_align_arguments, align_command
from qasr_jax.tokenizer import Tokenizer
from qasr_jax.units import UnsupportedLanguageError
from tests.conftest import speech, synthetic
from tests.reference import save_official
from tests.test_formats import parse_srt, parse_vtt
from tests.tokenizer_files import write_tokenizer

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
    got = aligner.timestamp_logits([it])[0]
    assert got.shape == want.shape
    assert rel(got, want) <= TOL
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_batched_equals_single_and_reference(aligner, processor, ref):
    names = ["long", "hello", "mixed", "zh"]
    items = [item(aligner, n) for n in names]
    batched = aligner.timestamp_logits(items)
    singles = []
    for name, it, got in zip(names, items, batched):
        audio, text, language = CLIPS[name]
        want = reference_logits(ref.torch_model, official_inputs(processor, audio(), text, language)[0])[0]
        want = want.numpy()[it.slots]
        alone = aligner.timestamp_logits([it])[0]
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


def test_bucketed_shapes_compile_once(aligner):
    """Two clips of different length, units and tokens inside one bucket reuse one compiled function."""
    aligner.align(synthetic(1.7, 7), "one two three", "English")
    before = aligner._classes_fn._cache_size()
    aligner.align(synthetic(6.2, 8), "four five six seven eight nine", "English")
    assert aligner._classes_fn._cache_size() == before


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
    short = Aligner(aligner.model, aligner.tokenizer, max_seconds=4.0)
    short._classes_fn = aligner._classes_fn  # same model: share the compiled function
    audio, text, language = CLIPS["long"]
    wave = audio()
    with pytest.raises(ValueError, match=r"10\.1 s long.*at most 4 s.*split=True"):
        short.align(wave, text, language)
    words = short.align(wave, text, language, split=True)
    assert [w.text for w in words] == item(aligner, "long").units
    assert all(0 <= w.start <= w.end <= len(wave) / 16000 for w in words)
    assert all(a.end <= b.start for a, b in zip(words, words[1:]))


def run_cli(argv, capsys):
    parser = add_align_arguments(argparse.ArgumentParser(prog="qasr-jax align"))
    code = align_command(parser.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_align_command_end_to_end(early, tmp_path, capsys):
    """hello_en.wav says "Hello world": SRT and VTT parse back, times monotonic and inside the 1.25 s clip."""
    _, path = early
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
    assert code == 2 and "Cantonese" in err and out == ""


def test_word_is_a_frozen_record():
    w = Word("hi", 0.1, 0.2)
    assert (w.text, w.start, w.end) == ("hi", 0.1, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.start = 1.0  # type: ignore[misc]
