"""Counting XLA compilations: how tests and benchmarks prove that a new input length compiled nothing."""

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
