"""The server as clients meet it: the real ``qasr-jax serve`` on a loopback port, the official ``openai`` client
and raw HTTP. With default flags it is ready soon in bounded memory and answers any model name; every answer
equals ``Transcriber.transcribe`` on the same file (long uploads in the same pieces); streamed deltas add up to the
text; realtime deltas only append; 64 clients' 256 requests all come back, each its own; bad requests get
OpenAI-shaped 4xx errors and the server keeps answering; a client that leaves frees its slot; SIGTERM finishes the
request in flight, then exits.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import openai
import pytest
import soundfile as sf
import soxr

from qasr_jax import cli
from qasr_jax.aligner import Aligner
from qasr_jax.cli import serve as command
from qasr_jax.io import formats
from qasr_jax.io.prompts import MAX_CONTEXT_TOKENS
from qasr_jax.server import realtime
from qasr_jax.testing import DATA, ROOT, synthetic, tiny_en_manifest
from qasr_jax.testing.serving import SERVER_KEY, Served, error_of, multipart, post
from qasr_jax.transcribe import Transcriber
from qasr_jax.testing.docs import page_blocks, read_page, shell_commands
from qasr_jax.testing.tokenizer_files import write_tokenizer

KEY = "test-key-7f3a"
NEW = 12  # new tokens per piece where a test caps them: random weights never stop on their own
FILES = ["hello_en.wav", "zh.wav", "long_en.wav"]
ENDPOINT = "/v1/audio/transcriptions"


@pytest.fixture(scope="module")
def dirs(checkpoints, tmp_path_factory):
    """The tiny ASR (official layout) and aligner (-hf layout) folders, each with the real tokenizer."""
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for kind, layout in (("asr", "official"), ("aligner", "hf")):
        folder = str(root / kind)
        shutil.copytree(getattr(checkpoints(kind), layout), folder)
        write_tokenizer(folder, layout)
        out[kind] = folder
    out["cache"] = str(root / "xla")  # the compilation cache both servers of this module share
    return out


@pytest.fixture(scope="module")
def asr(dirs):
    return Transcriber.from_pretrained(dirs["asr"], aligner=Aligner.from_pretrained(dirs["aligner"]))


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    served = Served(dirs["asr"], "--aligner", dirs["aligner"], "--max-slots", "16", "--max-upload-mb", "2",
                    "--max-audio-seconds", "20", "--served-model-name", "qwen3-asr-tiny", "--strict-model-name",
                    key=KEY, cache=dirs["cache"], log=str(tmp_path_factory.mktemp("log") / "server.log"))
    yield served
    assert served.stop() == 0, served.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)


def wav_bytes(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def as_sent(wave: np.ndarray) -> np.ndarray:
    """The samples the server reads from ``wav_bytes(wave)`` (16-bit PCM)."""
    return sf.read(io.BytesIO(wav_bytes(wave)), dtype="float32")[0]


def test_every_response_format_equals_offline(client, asr):
    """json, text, srt, vtt and verbose_json (with word times from the aligner) and logprobs, through the openai
    client, each equal to Transcriber.transcribe of the same file; language (code or name) and prompt honoured."""
    assert [m.id for m in client.models.list().data] == ["qwen3-asr-tiny"]
    for name in FILES:
        path = os.path.join(DATA, name)
        create = lambda **kw: client.audio.transcriptions.create(  # noqa: E731
            file=open(path, "rb"), model="qwen3-asr-tiny", extra_body={"max_new_tokens": NEW}, **kw)
        offline = asr.transcribe(path, max_new_tokens=NEW)[0]
        r = create(include=["logprobs"])
        assert r.text == offline.text and r.usage.seconds == pytest.approx(offline.duration)
        assert [lp.logprob for lp in r.logprobs] == pytest.approx(offline.token_logprobs, abs=1e-6)
        assert b"".join(bytes(map(int, lp.bytes)) for lp in r.logprobs).decode() == asr.tokenizer.decode(
            offline.token_ids, skip_special_tokens=False)
        assert create(response_format="text") == offline.text + "\n"
        for fmt in ("srt", "vtt"):  # the segments cut into cues (tests/io/test_formats.py checks the cutting)
            assert create(response_format=fmt) == formats.render(offline, fmt)
            narrow = client.audio.transcriptions.create(
                file=open(path, "rb"), model="qwen3-asr-tiny", response_format=fmt,
                extra_body={"max_new_tokens": NEW, "max_line_width": 12, "max_line_count": 1, "max_cue_seconds": 2.5})
            assert narrow == formats.render(offline, fmt, max_line_width=12, max_line_count=1, max_cue_seconds=2.5)
        detected = asr.transcribe(path, max_new_tokens=NEW, language_probabilities=True)[0]
        v = create(response_format="verbose_json")
        assert v.language_probability == detected.language_probability  # None when no header was written
        forced = asr.transcribe(path, language="English", context="Qwen, JAX", max_new_tokens=NEW,
                                return_timestamps=True)[0]
        for language in ("en", "English"):
            v = create(response_format="verbose_json", language=language, prompt="Qwen, JAX",
                       timestamp_granularities=["word", "segment"])
            assert (v.text, v.language, v.duration) == (forced.text, "english", round(forced.duration, 3))
            assert v.language_probability is None  # a forced language has no probability
            assert [(s.start, s.end, s.text) for s in v.segments] == [(s.start, s.end, s.text) for s in forced.segments]
            assert [s.tokens for s in v.segments] == [forced.token_ids]  # one piece: all the tokens
            assert [(w.word, w.start, w.end) for w in v.words] == [(w.text, w.start, w.end) for w in forced.words]
            assert v.words  # the aligner ran


def test_streamed_deltas_add_up_to_the_text(client, asr):
    """stream=True: several transcript.text.delta events as tokens are generated, which concatenate to the
    transcript.text.done text, itself the offline text (forced language: every token is text at once; detected:
    the text starts after the model's language header, here all of it at the end, the tiny model writing none)."""
    path = os.path.join(DATA, "long_en.wav")
    for language, new in (("en", 60), (None, NEW)):
        extra = {"language": language} if language else {}
        events = list(client.audio.transcriptions.create(file=open(path, "rb"), model="qwen3-asr-tiny", stream=True,
                                                         extra_body={"max_new_tokens": new}, **extra))
        deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
        assert [e.type for e in events[-1:]] == ["transcript.text.done"]
        offline = asr.transcribe(path, language=language, max_new_tokens=new)[0]
        assert "".join(deltas) == events[-1].text == offline.text
        if language:
            assert len(deltas) >= 4 and all(deltas)
    # Beam search: the best hypothesis can still change, so its text comes in one delta when it is done.
    events = list(client.audio.transcriptions.create(file=open(path, "rb"), model="qwen3-asr-tiny", stream=True,
                                                     language="en", extra_body={"max_new_tokens": 60, "beam_size": 2}))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    beam = asr.transcribe(path, language="en", max_new_tokens=60, beam_size=2)[0]
    assert len(deltas) <= 1 and "".join(deltas) == events[-1].text == beam.text


def test_bad_serve_flags_are_named_before_loading():
    """Each bad flag is named (with what it got) before anything is loaded; the defaults pass."""
    parse = cli.build_parser().parse_args
    command.check_serve_args(parse(["serve"]))
    with pytest.raises(ValueError) as e:
        command.check_serve_args(parse(["serve", "--piece-seconds", "0", "--kv-cache-gb", "-1", "--port", "70000"]))
    for flag in ("--piece-seconds must be a positive number, got 0", "--kv-cache-gb must be a positive number, got -1",
                 "--port"):
        assert flag in str(e.value)


READY_SECONDS = 180  # a readiness bound for the tiny model on a busy 2-core machine (it is ready in ~25 s)


def doc_commands(block: int) -> list[str]:
    """The commands of docs/serving.md's ``block``-th bash block."""
    return shell_commands(page_blocks("docs/serving.md", "bash")[block])


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory):
    """``qasr-jax serve --model tiny-en`` exactly as docs/serving.md's second block starts it: the model shipped in
    the package (not a test fixture), default flags, no compilation cache."""
    (serve,) = [c for c in doc_commands(1) if c.startswith("qasr-jax serve")]
    argv = shlex.split(serve)[1:]
    assert argv == ["serve", "--model", "tiny-en"], "the page's try-it command uses default flags"
    served = Served("tiny-en", cache="off", log=str(tmp_path_factory.mktemp("log") / "tiny-en.log"))
    yield served
    assert served.stop() == 0, served.output()


@pytest.fixture(scope="module")
def tiny():
    return Transcriber.from_pretrained("tiny-en")


def heldout(index: int) -> tuple[str, str]:
    """tiny-en's held-out clip ``index`` -> (its path, its words)."""
    entry = tiny_en_manifest()[index]
    return entry.audio, entry.transcript


def heldout_speech(seconds: float) -> np.ndarray:
    """tiny-en's held-out clips one after another (0.4 s apart) until ``seconds`` are filled."""
    parts, filled = [], 0
    for entry in tiny_en_manifest():
        parts += [sf.read(entry.audio, dtype="float32")[0], np.zeros(6400, np.float32)]
        filled += parts[-2].shape[0] + 6400
        if filled >= seconds * 16000:
            return np.concatenate(parts)
    raise AssertionError(f"the held-out clips hold less than {seconds} s")


def test_default_flags_ready_soon_in_bounded_memory_and_any_model_name(tiny_served, tiny):
    """``qasr-jax serve --model tiny-en`` with no other flag: /health answers 200 within a generous bound, openai
    clients sending model="qwen3-asr" or "whisper-1" get a held-out clip's words, a 106 s upload (held-out clips
    in a row) decodes in pieces of at most 30 s (as offline with max_audio_seconds=30; streamed, piece after piece;
    tiny-en, trained on clips of 3-8 words, does not read 30 s pieces well), and the process's peak RSS stays under
    2 GiB (the warm-up used to compile every encoder bucket up to 1200 s, and was killed at 24 GB)."""
    served = tiny_served
    assert served.ready_seconds < READY_SECONDS, served.output()
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=600)
    assert [m.id for m in client.models.list().data] == ["tiny-en"]
    path, words = heldout(1)
    assert tiny.transcribe(path)[0].text == words
    for model in ("qwen3-asr", "whisper-1"):
        assert client.audio.transcriptions.create(file=open(path, "rb"), model=model).text == words
    wave = as_sent(heldout_speech(106.0))
    v = client.audio.transcriptions.create(file=("long.wav", wav_bytes(wave)), model="whisper-1",
                                           response_format="verbose_json")
    pieces = tiny.transcribe(wave, max_audio_seconds=30.0)[0]
    assert v.text == pieces.text
    assert [(s.start, s.end) for s in v.segments] == [(s.start, s.end) for s in pieces.segments]
    assert len(v.segments) >= 4 and all(s.end - s.start <= 30.0 for s in v.segments)
    # Streamed, each piece's text follows as it is done (not all at the end), and the deltas add up.
    events = list(client.audio.transcriptions.create(file=("long.wav", wav_bytes(wave)), model="whisper-1",
                                                     stream=True, language="en"))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    forced = tiny.transcribe(wave, language="en", max_audio_seconds=30.0)[0]
    assert "".join(deltas) == events[-1].text == forced.text
    assert len(deltas) >= len(forced.segments)
    assert served.peak_rss() < 2 * 2**30, f"peak RSS {served.peak_rss() / 2**30:.2f} GiB"


def test_warm_up_compiled_what_a_short_request_needs(server, client):
    """Ready means warmed up: the warm-up compiled programs, and a 1 s request then compiles nothing."""
    before = server.gauge("qasr_compilations")
    assert before > 0
    client.audio.transcriptions.create(file=("one.wav", wav_bytes(synthetic(1.0, 11))), model="qwen3-asr-tiny")
    assert server.gauge("qasr_compilations") == before


def test_64_clients_256_requests_each_get_their_own(server, client, asr):
    """Load: 64 concurrent clients send 256 requests of 1-20 s audio; every response arrives and equals offline
    transcription of its own file (text, and token log-probabilities, which tell any two clips apart: each response is
    nearer its own clip's than any other's), and the server counted exactly 256 answered requests: nothing lost or
    repeated. A row's float32 log-probabilities move with what shares its batch (offline, batch 3 or 32 against 16:
    up to 7.9e-6, 4.7e-6 of max |ref|; a served run: 1.2e-5), so they are held to the float32 parity standard,
    1e-4 of max |ref|, while the clips lie at least 5e-4 apart."""
    rng = np.random.default_rng(5)
    waves = [as_sent(synthetic(float(s), 100 + i)) for i, s in enumerate(rng.uniform(1.0, 20.0, 256).round(2))]
    expected = asr.transcribe(waves, max_new_tokens=NEW, batch_size=16)
    lps = np.array([r.token_logprobs for r in expected])  # (256, NEW): random weights run to the limit
    apart = np.abs(lps[:, None] - lps[None]).sum(-1) + np.eye(len(waves))
    assert apart.min() > 5e-4  # no two clips' log-probabilities are alike
    before = server.count(ENDPOINT, 200)

    def one(i: int):
        return i, client.audio.transcriptions.create(file=(f"clip{i}.wav", wav_bytes(waves[i])),
                                                     model="qwen3-asr-tiny", include=["logprobs"],
                                                     extra_body={"max_new_tokens": NEW})

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(256)))
    assert [i for i, _ in got] == list(range(256))
    tol = 1e-4 * np.abs(lps).max()
    for (i, r), want in zip(got, expected):
        assert r.text == want.text
        served = np.array([lp.logprob for lp in r.logprobs])
        assert np.abs(served - lps[i]).max() <= tol, i
        assert np.abs(served - lps).sum(-1).argmin() == i
    assert server.count(ENDPOINT, 200) - before == 256
    assert server.gauge("qasr_live_slots") == 0 and server.gauge("qasr_queue_depth") == 0


def test_hotwords_field_biases_as_offline(client, asr):
    """hotwords (a list, or one comma-separated string) and hotword_boost: the text equals the offline
    transcription with the same hotwords, and the boosted word appears where the plain decoding lacks it (this
    tied random head repeats one token at log-probability ~-0.01, so the boost that turns it is large)."""
    path = os.path.join(DATA, "hello_en.wav")
    offline = asr.transcribe(path, hotwords=["Pallas", "Flax"], hotword_boost=40.0, max_new_tokens=NEW)[0]
    plain = asr.transcribe(path, max_new_tokens=NEW)[0].text
    assert "flax" in offline.text.lower() and "flax" not in plain.lower()
    for words in (["Pallas", "Flax"], "Pallas, Flax"):
        r = client.audio.transcriptions.create(file=open(path, "rb"), model="qwen3-asr-tiny", extra_body={
            "max_new_tokens": NEW, "hotwords": words, "hotword_boost": 40.0})
        assert r.text == offline.text


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, tmp_path):
    ok = {"model": "qwen3-asr-tiny"}
    audio = {"file": ("a.wav", wav_bytes(synthetic(1.0)))}
    cases = [  # (fields, files, key, status, param)
        (ok, {"file": ("notes.txt", b"these are words, not audio\n" * 40)}, SERVER_KEY, 400, "file"),
        (ok, {"file": ("empty.wav", b"")}, SERVER_KEY, 400, "file"),
        (ok, {"file": ("big.wav", os.urandom(3 * 2**20))}, SERVER_KEY, 413, "file"),
        (ok, {"file": ("long.wav", wav_bytes(synthetic(21.0)))}, SERVER_KEY, 400, "file"),  # over 20 s
        (ok, {}, SERVER_KEY, 400, "file"),
        ({**ok, "response_format": "docx"}, audio, SERVER_KEY, 400, "response_format"),
        ({**ok, "language": "Klingon"}, audio, SERVER_KEY, 400, "language"),
        ({**ok, "temperature": "0.7"}, audio, SERVER_KEY, 400, "temperature"),
        ({**ok, "beam_size": "zero"}, audio, SERVER_KEY, 400, "beam_size"),
        ({**ok, "hotwords": "Qwen", "hotword_boost": "-1"}, audio, SERVER_KEY, 400, "hotword_boost"),
        ({**ok, "stream": "true", "response_format": "srt"}, audio, SERVER_KEY, 400, "stream"),
        ({"model": "whisper-1"}, audio, SERVER_KEY, 404, "model"),  # --strict-model-name
        ({**ok, "prompt": "word " * (MAX_CONTEXT_TOKENS + 100)}, audio, SERVER_KEY, 400, "prompt"),
        (ok, audio, None, 401, None),
        (ok, audio, "not-the-key", 401, None),
    ]
    for fields, files, key, status, param in cases:
        code, headers, body = post(server, ENDPOINT, fields, files, key=key)
        err = error_of(body)
        assert (code, err["param"]) == (status, param), (fields, files.keys(), key, body)
        if status == 413:
            assert "2 MB" in err["message"] and "--max-upload-mb" in err["message"]
        elif param == "file" and files:
            assert files["file"][0] in err["message"]  # names the upload
        elif param == "prompt":
            assert f"{MAX_CONTEXT_TOKENS:,}" in err["message"] and "prompt" in err["message"]
        assert server.healthy()
    assert "Klingon" in error_of(post(server, ENDPOINT, {**ok, "language": "Klingon"}, audio)[2])["message"]
    code, _, body = post(server, "/v1/audio/translations", ok, audio)
    assert code == 404 and "translat" in error_of(body)["message"]
    # The openai client raises its own error types from these bodies.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.audio.transcriptions.create(file=audio["file"], model="qwen3-asr-tiny", temperature=0.5)


def _send_request(server, fields: dict, wave: np.ndarray) -> socket.socket:
    """Send a transcription request on a raw socket and return it unread."""
    body, ctype = multipart(fields, {"file": ("clip.wav", wav_bytes(wave))})
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (f"POST {ENDPOINT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def _wait_for(condition, what: str, limit: float = 300.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {limit:.0f} s"
        time.sleep(0.2)


def test_a_client_that_leaves_frees_its_slot(server):
    """A streamed request dropped after its first delta, and a plain one dropped while it decodes: each is
    counted as 499 (client closed) and the live-slot count goes back to zero long before their budget is spent."""
    before = server.count(ENDPOINT, 499)
    fields = {"model": "qwen3-asr-tiny", "max_new_tokens": "3000", "language": "en"}
    sock = _send_request(server, {**fields, "stream": "true"}, synthetic(3.0, 3))
    seen = b""
    while b"transcript.text.delta" not in seen:
        seen += sock.recv(4096)
    sock.close()
    _wait_for(lambda: server.count(ENDPOINT, 499) == before + 1 and server.gauge("qasr_live_slots") == 0,
              "the streamed request's slot freed")
    sock = _send_request(server, fields, synthetic(3.0, 4))
    _wait_for(lambda: server.gauge("qasr_live_slots") == 1, "the plain request decoding")
    sock.close()
    _wait_for(lambda: server.count(ENDPOINT, 499) == before + 2 and server.gauge("qasr_live_slots") == 0,
              "the plain request's slot freed")
    assert server.healthy()


def test_sigterm_finishes_the_request_in_flight_then_exits(dirs, asr, tmp_path):
    """SIGTERM while a streamed request decodes: new connections are refused, the stream still ends with the
    full offline text, and the process exits with 0."""
    served = Served(dirs["asr"], "--max-audio-seconds", "3", "--max-slots", "2", cache=dirs["cache"],
                    log=str(tmp_path / "server.log"))
    wave = as_sent(synthetic(2.5, 8))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=300)
        body, ctype = multipart({"stream": "true", "language": "en", "max_new_tokens": "1000"},
                                {"file": ("clip.wav", wav_bytes(wave))})
        conn.request("POST", ENDPOINT, body=body, headers={"Content-Type": ctype})
        response = conn.getresponse()
        first = response.readline()  # the first event is on its way: the request is in flight
        assert first.startswith(b"data: ")
        served.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: not _accepts(served.port), "the listening socket closed")
        rest = response.read().decode()
        events = [json.loads(line[6:]) for line in (first.decode() + rest).splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "transcript.text.done"
        assert events[-1]["text"] == asr.transcribe(wave, language="en", max_new_tokens=1000)[0].text
        assert served.proc.wait(timeout=120) == 0
    finally:
        served.stop()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def test_readme_serving_examples_run(server, asr, tiny_served, tiny, tmp_path, monkeypatch, capsys):
    """docs/serving.md's examples against this server (its address, key and model name swapped in): the serve
    command parses; the curl command, the openai client and the realtime example give the offline (and the
    streaming) transcript. The try-it block's curl, from a checkout's root, gets from ``qasr-jax serve --model
    tiny-en`` the clip's words, as the page shows them."""
    commands = [c for block in (0, 2) for c in doc_commands(block)]
    (serve,) = [c for c in commands if c.startswith("qasr-jax serve")]
    args = cli.build_parser().parse_args(shlex.split(serve)[1:])
    assert args.func is command.serve and (args.port, args.api_key) == (8000, "sk-local")

    def swap(text: str) -> str:
        return (text.replace("http://localhost:8000", server.url).replace("ws://localhost:8000",
                server.url.replace("http", "ws")).replace("sk-local", KEY)
                .replace("Qwen/Qwen3-ASR-0.6B", "qwen3-asr-tiny"))

    shutil.copy(os.path.join(DATA, "hello_en.wav"), tmp_path / "speech.wav")
    monkeypatch.chdir(tmp_path)
    (curl,) = [c for c in commands if c.startswith("curl ")]
    out = subprocess.run(shlex.split(swap(curl)), capture_output=True, text=True, check=True).stdout
    offline = asr.transcribe("speech.wav")[0]
    assert json.loads(out)["text"] == offline.text and json.loads(out)["duration"] == round(offline.duration, 3)
    client_block, realtime_block = page_blocks("docs/serving.md", "python")
    namespace: dict = {}
    exec(compile(swap(client_block), "docs/serving.md", "exec"), namespace)
    assert namespace["text"] == asr.transcribe("speech.wav", language="en")[0].text + "\n"
    assert capsys.readouterr().out.splitlines()[-1].startswith("transcript.text.done")
    exec(compile(swap(realtime_block), "docs/serving.md", "exec"), namespace)
    wave = sf.read("speech.wav", dtype="float32")[0]
    pcm = (soxr.resample(wave, 16000, 24000) * 32767).astype("<i2").tobytes()
    stream = asr.stream(language="en")
    stream.feed(realtime.Pcm16Resampler().push(pcm, last=True))
    assert namespace["transcript"] == stream.finish().text
    (curl,) = [c for c in doc_commands(1) if c.startswith("curl ")]
    out = subprocess.run(shlex.split(curl.replace("http://localhost:8000", tiny_served.url)), cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    text = json.loads(out)["text"]
    clip, words = heldout(0)
    assert clip.endswith("heldout_0000.ogg") and text == tiny.transcribe(clip)[0].text == words
    assert f'`{{"text":"{text}"}}`' in read_page("docs/serving.md")
