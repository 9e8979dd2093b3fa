"""The server's Prometheus metrics, in a registry of their own (so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """Requests by endpoint and status, latency, queue depth, live slots, audio seconds, compilations, sessions."""

    def __init__(self, scheduler, compiles) -> None:
        """``scheduler`` gives ``waiting`` and ``live``; ``compiles`` a ``CompileCount`` (``count``) kept current."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qasr_requests", "HTTP and realtime requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("qasr_request_seconds", "Time from a request's arrival to its last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.audio = Counter("qasr_audio_seconds", "Seconds of audio transcribed", registry=r)
        Gauge("qasr_queue_depth", "Audio pieces waiting for a decode slot", registry=r).set_function(
            lambda: scheduler.waiting)
        Gauge("qasr_live_slots", "Audio pieces decoding in the engine's slots now", registry=r).set_function(
            lambda: scheduler.live)
        Gauge("qasr_compilations", "XLA compilations since the server started (warm-up included)",
              registry=r).set_function(lambda: compiles.count)
        self.sessions = Gauge("qasr_realtime_sessions", "Open realtime WebSocket sessions", registry=r)

    def render(self) -> bytes:
        """The text exposition format, for GET /metrics."""
        return generate_latest(self.registry)
