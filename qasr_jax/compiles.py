"""Compilation: counting XLA compilations (how tests and benchmarks prove that a new input length compiled
nothing), and the compiler options the encoder's programs need."""

from __future__ import annotations

import contextlib
import dataclasses

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileCount:
    """Backend compilations seen inside a ``count_compilations`` block, and the seconds they took."""

    count: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def count_compilations():
    """``with count_compilations() as c: ...`` then ``c.count`` backend compilations (``c.seconds`` spent)."""
    seen = CompileCount()

    def listen(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            seen.count += 1
            seen.seconds += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK, which runs the encoder's 480-channel stride-2 convs at half
# the speed of XLA's own (Eigen) convolution and takes workspace outside XLA's memory plan (a 20-minute input then
# fails to allocate). Programs that run the encoder compile with YNNPACK fusions off on CPU; matmuls are unaffected.
_CPU_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jit_with_encoder(fn, **kwargs):
    """``jax.jit`` for a program that runs the audio encoder, with the CPU compiler options it needs."""
    if jax.default_backend() == "cpu":
        kwargs["compiler_options"] = {**_CPU_CONV_OPTIONS, **kwargs.get("compiler_options", {})}
    return jax.jit(fn, **kwargs)
