"""Shared fixtures: random-weight reference checkpoints (built once per session) and test audio."""

from __future__ import annotations

import os
import sys
import zlib

import pytest

# `python -m pytest` puts the working directory first on sys.path. From the repository root that would make our
# top-level kernels/ and convert/ folders importable as the packages `kernels` and `convert`, shadowing the registry's
# `kernels` that transformers imports. Tests reach everything through installed import names (qasr_jax,
# qasr_jax.testing), so the root is taken off the path before anything else is imported.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

from qasr_jax.io.tokenizer import Tokenizer  # noqa: E402
from qasr_jax.testing import tiny_variant  # noqa: E402
from qasr_jax.testing.reference import build_reference, save_hf, save_official  # noqa: E402
from qasr_jax.testing.tokenizer_files import with_tokenizer, write_tokenizer  # noqa: E402
from qasr_jax.transcribe import Transcriber  # noqa: E402


class Checkpoints:
    """A reference torch model and the same weights saved in both layouts."""

    def __init__(self, kind: str, root: str):
        self.cfg = tiny_variant(kind)
        self.torch_model = build_reference(self.cfg, seed=zlib.crc32(kind.encode()) % 1000)  # stable across runs
        self.hf = save_hf(self.torch_model, os.path.join(root, "hf"))
        self.official = save_official(self.torch_model, self.cfg, os.path.join(root, "official"), shards=2)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Lazily built per kind: checkpoints('asr').hf is a folder, .torch_model the reference."""
    made: dict[str, Checkpoints] = {}

    def get(kind: str) -> Checkpoints:
        if kind not in made:
            made[kind] = Checkpoints(kind, str(tmp_path_factory.mktemp(kind)))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Tokenizer folders in both layouts, from the real Qwen vocabulary plus the ASR tokens."""
    root = tmp_path_factory.mktemp("tok")
    return {layout: write_tokenizer(root / layout, layout) for layout in ("official", "hf")}


@pytest.fixture(scope="session")
def toks(folders):
    return {layout: Tokenizer.from_dir(path) for layout, path in folders.items()}


@pytest.fixture(scope="session")
def tok(toks):
    return toks["official"]


@pytest.fixture(scope="module")
def asr_dir(checkpoints, tmp_path_factory):
    """The tiny ASR checkpoint (official layout) with the official tokenizer files, one copy per test module."""
    return with_tokenizer(checkpoints("asr").official, tmp_path_factory, "official")


@pytest.fixture(scope="module")
def asr(asr_dir):
    """A Transcriber on ``asr_dir`` (a module may define its own ``asr`` for another checkpoint)."""
    return Transcriber.from_pretrained(asr_dir)
