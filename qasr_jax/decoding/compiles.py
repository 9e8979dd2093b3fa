"""Compilation: counting XLA compilations (how tests and benchmarks prove that a new input length compiled
nothing), and the compiler options the encoder's programs need."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileCount:
    """Programs made inside a ``count_compilations`` block: ``count`` backend compilations (a program loaded from
    the persistent cache included), ``seconds`` they took, ``names`` of each (jit names, in order), and
    ``cache_hits`` of them loaded from the persistent cache instead of compiled."""

    count: int = 0
    seconds: float = 0.0
    names: list = dataclasses.field(default_factory=list)
    cache_hits: int = 0

    @property
    def compiled(self) -> int:
        """Programs really compiled (not loaded from the persistent cache)."""
        return self.count - self.cache_hits


@contextlib.contextmanager
def count_compilations():
    """``with count_compilations() as c: ...`` then ``c.count`` backend compilations (``c.seconds`` spent,
    ``c.names``, ``c.compiled`` of them not from the persistent cache)."""
    seen = CompileCount()

    def listen(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            seen.count += 1
            seen.seconds += duration
            seen.names.append(kwargs.get("fun_name", "?"))

    def hit(event, **kwargs):
        if event == CACHE_HIT_EVENT:
            seen.cache_hits += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    jax.monitoring.register_event_listener(hit)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        jax.monitoring.unregister_event_listener(hit)


# XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK, which runs the encoder's 480-channel stride-2 convs at half
# the speed of XLA's own (Eigen) convolution and takes workspace outside XLA's memory plan (a 20-minute input then
# fails to allocate). Programs that run the encoder keep YNNPACK for dots only on CPU: float32 dots run at the same
# speed either way, but bf16 dots without YNNPACK fall back to a path ~10x slower (0.9 GB/s at two rows).
_CPU_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def jit_with_encoder(fn, **kwargs):
    """``jax.jit`` for a program that runs the audio encoder, with the CPU compiler options it needs."""
    if jax.default_backend() == "cpu":
        kwargs["compiler_options"] = {**_CPU_CONV_OPTIONS, **kwargs.get("compiler_options", {})}
    return jax.jit(fn, **kwargs)


CACHE_ENV = "QASR_JAX_COMPILATION_CACHE"


def default_cache_dir() -> str:
    """Where the ``qasr-jax`` command keeps compiled programs: $XDG_CACHE_HOME (or ~/.cache)/qasr-jax/xla."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qasr-jax", "xla")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Keep compiled XLA programs on disk, so a later process with the same shapes loads them instead of
    compiling (the real-size model compiles one program per bucket, several seconds each).

    ``path`` defaults to $QASR_JAX_COMPILATION_CACHE, else :func:`default_cache_dir`; "off" (or "0", "none")
    turns it off. A cache directory JAX already has configured is kept. Returns the directory in use, or None.
    The ``qasr-jax`` command calls this; library code leaves JAX's global configuration alone unless asked.
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    path = str(path or os.environ.get(CACHE_ENV) or default_cache_dir())
    if path.strip().lower() in ("off", "0", "none", "false"):
        return None
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program, however quick to compile: on a fast CPU the small ones (log-mel, embedding, a tiny model's
    # programs) compile in under JAX's default 1 s threshold, yet together they are most of a cold start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def warm_up(asr, seconds, batch_sizes=(1,), beam_size: int = 1, stream_seconds: float = 0.0, slots: int | None = None,
            log=None, stop_loops: bool = False, fallback=None) -> CompileCount:
    """Compile what transcribing clips of each length in ``seconds`` needs, ``b`` clips at once for each ``b`` of
    ``batch_sizes`` (in a pipeline of ``slots`` decode slots, default ``b``: what ``transcribe(batch_size=b)``
    makes, with its ``stop_loops`` and, for every stage of a ``fallback`` (``qasr_jax.transcribe.Fallback``), that
    stage's search), and a lone stream over ``stream_seconds`` -> what it compiled (into the persistent cache when
    it is on).

    Each shape is made by running it (noise in, one decode step, cancelled), so the programs are exactly the ones
    a job of those lengths calls; ``log`` (e.g. ``print``) gets one line per shape.
    """
    import numpy as np

    from qasr_jax.decoding.pipeline import DecodeOptions, Pipeline, Work, token_budget, token_limit

    rng = np.random.default_rng(0)
    limit = token_limit(asr.model.config)
    options = DecodeOptions.for_tokenizer(asr.tokenizer, beam_size=beam_size, stop_loops=stop_loops)
    stages = [options] if fallback is None else fallback.stages(options)

    def noise(seconds: float) -> np.ndarray:
        return (0.05 * rng.standard_normal(max(1, int(seconds * 16000)))).astype(np.float32)

    with count_compilations() as total:
        for rows, (k, stage) in itertools.product(batch_sizes, enumerate(stages)):
            pipe = Pipeline(asr.model, asr.tokenizer, stage, slots or rows)
            for s in seconds:
                with count_compilations() as c:
                    works = [Work(("warm-up", i), noise(s), token_budget(s, limit)) for i in range(rows)]
                    for w in works:
                        pipe.submit(w)
                    pipe.step(max_steps=1)
                    pipe.partial()
                    for w in works:
                        pipe.cancel(w.key)
                    pipe.step()  # frees the cancelled slots' group
                if log:
                    what = "" if len(stages) == 1 else f" (fallback stage {k})"
                    log(f"warm-up: {rows} x {s:g} s{what}: {c.count} programs, {c.compiled} compiled "
                        f"({c.seconds:.1f} s)")
        if stream_seconds > 0:
            with count_compilations() as c:
                stream = asr.stream()
                stream.feed(noise(stream_seconds))
                stream.finish()
            if log:
                log(f"warm-up: a stream of {stream_seconds:g} s: {c.count} programs, {c.compiled} compiled "
                    f"({c.seconds:.1f} s)")
    return total
