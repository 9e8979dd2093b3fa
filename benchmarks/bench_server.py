"""Server throughput and latency against offline batch transcription of the same clips, same machine, same run.

Starts ``qasr-jax serve`` on a free loopback port with a random-weight checkpoint, then:

* offline: ``Transcriber.transcribe`` of every clip with ``batch_size`` = the server's ``--max-slots`` (timed after
  one untimed run that compiles);
* served: ``--clients`` concurrent clients (the official ``openai`` client, one thread each) send the same clips
  (an untimed pass first compiles the shapes the warm-up left out), timed: throughput in audio seconds per
  second, p50 / p99 request latency;
* time to first delta: a streamed 10 s request on the idle server, from sending to the first
  ``transcript.text.delta`` (median of 5).

Random weights never stop on their own, so every clip decodes exactly ``--new-tokens`` tokens on both sides.

``--memory`` measures instead what a user meets first: ``qasr-jax serve --model DIR`` with default flags (and no
compilation cache: a cold start), the seconds to the first 200 from /health and the process's peak RSS then, and
the peak RSS after a ``--upload-seconds`` (600) upload, against the bound of the parameters' bytes + 3 GiB.

    python benchmarks/bench_server.py --quick              # the tiny test config
    python benchmarks/bench_server.py                      # random-weight ASR-0.6B (slow on a laptop CPU)
    python benchmarks/bench_server.py --memory --quick     # readiness and memory, tiny
    python benchmarks/bench_server.py --memory             # readiness and memory, random ASR-0.6B float32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import io
import os
import subprocess
import tempfile
import time
import zlib

import jax
import numpy as np
import openai
import soundfile as sf


from qasr_jax.modeling.config import preset  # noqa: E402
from qasr_jax.modeling.model import param_shapes  # noqa: E402
from qasr_jax.testing.reference import build_reference, save_hf  # noqa: E402
from qasr_jax.testing.serving import Served  # noqa: E402
from qasr_jax.testing.tokenizer_files import write_tokenizer  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")


def looped(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """``seconds`` of espeak speech looped and cut, plus a little noise so that no two clips are alike."""
    speech = sf.read(os.path.join(DATA, "long_en.wav"), dtype="float32")[0]
    n = int(seconds * 16000)
    return (np.resize(speech, n) + 0.01 * rng.standard_normal(n)).astype(np.float32)


def clips(count: int, seed: int = 0) -> list[np.ndarray]:
    """1-20 s clips of looped speech."""
    rng = np.random.default_rng(seed)
    return [looped(rng.uniform(1.0, 20.0), rng) for _ in range(count)]


def wav(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def served_pass(client, files: list[bytes], clients: int, new: int) -> tuple[float, list[float], list[str]]:
    """Every file through the server from ``clients`` threads -> (wall seconds, latencies, texts)."""
    def one(i: int):
        t = time.perf_counter()
        r = client.audio.transcriptions.create(file=(f"clip{i}.wav", files[i]), model="bench",
                                               extra_body={"max_new_tokens": new})
        return time.perf_counter() - t, r.text

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        got = list(pool.map(one, range(len(files))))
    return time.perf_counter() - start, [g[0] for g in got], [g[1] for g in got]


def first_delta(client, audio: bytes, new: int) -> float:
    """Seconds from sending a streamed request to its first ``transcript.text.delta`` event."""
    start = time.perf_counter()
    stream = client.audio.transcriptions.create(file=("ten.wav", audio), model="bench", stream=True, language="en",
                                                extra_body={"max_new_tokens": new})
    times = [time.perf_counter() - start for event in stream if event.type == "transcript.text.delta"]
    assert times, "the streamed request sent no delta (an empty transcript)"
    return times[0]


def memory(model_dir: str, cfg, root: str, upload_seconds: float, new_tokens: int | None) -> None:
    """Readiness and peak RSS of ``qasr-jax serve`` with default flags, then after one long upload (module doc)."""
    params = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(param_shapes(cfg, "float32")))
    bound = params + 3 * 2**30
    gib = 2**30
    served = Served(model_dir, log=os.path.join(root, "server.log"), start_seconds=3600)
    try:
        print(f"ready (/health 200) after {served.ready_seconds:.1f} s; peak RSS {served.peak_rss() / gib:.2f} GiB "
              f"(parameters {params / gib:.2f} GiB, bound {bound / gib:.2f} GiB)")
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=7200)
        audio = wav(looped(upload_seconds, np.random.default_rng(1)))
        extra = {"max_new_tokens": new_tokens} if new_tokens else {}
        start = time.perf_counter()
        r = client.audio.transcriptions.create(file=("long.wav", audio), model="whisper-1",
                                               response_format="verbose_json", extra_body=extra)
        rss = served.peak_rss()
        print(f"{upload_seconds:.0f} s upload ({len(audio) / 2**20:.1f} MB): {len(r.segments)} pieces in "
              f"{time.perf_counter() - start:.1f} s; peak RSS {rss / gib:.2f} GiB "
              f"({'within' if rss < bound else 'OVER'} the bound of {bound / gib:.2f} GiB)")
        print(f"compilations in the server: {served.gauge('qasr_compilations'):.0f}")
    finally:
        served.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config instead of ASR-0.6B")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--slots", type=int, default=64, help="the server's --max-slots and the offline batch")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--memory", action="store_true", help="readiness and peak RSS with default flags instead")
    parser.add_argument("--upload-seconds", type=float, default=600.0, help="--memory: the long upload's length")
    parser.add_argument("--upload-tokens", type=int, default=None, help="--memory: max_new_tokens per piece of "
                        "the upload (default: the server's budget, which random weights run to)")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="bench-server-")
    cfg = preset("tiny" if args.quick else "asr-0.6b")
    reference = build_reference(cfg, seed=zlib.crc32(b"asr") % 1000)
    model_dir = save_hf(reference, os.path.join(root, "model"))
    write_tokenizer(model_dir, "hf")
    del reference
    gc.collect()  # the torch copy of a real-size model would otherwise sit beside the server
    if args.memory:
        print(f"{cpu_name()}; {'tiny' if args.quick else 'ASR-0.6B'} random weights, float32; qasr-jax serve with "
              "default flags, no compilation cache")
        memory(model_dir, cfg, root, args.upload_seconds, args.upload_tokens)
        return
    waves = clips(args.clips)
    files = [wav(w) for w in waves]
    audio_seconds = sum(w.shape[0] for w in waves) / 16000
    print(f"{cpu_name()}; {'tiny' if args.quick else 'ASR-0.6B'} random weights, float32; {args.clips} clips of "
          f"1-20 s ({audio_seconds:.0f} s of audio), {args.new_tokens} new tokens each, {args.slots} slots")

    asr = Transcriber.from_pretrained(model_dir)
    asr.transcribe(waves, max_new_tokens=args.new_tokens, batch_size=args.slots)  # compiles
    start = time.perf_counter()
    offline = asr.transcribe(waves, max_new_tokens=args.new_tokens, batch_size=args.slots)
    offline_s = time.perf_counter() - start
    del asr
    print(f"offline batch:  {offline_s:7.1f} s   {audio_seconds / offline_s:8.1f} audio-s/s")

    served = Served(model_dir, "--max-slots", str(args.slots), "--max-audio-seconds", "20", "--max-queue", "1024",
                    "--served-model-name", "bench", log=os.path.join(root, "server.log"), start_seconds=3600)
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=3600)
        served_pass(client, files, args.clients, args.new_tokens)  # compiles the shapes the warm-up left out
        compiled = served.gauge("qasr_compilations")
        wall, latencies, texts = served_pass(client, files, args.clients, args.new_tokens)
        compiled = served.gauge("qasr_compilations") - compiled
        assert texts == [r.text for r in offline], "a served transcript differs from the offline one"
        ratio = (audio_seconds / wall) / (audio_seconds / offline_s)
        print(f"served ({args.clients} clients): {wall:7.1f} s   {audio_seconds / wall:8.1f} audio-s/s   "
              f"{ratio:.2f}x offline   latency p50 {np.percentile(latencies, 50):.2f} s, "
              f"p99 {np.percentile(latencies, 99):.2f} s; {compiled:.0f} compilations during the timed pass")
        ten = wav(np.resize(waves[0], 160000))  # 10 s
        first = [first_delta(client, ten, args.new_tokens) for _ in range(5)]
        print(f"time to first delta, streamed 10 s request (idle server): median {np.median(first) * 1000:.0f} ms")
        print(f"compilations in the server (warm-up included): {served.gauge('qasr_compilations'):.0f}")
    finally:
        served.stop()


if __name__ == "__main__":
    main()
