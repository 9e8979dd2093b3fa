"""qasr_jax.server.heap: the glibc calls the server makes to bound its resident memory really reach glibc."""

import subprocess
import sys

import pytest

_PROBE = """
import re
from qasr_jax.server import heap

def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

assert heap.limit_arenas()
blocks = [bytearray(1024) for _ in range(300_000)]  # ~300 MB of 1 KiB malloc blocks (over pymalloc's 512 bytes)
pin = bytearray(1024)  # allocated last, it keeps the heap's top in use, so free() alone gives nothing back
del blocks
before = rss()
assert heap.trim()
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and mallopt: Linux only")
def test_trim_hands_freed_heap_memory_back():
    """After ~300 MB of small blocks are freed under a block that pins the heap's top, RSS stays up until
    ``heap.trim()``, which gives at least 200 MB of it back (run in a fresh process: it measures its own RSS)."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    assert int(out) > 200 * 2**20, f"trim gave back only {int(out) / 2**20:.0f} MiB"
