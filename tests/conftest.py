"""Shared fixtures: random-weight reference checkpoints (built once per session) and test audio."""

from __future__ import annotations

import dataclasses
import os
import zlib

import numpy as np
import pytest
import soundfile as sf

from qasr_jax.config import ModelConfig, preset
from qasr_jax.tokenizer import Tokenizer
from tests.reference import build_reference, save_hf, save_official
from tests.tokenizer_files import write_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")


def tiny_variant(kind: str) -> ModelConfig:
    """The tiny preset as ASR with tied head ('asr'), untied head ('asr-untied') or forced aligner ('aligner')."""
    cfg = preset("tiny")
    if kind == "asr":
        return cfg
    if kind == "asr-untied":
        return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=False))
    if kind == "aligner":
        text = dataclasses.replace(cfg.text, tie_word_embeddings=False, vocab_size=152064)
        return dataclasses.replace(cfg, text=text, num_labels=5000)
    raise ValueError(kind)


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


def speech(name: str) -> np.ndarray:
    """A stored espeak-ng clip (16 kHz mono float32)."""
    wave, rate = sf.read(os.path.join(DATA, name), dtype="float32")
    assert rate == 16000
    return wave


def synthetic(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise plus a chirp: broadband, non-stationary, deterministic."""
    n = int(round(seconds * 16000))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t)
    return (chirp + 0.05 * rng.standard_normal(n)).astype(np.float32)
