"""Streaming: the official chunk-and-rollback algorithm, written plainly here (all audio re-fed through the offline
encoder and a fresh prefill at every chunk, the prompt tokenized as one string), against the streaming
implementation (cached windows, a slot that keeps its prompt's prefix), token for token at every chunk; segments;
many streams at once; joining and leaving without compiling; bad input; the CLI."""

from __future__ import annotations

import copy
import gc
import io
import sys
import time

import jax
import numpy as np
import pytest
import soundfile as sf
import torch

from qasr_jax import cli
from qasr_jax.cli import stream as cli_stream
from qasr_jax.decoding import search as S
from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.io.audio import AudioError, load_audio
from qasr_jax.io.prompts import parse_output
from qasr_jax.streaming.prompts import segment_context, unfixed_chunks_for
from qasr_jax.testing import speech, synthetic
from qasr_jax.testing.reference import save_official
from qasr_jax.transcribe import Transcriber
from test_stream_audio import offline
from qasr_jax.testing.tokenizer_files import write_tokenizer

SR = 16000
MAX_NEW = 32


@pytest.fixture(scope="module")
def asr_dir(checkpoints, tmp_path_factory):
    """The tiny ASR with an untied head (a tied random head writes one token again and again; this one writes
    varied text that follows the audio and the prefix), its EOS row scaled 2.5x so that some chunks end at EOS and
    others at max_new_tokens; the real tokenizer beside it."""
    ck = checkpoints("asr-untied")
    ref = copy.deepcopy(ck.torch_model)
    with torch.no_grad():
        ref.lm_head.weight[151645].mul_(2.5)
    folder = save_official(ref, ck.cfg, str(tmp_path_factory.mktemp("stream") / "model"))
    write_tokenizer(folder, "official")
    return folder


@pytest.fixture(scope="module")
def asr(asr_dir):
    return Transcriber.from_pretrained(asr_dir)


def wave_12s() -> np.ndarray:
    """12.7 s: speech over two encoder windows, a pause, Mandarin."""
    return np.concatenate([speech("long_en.wav"), np.zeros(6400, np.float32), speech("zh.wav")])


# ----------------------------------------------------------------------------------------------------------------
# The algorithm, plainly


def greedy(asr, ids: list[int], audio: np.ndarray, max_new: int) -> list[int]:
    """Greedy decoding of one whole prompt from an empty cache (EOS excluded)."""
    tok, model = asr.tokenizer, asr.model
    width = max(128, 1 << (len(ids) - 1).bit_length())
    padded = np.full((1, width), tok.endoftext_id, np.int32)
    padded[0, : len(ids)] = ids
    audio_rows = np.zeros((1, width, audio.shape[1]), np.float32)
    audio_rows[0, : audio.shape[0]] = audio
    res = model.engine.generate(model.engine.embed(padded, audio_rows), [len(ids)], [max_new],
                                S.SearchSettings.make(tok.eos_ids), S.SearchConfig(tok.endoftext_id), max_len=width + 64)
    res = jax.device_get(res)
    return res.tokens[0, : res.lengths[0]].tolist()


def refeed(asr, wave, seconds, language=None, context="", unfixed_chunks=2, unfixed_tokens=5, max_new=MAX_NEW):
    """qwen-asr's streaming_transcribe + finish_streaming_transcribe, re-feeding all audio at every chunk ->
    (generated ids, raw output) per decode, the tail's last."""
    tok, model = asr.tokenizer, asr.model
    size = max(1, round(seconds * SR))
    ends = [(end, False) for end in range(size, wave.shape[0] + 1, size)]
    if wave.shape[0] % size:
        ends.append((wave.shape[0], True))
    raw, out = "", []
    for k, (end, final) in enumerate(ends):
        prefix = ""
        if k >= unfixed_chunks:
            cur = tok.encode(raw, parse_special=True)
            if final:
                prefix = tok.decode(cur[: max(1, len(cur) - unfixed_tokens)], skip_special_tokens=False)
            else:
                cut = unfixed_tokens
                while True:
                    keep = max(0, len(cur) - cut)
                    prefix = tok.decode(cur[:keep], skip_special_tokens=False) if keep else ""
                    if "\ufffd" not in prefix:
                        break
                    if keep == 0:
                        prefix = ""
                        break
                    cut += 1
        audio = offline(model, wave[:end])
        prompt = (f"<|im_start|>system\n{context}<|im_end|>\n<|im_start|>user\n<|audio_start|>"
                  + "<|audio_pad|>" * audio.shape[0] + "<|audio_end|><|im_end|>\n<|im_start|>assistant\n"
                  + (f"language {language}<asr_text>" if language else "") + prefix)
        gen = greedy(asr, tok.encode(prompt, parse_special=True), audio, max_new)
        raw = prefix + tok.decode(gen).rstrip("\ufffd")  # vLLM never emits an unfinished trailing character
        out.append((gen, raw))
    return out


def streamed(stream, wave, seconds):
    """Feed ``wave`` one chunk at a time, then finish -> (generated ids, Partial or Result) per decode."""
    size = max(1, round(seconds * SR))
    whole = wave.shape[0] - wave.shape[0] % size
    out = []
    for start in range(0, whole, size):
        partial = stream.feed(wave[start : start + size])
        out.append((stream.generated_ids, partial))
    stream.feed(wave[whole:])  # less than a chunk: buffered, nothing decoded
    result = stream.finish()
    if whole < wave.shape[0]:
        out.append((stream.generated_ids, result))
    return out, result


def test_default_unfixed_chunks_cover_four_seconds():
    """The official 2 chunks at 2 s; shorter chunks keep 4 s of audio unfixed (tests/test_tiny_model.py measures
    why), longer ones keep 2 chunks."""
    assert [unfixed_chunks_for(s) for s in (0.5, 1.0, 1.5, 2.0, 3.7)] == [8, 4, 3, 2, 2]


def parsed_text(asr, raw: str, language) -> str:
    return parse_output(asr.tokenizer.encode(raw, parse_special=True), asr.tokenizer, language)[1]


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("language,context", [(None, ""), ("English", "Qwen, JAX and Flax")])
def test_stream_equals_the_plain_refeed_at_every_chunk(asr, seconds, language, context):
    wave = wave_12s()
    want = refeed(asr, wave, seconds, language, context)  # the official parameters: 2 unfixed chunks
    got, result = streamed(asr.stream(language, context, seconds, unfixed_chunks=2), wave, seconds)
    assert len(got) == len(want) == -(-wave.shape[0] // round(seconds * SR))
    for k, ((ids, partial), (want_ids, raw)) in enumerate(zip(got, want)):
        assert ids == want_ids, (k, seconds)
        assert partial.text == parsed_text(asr, raw, language), k
    assert result.text == parsed_text(asr, want[-1][1], language)
    assert result.token_ids == asr.tokenizer.encode(want[-1][1], parse_special=True)
    assert result.duration == pytest.approx(wave.shape[0] / SR)
    # A real test of the rollback: prefixes were used, and (over many chunks) decodes ended both at EOS and at
    # max_new_tokens.
    lengths = [len(ids) for ids, _ in want]
    assert len(want) < 10 or min(lengths) < MAX_NEW == max(lengths)
    assert any(raw for _, raw in want[2:])


def test_segments_end_at_pauses_or_a_full_cache_and_each_is_the_algorithm_on_its_audio(asr):
    """segment_seconds=2 and a cache of 256 positions, on noise with pauses before 3 s and 6 s and none after: the
    first two segments end at the pauses, the later ones where the next chunk would not fit the cache; each is the
    official algorithm on its own audio, with the committed text's tail as its context."""
    wave = synthetic(14.0, 7)
    for pause in (3, 6):
        wave[int((pause - 0.4) * SR) : pause * SR] = 0.0
    driver = asr.stream_driver(slots=1, segment_seconds=2.0, context_tokens=64)
    assert driver.max_len == 256
    got, result = streamed(driver.stream(chunk_seconds=1.0, unfixed_chunks=2), wave, 1.0)
    spans = [(seg.start, seg.end) for seg in result.segments]
    assert spans[:2] == [(0.0, 3.0), (3.0, 6.0)] and len(spans) >= 4, spans
    assert [a for a, _ in spans[1:]] == [b for _, b in spans[:-1]] and spans[-1][1] == 14.0
    assert got[2][1].fixed_text == result.segments[0].text and got[1][1].fixed_text == ""
    texts, at = [], 0
    for seg in result.segments:
        audio = wave[int(seg.start * SR) : int(seg.end * SR)]
        want = refeed(asr, audio, 1.0, context=segment_context(asr.tokenizer, "", " ".join(texts)))
        assert [ids for ids, _ in got[at : at + len(want)]] == [ids for ids, _ in want], seg
        assert seg.text == parsed_text(asr, want[-1][1], None)
        texts.append(seg.text)
        at += len(want)
    assert at == len(got) and result.text == " ".join(texts)


# ----------------------------------------------------------------------------------------------------------------
# Many streams


def interleaved_inputs():
    rng = np.random.default_rng(0)
    waves = [wave_12s(), speech("long_en.wav")[::-1].copy(),
             np.concatenate([speech("zh.wav"), speech("hello_en.wav"), synthetic(4.0, 9)])]
    options = [dict(chunk_seconds=1.0), dict(language="English", chunk_seconds=0.5),
               dict(context="Qwen", chunk_seconds=2.0)]
    pieces = []
    for w in waves:
        cuts = np.cumsum(rng.integers(1600, 27000, size=40))
        pieces.append(np.split(w, cuts[cuts < w.shape[0]]))
    return options, pieces, [0, 2, 5]  # stream i joins at round starts[i]


def run_interleaved(driver, options, pieces, starts):
    """Streams joining at rounds ``starts``, fed a piece each per round, finished (and leaving) after their last
    -> per stream: (generated ids, Partial) per feed, and the Result."""
    streams, together = {}, {i: [] for i in range(3)}
    results = {}
    for rnd in range(100):
        for i in range(3):
            if rnd == starts[i]:
                streams[i] = driver.stream(**options[i])
        live = {i: s for i, s in streams.items() if i not in results and rnd - starts[i] < len(pieces[i])}
        if not live and len(results) == 3:
            break
        partials = driver.feed({s: pieces[i][rnd - starts[i]] for i, s in live.items()})
        for i, s in live.items():
            together[i].append((s.generated_ids, partials[s]))
        done = [i for i, s in streams.items() if i not in results and rnd - starts[i] == len(pieces[i]) - 1]
        for i, r in zip(done, driver.finish([streams[i] for i in done])):
            results[i] = r
    return together, results


def test_streams_fed_interleaved_equal_each_alone_and_join_and_leave_without_compiling(asr):
    options, pieces, starts = interleaved_inputs()
    driver = asr.stream_driver(slots=4)
    together, results = run_interleaved(driver, options, pieces, starts)
    assert driver.free == 4
    with count_compilations() as compiled:  # again: new streams joining and leaving, in other slots
        again = run_interleaved(driver, options, pieces, starts)
    assert compiled.count == 0 and again[0] == together
    assert [again[1][i].to_dict() | {"file": ""} for i in range(3)] == [
        results[i].to_dict() | {"file": ""} for i in range(3)]
    for i in range(3):
        alone = asr.stream(**options[i])
        seen = [(alone.feed(p), alone.generated_ids) for p in pieces[i]]
        assert seen == [(partial, ids) for ids, partial in together[i]], i
        assert alone.finish().to_dict() | {"file": ""} == results[i].to_dict() | {"file": ""}


def test_vad_streams_end_segments_in_noise_the_energy_rule_hears_as_sound(asr):
    """With ``vad=True`` a stream's segments end at pauses Silero VAD finds: in 3 s of noise 12 dB below the speech
    around it (not quiet to the energy rule, which wants 20 dB) segments of 1 s end at every chunk, while the energy
    rule's stream, fed the same chunks in the same step, runs on in one segment."""
    rng = np.random.default_rng(5)
    hello = speech("hello_en.wav")  # 1.25 s
    wave = np.concatenate([hello, 0.05 * rng.standard_normal(48000).astype(np.float32), hello])
    noise = (hello.shape[0] / 16000, hello.shape[0] / 16000 + 3.0)
    driver = asr.stream_driver(slots=2, segment_seconds=1.0)
    by_vad, by_energy = driver.stream(language="English", chunk_seconds=1.0, vad=True), driver.stream(
        language="English", chunk_seconds=1.0)
    for k in range(0, wave.shape[0], 16000):
        driver.feed({by_vad: wave[k:k + 16000], by_energy: wave[k:k + 16000]})
    vad_result, energy_result = driver.finish([by_vad, by_energy])
    ends = [x.end for x in vad_result.segments[:-1]]
    assert ends == [2.0, 3.0, 4.0] and all(noise[0] < e <= noise[1] for e in ends)  # chunk ends inside the noise
    assert vad_result.segments[-1].end == energy_result.segments[-1].end == round(wave.shape[0] / 16000, 3)
    assert len(energy_result.segments) == 1


def test_abandoned_and_closed_streams_free_their_slots(asr):
    driver = asr.stream_driver(slots=4)
    wave = wave_12s()
    s = driver.stream(chunk_seconds=1.0)
    s.feed(wave[: 2 * SR])
    t, *others = (driver.stream() for _ in range(3))
    assert driver.free == 0
    with pytest.raises(RuntimeError, match="all 4 stream slots"):
        driver.stream()
    del s
    gc.collect()
    assert driver.free == 1
    u = driver.stream(chunk_seconds=1.0)  # the abandoned stream's slot, its old cache not read
    got = [(u.feed(wave[k * SR : (k + 1) * SR]), u.generated_ids) for k in range(3)]
    fresh = asr.stream(chunk_seconds=1.0)
    assert got == [(fresh.feed(wave[k * SR : (k + 1) * SR]), fresh.generated_ids) for k in range(3)]
    t.close()
    assert driver.free == 1
    with pytest.raises(RuntimeError, match="finished or closed"):
        t.feed(wave[:100])
    driver.close(others + [u])
    assert driver.free == 4


def test_bad_input_gives_a_clear_error(asr):
    s = asr.stream(chunk_seconds=1.0)
    with pytest.raises(AudioError, match=r"1-D mono samples, got shape \(2, 100\)"):
        s.feed(np.zeros((2, 100), np.float32))
    with pytest.raises(AudioError, match="NaN or Inf"):
        s.feed(np.array([0.0, np.nan], np.float32))
    with pytest.raises(AudioError, match="float32 or int16 samples, got dtype int32"):
        s.feed(np.zeros(10, np.int32))
    pcm = (wave_12s()[: 3 * SR] * 32767).astype(np.int16)
    as_int = s.feed(pcm)
    same = asr.stream(chunk_seconds=1.0).feed(pcm.astype(np.float32) / 32768)
    assert as_int == same and as_int.text
    s.finish()
    with pytest.raises(RuntimeError, match="finished or closed; start a new one"):
        s.feed(np.zeros(10, np.float32))
    with pytest.raises(RuntimeError, match="finished or closed"):
        s.finish()
    driver = asr.stream_driver(slots=4)
    a, b = driver.stream(chunk_seconds=1.0), driver.stream(chunk_seconds=1.0)
    with pytest.raises(AudioError, match="NaN"):  # nothing of a good input is used when another is bad
        driver.feed({a: wave_12s()[: 2 * SR], b: np.full(10, np.inf, np.float32)})
    assert a.partial.text == "" and a.feed(wave_12s()[: 2 * SR]) == asr.stream(chunk_seconds=1.0).feed(
        wave_12s()[: 2 * SR])
    for bad, match in ((dict(chunk_seconds=0), "chunk_seconds must be > 0"),
                       (dict(language="Klingon"), "unsupported language 'Klingon'"),
                       (dict(unfixed_tokens=-1), "unfixed_chunks and unfixed_tokens"),
                       (dict(max_new_tokens=500), r"asr.stream_driver\(max_new_tokens=500\)")):
        with pytest.raises(ValueError, match=match):
            driver.stream(**bad)
    other = asr.stream_driver(slots=1)
    with pytest.raises(ValueError, match="not a stream of this driver"):  # its slot number means nothing here
        other.close([a])
    assert other.free == 1 and driver.free == 2


# ----------------------------------------------------------------------------------------------------------------
# The command


def test_cli_streams_stdin_and_paces_a_file(asr, asr_dir, tmp_path, monkeypatch, capsys):
    """``qasr-jax stream -`` on raw s16le: one line per change of the transcript, then the final one; a file is
    read in chunks, no faster than it plays with --realtime; bad flags are named before anything loads."""
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    pcm = (wave_12s()[: int(2.5 * SR)] * 32767).astype(np.int16)
    s = asr.stream(chunk_seconds=1.0, language="en")
    want = [" ".join(s.feed(pcm[k * SR : (k + 1) * SR]).text.splitlines()).strip() for k in range(3)]
    final = " ".join(s.finish().text.splitlines()).strip()  # one line per update
    distinct = [t for k, t in enumerate(want) if k == 0 or t != want[k - 1]]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pcm.tobytes() + b"\x01")))  # an odd last byte
    assert cli.main(["stream", "-", "--model", asr_dir, "--chunk-seconds", "1", "--language", "en"]) == 0
    assert capsys.readouterr().out.splitlines() == distinct + [final]

    path = str(tmp_path / "in.wav")
    sf.write(path, pcm, SR, subtype="PCM_16")
    start = time.monotonic()
    blocks = list(cli_stream._file_blocks(path, SR, realtime=True))
    assert time.monotonic() - start >= 2.45  # 2.5 s of audio, the last block fed once it has played
    assert [b.shape[0] for b in blocks] == [SR, SR, SR // 2]
    np.testing.assert_allclose(np.concatenate(blocks), pcm / 32768, atol=1e-7)
    assert cli.main(["stream", path, "--chunk-seconds", "0", "--unfixed-tokens", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--chunk-seconds must be a positive number" in err and "--unfixed-tokens must be >= 0" in err


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_cli_reads_a_wav_stream_on_stdin_at_its_own_rate(asr, asr_dir, tmp_path, monkeypatch, capsys):
    """``cat x.wav | qasr-jax stream -``: the RIFF header is read, not taken for samples; a 16 kHz mono WAV gives
    what its raw samples give, a 44.1 kHz stereo one (16-bit or float) the samples load_audio reads from the file,
    and a format it cannot read is refused with the conversion to run."""
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    pcm = (wave_12s()[: int(2.5 * SR)] * 32767).astype(np.int16)
    argv = ["stream", "-", "--model", asr_dir, "--chunk-seconds", "1", "--language", "en"]
    _stdin(monkeypatch, pcm.tobytes())
    assert cli.main(argv) == 0
    raw_out = capsys.readouterr().out
    wav = io.BytesIO()
    sf.write(wav, pcm, SR, format="WAV", subtype="PCM_16")
    _stdin(monkeypatch, wav.getvalue())
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == raw_out and raw_out.strip()

    stereo = np.stack([wave_12s()[:44100], 0.5 * wave_12s()[44100:88200]], axis=1)  # (samples, channels)
    for subtype in ("PCM_16", "FLOAT"):
        path = str(tmp_path / f"{subtype}.wav")
        sf.write(path, stereo, 44100, subtype=subtype)
        with open(path, "rb") as f:
            _stdin(monkeypatch, f.read())
        got = np.concatenate(list(cli_stream._stdin_blocks(SR // 2)))
        want = load_audio(path)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-6)
    sf.write(str(tmp_path / "24.wav"), stereo, 44100, subtype="PCM_24")
    with open(tmp_path / "24.wav", "rb") as f:
        _stdin(monkeypatch, f.read())
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "24-bit" in err and "ffmpeg -i - -f s16le -ac 1 -ar 16000 -" in err


def test_silence_gives_an_empty_transcript_in_every_path(asr, asr_dir, monkeypatch, capsys):
    """Digital silence is "" from transcribe, from asr.stream (every partial and the result) and from
    ``qasr-jax stream``, as the model is never asked about it; speech after silence is still transcribed."""
    monkeypatch.setenv("QASR_JAX_COMPILATION_CACHE", "off")
    silence = np.zeros(5 * SR, np.float32)
    offline_result = asr.transcribe(silence)[0]
    assert (offline_result.language, offline_result.text, offline_result.token_ids) == (None, "", [])
    stream = asr.stream(chunk_seconds=1.0)
    assert [stream.feed(silence[k * SR : (k + 1) * SR]).text for k in range(5)] == [""] * 5
    result = stream.finish()
    assert (result.language, result.text, result.token_ids, result.segments) == (None, "", [], [])
    assert result.duration == pytest.approx(5.0)
    _stdin(monkeypatch, np.zeros(3 * SR, np.int16).tobytes())
    assert cli.main(["stream", "-", "--model", asr_dir, "--chunk-seconds", "1"]) == 0
    assert capsys.readouterr().out == "\n"  # the final transcript, empty
    stream = asr.stream(chunk_seconds=1.0)
    stream.feed(silence[: 2 * SR])
    spoken = stream.feed(wave_12s()[: 2 * SR])
    assert spoken.text and stream.finish().text


def test_terminal_display_rewrites_the_live_line():
    from qasr_jax.streaming.driver import Partial

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    display = cli_stream.LineDisplay(out)
    display.update(Partial(None, "hello wor", ""))
    display.update(Partial(None, "hello world. next", "hello world."))
    display.final("hello world. next one")
    assert out.getvalue() == "\r\x1b[Khello wor\r\x1b[Khello world.\n\r\x1b[Knext\r\x1b[Knext one\n"


def test_asr_stream_gives_each_lone_stream_a_one_slot_driver(asr):
    """asr.stream() works however many streams are open, and a lone stream decodes one row per step."""
    a, b = asr.stream(), asr.stream()
    assert a.driver is not b.driver and a.driver.batcher.requests == b.driver.batcher.requests == 1
    a.close()
    c = asr.stream()
    assert c.driver is a.driver  # the freed slot is reused
    b.close()
    c.close()


def test_hotwords_bias_a_stream_and_leave_the_others_in_its_step_alone(asr):
    """A stream's hotwords (boosted hard, kept out of the context so that only the search changes) bring the word
    into its text; a stream beside it in the same driver decodes exactly as in a driver without hotwords, and the
    biased stream exactly as alone."""
    wave, word = speech("long_en.wav")[: 3 * SR], "Pallas"
    hot = {"hotwords": [word], "hotword_boost": 10.0, "hotwords_in_context": False}
    plain, plain_result = streamed(asr.stream(), wave, 1.0)
    biased, biased_result = streamed(asr.stream(**hot), wave, 1.0)
    assert word not in plain_result.text and word in biased_result.text
    driver = asr.stream_driver(slots=2, hotword_edges=1)
    a, b = driver.stream(**hot), driver.stream()
    seen = {a: [], b: []}
    for start in range(0, wave.shape[0], SR):
        partials = driver.feed({a: wave[start : start + SR], b: wave[start : start + SR]})
        for s in (a, b):
            seen[s].append((s.generated_ids, partials[s]))
    assert seen[a] == biased and seen[b] == plain
    assert [r.text for r in driver.finish([a, b])] == [biased_result.text, plain_result.text]
    with pytest.raises(ValueError, match="hotword_edges"):
        asr.stream_driver(slots=1).stream(hotwords=[word])
