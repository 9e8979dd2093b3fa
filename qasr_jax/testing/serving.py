"""Helpers for the server tests: start the real ``qasr-jax serve`` on a free loopback port, read its metrics and
its peak memory, and send raw multipart requests (for the malformed ones no client library would send)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

from prometheus_client.parser import text_string_to_metric_families

START_SECONDS = 300  # load and warm up (one short request's programs): generous for a busy 2-core machine


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A ``qasr-jax serve`` subprocess on 127.0.0.1: ``url`` (no trailing slash), ``key``, ``proc``, and
    ``ready_seconds`` from the start of the process to the first 200 from /health."""

    def __init__(self, model: str, *flags: str, key: str | None = None, cache: str | None = None, log: str,
                 start_seconds: float = START_SECONDS):
        self.port, self.key = free_port(), key
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "qasr_jax.cli", "serve", "--model", model, "--port", str(self.port), *flags]
        if key:
            argv += ["--api-key", key]
        env = {**os.environ, "QASR_JAX_COMPILATION_CACHE": cache or "off"}
        self.log = log
        self._log_file = open(log, "w")
        start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        while not self.healthy():
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < start + start_seconds, f"not ready after {start_seconds} s:\n{self.output()}"
            time.sleep(0.5)
        self.ready_seconds = time.monotonic() - start

    def output(self, tail: int = 4000) -> str:
        """The last ``tail`` characters the server printed."""
        with open(self.log) as f:
            return f.read()[-tail:]

    def healthy(self) -> bool:
        """True when GET /health answers 200."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample of GET /metrics: (name, sorted labels) -> value."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def count(self, endpoint: str, status: int) -> float:
        """Requests to ``endpoint`` answered with ``status`` so far."""
        labels = (("endpoint", endpoint), ("status", str(status)))
        return self.metrics().get(("qasr_requests_total", labels), 0.0)

    def gauge(self, name: str) -> float:
        return self.metrics()[(name, ())]

    def peak_rss(self) -> int:
        """The server process's peak resident memory so far, in bytes (VmHWM from /proc; Linux only)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib * 1024

    def stop(self) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self._log_file.close()
        return code


def multipart(fields: dict[str, str | list[str]], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type; a list value repeats its field."""
    boundary = uuid.uuid4().hex
    out = []
    for name, values in fields.items():
        for value in values if isinstance(values, list) else [values]:
            out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


SERVER_KEY = "the server's own key"


def post(server: Served, path: str, fields=None, files=None, key: str | None = SERVER_KEY) -> tuple[int, dict, bytes]:
    """POST a multipart form -> (status, headers, body) with the server's key, or ``key`` (None: no
    Authorization header)."""
    body, ctype = multipart(fields or {}, files or {})
    headers = {"Content-Type": ctype}
    if key is not None:
        headers["Authorization"] = f"Bearer {server.key if key == SERVER_KEY else key}"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def error_of(body: bytes) -> dict:
    """The ``error`` object of an OpenAI-shaped error body; fails unless the shape is exactly OpenAI's."""
    d = json.loads(body)
    assert set(d) == {"error"} and set(d["error"]) == {"message", "type", "param", "code"}, d
    assert isinstance(d["error"]["message"], str) and d["error"]["message"]
    return d["error"]
