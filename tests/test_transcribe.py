"""Transcription end to end: Python API and CLI against the reference's greedy generate; bad input; formats."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers.models.qwen3_asr import Qwen3ASRProcessor

from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.io.audio import load_audio
from qasr_jax.io.prompts import build_prompt_ids
from qasr_jax.modeling.config import audio_token_count
from qasr_jax.testing import DATA, synthetic
from qasr_jax.transcribe import Transcriber
from qasr_jax.testing.parity import reference_ids, reference_inputs
from qasr_jax.testing.tokenizer_files import with_tokenizer

NEW = 10  # new tokens per input: random weights rarely stop, so every row runs to the limit



FILES = ["hello_en.wav", "zh.wav", "long_en.wav"]


def test_greedy_ids_equal_reference_single_and_batched(checkpoints, asr):
    ck = checkpoints("asr")
    paths = [os.path.join(DATA, f) for f in FILES]
    waves = [load_audio(p) for p in paths] + [synthetic(0.4, 7)]
    expected = [reference_ids(ck, asr.tokenizer, w) for w in waves]
    batched = asr.transcribe(paths + [waves[-1]], max_new_tokens=NEW, batch_size=4)
    assert [r.token_ids for r in batched] == expected
    single = [asr.transcribe(w, max_new_tokens=NEW)[0] for w in waves]
    assert [r.token_ids for r in single] == expected
    # Text and language as the reference's processor parses the decoded output ("language X<asr_text>text", or
    # plain text when there is no header).
    processor = object.__new__(Qwen3ASRProcessor)  # parse_output needs no tokenizer
    for r, w in zip(batched, waves):
        assert r.error is None and r.duration == pytest.approx(w.shape[0] / 16000)
        parsed = processor.parse_output(asr.tokenizer.decode(r.token_ids))
        assert (r.language, r.text) == (parsed["language"], parsed["transcription"])


def test_forced_language_and_context_reach_the_prompt(checkpoints, asr):
    ck = checkpoints("asr")
    wave = load_audio(os.path.join(DATA, "hello_en.wav"))
    expected = reference_ids(ck, asr.tokenizer, wave, language="English", context="Qwen, JAX")
    r = asr.transcribe(wave, language="en", context="Qwen, JAX", max_new_tokens=NEW)[0]
    assert r.token_ids == expected
    assert r.language == "English"  # forced: every generated token is text
    assert r.text == asr.tokenizer.decode(expected).strip()


def test_beam_search_runs_through_the_pipeline(checkpoints, asr):
    ck = checkpoints("asr")
    wave = load_audio(os.path.join(DATA, "zh.wav"))
    feats, mask = reference_inputs(wave)
    n_audio = audio_token_count(int(mask.sum()), ck.cfg.audio)
    ids = torch.tensor([build_prompt_ids(asr.tokenizer, n_audio)])
    with torch.no_grad():
        out = ck.torch_model.generate(input_ids=ids, input_features=feats, input_features_mask=mask,
                                      max_new_tokens=6, do_sample=False, num_beams=3, length_penalty=1.0,
                                      eos_token_id=list(asr.tokenizer.eos_ids))
    assert asr.transcribe(wave, beam_size=3, max_new_tokens=6)[0].token_ids == out[0, ids.shape[1]:].tolist()


def test_long_audio_is_cut_into_pieces(asr):
    path = os.path.join(DATA, "long_en.wav")
    whole = load_audio(path)
    r = asr.transcribe(path, max_new_tokens=NEW, max_audio_seconds=4.0)[0]
    assert len(r.segments) == 3
    starts = [s.start for s in r.segments]
    assert starts[0] == 0.0 and all(b - a <= 4.0 for a, b in zip(starts, starts[1:] + [r.duration]))
    assert r.segments[-1].end == pytest.approx(whole.shape[0] / 16000, abs=1e-3)
    # Each piece is transcribed as if it were its own input.
    pieces = [whole[int(round(a * 16000)) : int(round(b * 16000))] for a, b in zip(starts, starts[1:] + [r.duration])]
    alone = asr.transcribe(pieces, max_new_tokens=NEW)
    assert r.token_ids == [t for p in alone for t in p.token_ids]


def test_new_lengths_inside_a_bucket_compile_nothing(asr):
    """After one batch, a second batch of new lengths (longest in the same 4-chunk frame bucket) and another
    max_new_tokens compile nothing."""
    asr.transcribe([synthetic(2.1, 1), synthetic(3.3, 2)], max_new_tokens=NEW, batch_size=2)
    with count_compilations() as compiles:
        asr.transcribe([synthetic(3.7, 3), synthetic(1.2, 4)], max_new_tokens=NEW - 3, batch_size=2)
    assert compiles.count == 0


def test_bad_inputs_get_named_errors(asr, tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    for bad, words in [(empty, "empty"), (garbage, "garbage.wav"), (tmp_path, "directory")]:
        with pytest.raises(ValueError) as err:
            asr.transcribe(str(bad))
        assert str(bad) in str(err.value) and words in str(err.value).lower()
    # Silence is valid input: an empty transcript (even from random weights, which would babble), no error.
    (quiet,) = asr.transcribe(str(silent), max_new_tokens=5)
    assert (quiet.error, quiet.text, quiet.token_ids, quiet.language, quiet.duration) == (None, "", [], None, 1.0)
    with pytest.raises(ValueError, match="Klingon.*English"):
        asr.transcribe(synthetic(1.0), language="Klingon")
    with pytest.raises(ValueError, match="max_new_tokens"):
        asr.transcribe(synthetic(1.0), max_new_tokens=10**6)
    # errors="collect": the bad one is reported, the good ones still come back.
    out = asr.transcribe([str(garbage), synthetic(1.0)], max_new_tokens=3, errors="collect")
    assert out[0].error and "garbage.wav" in out[0].error and out[1].error is None and len(out[1].token_ids) == 3


def test_a_context_over_the_limit_is_refused_before_any_work(asr, tmp_path):
    """A context (with its hotwords) over MAX_CONTEXT_TOKENS is refused, naming it and the limit, before the audio
    is read (the missing file is not the error) or the model runs; the limit itself is accepted by the check."""
    from qasr_jax.io.prompts import MAX_CONTEXT_TOKENS
    from qasr_jax.io.prompts import context_problem

    tok = asr.tokenizer
    words = ["name"] * (MAX_CONTEXT_TOKENS + 1)  # one token each, as the tokenizer counts them
    assert len(tok.encode(" ".join(words))) == MAX_CONTEXT_TOKENS + 1
    assert context_problem(tok, " ".join(words[:-1])) is None
    missing = str(tmp_path / "not-read.wav")
    with pytest.raises(ValueError, match="^context is 10,001 tokens, over the limit of 10,000 "):
        asr.transcribe(missing, context=" ".join(words))
    with pytest.raises(ValueError, match="^context of input #1 with its hotwords is .* over the limit of 10,000"):
        asr.transcribe([synthetic(1.0), missing], context=["", " ".join(words[:-2])], hotwords=["Qwen", "Pallas"],
                       hotwords_in_context=True)


def test_samples_channels_arrays_as_soundfile_reads_them(asr, tmp_path):
    """A (samples, channels) array, as soundfile.read returns stereo, is read along its long axis (time)."""
    left = load_audio(os.path.join(DATA, "hello_en.wav"))
    stereo = np.stack([left, 0.5 * left[::-1]], axis=1)  # two different channels
    path = str(tmp_path / "stereo.wav")
    sf.write(path, stereo, 16000, subtype="FLOAT")
    data, rate = sf.read(path, dtype="float32")
    assert data.shape == stereo.shape and data.shape[0] > data.shape[1]
    np.testing.assert_allclose(load_audio((data, rate)), load_audio(path), atol=1e-7)
    assert asr.transcribe((data, rate), max_new_tokens=4)[0].token_ids == asr.transcribe(path, max_new_tokens=4)[
        0].token_ids


def test_log_probabilities_never_print_negative_zero():
    from qasr_jax.io.results import Result

    r = Result("x", token_ids=[1, 2], token_logprobs=[-1e-9, -0.25])
    d = r.to_dict()
    assert d["token_logprobs"] == [0.0, -0.25] and json.dumps(d["token_logprobs"]) == "[0.0, -0.25]"
    assert json.dumps(Result("y", token_ids=[1], token_logprobs=[-4e-8]).to_dict()["confidence"]) == "0.0"


# Runs the command, then reports the compilation cache folder JAX was given (whether JAX writes a program there
# depends on how long it took to compile, which varies with the machine).
_PROBE = ("import sys, jax; from qasr_jax.cli.core import main; code = main(sys.argv[1:]); "
          "print('compilation cache:', jax.config.jax_compilation_cache_dir, file=sys.stderr); sys.exit(code)")


def _cli(*args, cache="off"):
    env = {**os.environ, "QASR_JAX_COMPILATION_CACHE": str(cache)}  # off unless a test asks: keep ~/.cache clean
    run = ["-m", "qasr_jax.cli"] if cache == "off" else ["-c", _PROBE]
    return subprocess.run([sys.executable, *run, *args], capture_output=True, text=True, env=env)


def test_cli_every_format_parses_back(asr_dir, asr, tmp_path):
    files = [os.path.join(DATA, f) for f in ("hello_en.wav", "long_en.wav")]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....")
    out_dir = tmp_path / "out"
    cache = tmp_path / "xla"  # the runs after the first can load their programs from this compilation cache
    expected = {r.source: r for r in asr.transcribe(files, max_new_tokens=NEW, max_audio_seconds=6.0)}
    for fmt in ("txt", "json", "srt", "vtt", "tsv"):
        proc = _cli("transcribe", files[0], str(bad), files[1], "--model", asr_dir, "--max-new-tokens", str(NEW),
                    "--max-audio-seconds", "6", "--output-format", fmt, "--output-dir", str(out_dir), "--no-fallback",
                    cache=cache)  # random weights' text fails the fallback's thresholds: it would decode it again
        assert f"compilation cache: {cache}\n" in proc.stderr and cache.is_dir()
        assert proc.returncode == 1 and "broken.wav" in proc.stderr  # one bad file: reported, others written
        for f in files:
            r = expected[f]
            text = (out_dir / (os.path.splitext(os.path.basename(f))[0] + "." + fmt)).read_text(encoding="utf-8")
            if fmt == "txt":
                assert text.strip() == r.text
            elif fmt == "json":
                d = json.loads(text)
                assert d["file"] == f and d["token_ids"] == r.token_ids and d["text"] == r.text
            else:
                cues = parse_cues(text, fmt)
                if fmt == "tsv":  # a row per segment
                    assert [norm(c[2]) for c in cues] == [norm(s.text) for s in r.segments]
                    assert [c[0] for c in cues] == pytest.approx([s.start for s in r.segments], abs=1e-3)
                    assert [c[1] for c in cues] == pytest.approx([s.end for s in r.segments], abs=1e-3)
                else:  # subtitles: each segment cut into cues inside its time (tests/io/test_formats.py: the rules)
                    assert bare([c[2] for c in cues]) == bare([s.text for s in r.segments])
                    assert cues[0][0] == pytest.approx(r.segments[0].start, abs=1e-3)
                    assert cues[-1][1] == pytest.approx(r.segments[-1].end, abs=1e-3)
    proc = _cli("transcribe", files[0], "--model", asr_dir, "--max-new-tokens", "4", "--output-format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == asr.transcribe(files[0], max_new_tokens=4)[0].token_ids


def norm(text: str) -> str:
    return " ".join(text.split())


def bare(texts: list[str]) -> str:
    """Texts joined without any whitespace: what cues of a transcript keep whatever their line breaks."""
    return "".join("".join(texts).split())


def _seconds(stamp: str) -> float:
    h, m, s = stamp.replace(",", ".").split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def parse_cues(text: str, fmt: str) -> list[tuple[float, float, str]]:
    """SRT / VTT / TSV back to (start, end, text) cues, written independently of qasr_jax.io.formats."""
    if fmt == "tsv":
        rows = [line.split("\t") for line in text.strip().splitlines()[1:]]
        return [(int(a) / 1000, int(b) / 1000, t) for a, b, t in rows]
    blocks = [b for b in text.strip().split("\n\n") if "-->" in b]
    cues = []
    for block in blocks:
        lines = block.splitlines()
        i = next(i for i, line in enumerate(lines) if "-->" in line)
        a, b = [x.strip() for x in lines[i].split("-->")]
        body = "\n".join(lines[i + 1:])
        cues.append((_seconds(a), _seconds(b.split()[0]), html.unescape(body) if fmt == "vtt" else body))
    return cues


@pytest.fixture(scope="module")
def aligner_dir(checkpoints, tmp_path_factory):
    """The tiny aligner (-hf layout) with a tokenizer.json."""
    return with_tokenizer(checkpoints("aligner").hf, tmp_path_factory, "hf")


def test_timestamps_through_api_and_cli(asr_dir, aligner_dir, tmp_path):
    """Word times from the aligner, offset per piece: monotonic, inside the audio, and the same in SRT/VTT."""
    from qasr_jax.aligner import Aligner

    path = os.path.join(DATA, "long_en.wav")
    al = Aligner.from_pretrained(aligner_dir)
    asr = Transcriber.from_pretrained(asr_dir, aligner=al)
    r = asr.transcribe(path, language="English", max_new_tokens=NEW, max_audio_seconds=6.0,
                       return_timestamps=True)[0]
    assert r.error is None and len(r.segments) >= 2 and r.words
    # Each piece's words are that piece aligned alone, shifted by the piece's offset.
    wave = load_audio(path)
    expected = []
    for seg, nxt in zip(r.segments, r.segments[1:] + [None]):
        piece = wave[int(round(seg.start * 16000)):None if nxt is None else int(round(nxt.start * 16000))]
        alone = al.align(piece, seg.text, "English")
        expected += [(w.text, round(w.start + seg.start, 3), round(w.end + seg.start, 3)) for w in alone]
    assert [(w.text, w.start, w.end) for w in r.words] == expected  # every piece's words, in order, nothing else
    starts = [w.start for w in r.words]
    assert starts == sorted(starts) and all(0 <= w.start <= w.end <= r.duration + 1e-3 for w in r.words)
    for fmt in ("srt", "vtt"):
        proc = _cli("transcribe", path, "--model", asr_dir, "--aligner", aligner_dir, "--timestamps",
                    "--language", "en", "--max-new-tokens", str(NEW), "--max-audio-seconds", "6",
                    "--output-format", fmt)
        assert proc.returncode == 0, proc.stderr
        cues = parse_cues(proc.stdout, fmt)  # cues of whole words, each starting at its first word's start
        assert [c for c in bare([c[2] for c in cues]) if c.isalnum()] == [c for c in bare([r.text]) if c.isalnum()]
        assert all(any(abs(c[0] - s) <= 1e-3 for s in starts) for c in cues) and cues[0][0] == starts[0]
