"""Test support shared by the test suite, the benchmarks and the multi-device checks.

Installed with the package so that every process reaches it by its import name, never through the repository root on
``sys.path`` (the root's ``kernels/`` and ``convert/`` folders would shadow registry packages of those names, and
transformers >= 5.25 imports the registry's ``kernels``). ``reference`` (the PyTorch reference model and
checkpoints saved like the released ones), ``parity`` (the reference's side of a parity check: its features,
logits, greedy ids, loss and gradients) and ``silero`` (Silero's own VAD) need the ``test`` extra; ``docs`` (the
README's and docs/ pages' code blocks) and ``subtitles`` (SRT and WebVTT read back) need nothing more; ``serving``
(a server in a subprocess, and requests to it) the ``serve`` extra; ``tokenizer_files`` (the real Qwen vocabulary
with the ASR tokens) and ``notebook_run`` (a notebook's cells) only the core dependencies. ``DATA`` is the
checkout's ``tests/data`` folder: the clips are not shipped in the wheel; ``tiny_en_manifest`` reads the trained
tiny-en model's clip lists there.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import soundfile as sf

from qasr_jax.modeling.config import QWEN_TIMESTAMP, ModelConfig, preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout (editable install)
DATA = os.path.join(ROOT, "tests", "data")


def tiny_en_manifest(name: str = "heldout") -> list:
    """The clips of tests/data/tiny_en/``name``.jsonl (heldout, finetune, novel_eval, ...): ``training.data.Example``
    rows, their ``audio`` paths resolved and ``transcript`` their words."""
    from qasr_jax.training.data import read_manifest

    return read_manifest(os.path.join(DATA, "tiny_en", f"{name}.jsonl"))


def tiny_variant(kind: str) -> ModelConfig:
    """The tiny preset as ASR with tied head ('asr'), untied head ('asr-untied') or forced aligner ('aligner')."""
    cfg = preset("tiny")
    if kind == "asr":
        return cfg
    if kind == "asr-untied":
        return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=False))
    if kind == "aligner":
        text = dataclasses.replace(cfg.text, tie_word_embeddings=False, vocab_size=152064)
        return dataclasses.replace(cfg, text=text, num_labels=5000, timestamp_token_id=QWEN_TIMESTAMP)
    raise ValueError(kind)


def speech(name: str) -> np.ndarray:
    """A stored espeak-ng clip from tests/data (16 kHz mono float32)."""
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
