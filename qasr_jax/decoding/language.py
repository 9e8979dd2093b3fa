"""Spoken-language probabilities read from the model's own header, without decoding a transcript.

Qwen3-ASR starts every transcript with ``language {Name}<asr_text>``, so the distribution over languages is in
the logits at those positions: a language's score is the product of the probabilities of its header tokens after
the prompt (the shared ``language`` and the name's tokens) and of the ``<asr_text>`` that ends the name, so that one
name never takes the probability of a longer name it begins; the scores are then normalised over the model's
languages (its ``support_languages``, else the 30 built-in names). The cost is the prompt's prefill plus one
decoder step per header token after the first, batched over every language at once.

A top probability under ``UNCERTAIN`` (0.5) means the model hesitates between languages: often code-switched
speech (several languages in one clip), a clip too short to tell, or no speech.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.decoding.buckets import batch_rows, frame_bucket, prompt_width
from qasr_jax.io.audio import SAMPLE_RATE, load_audio, log_mel_batch, n_frames
from qasr_jax.io.prompts import LANGUAGES, build_prompt_ids, supported_languages
from qasr_jax.modeling.model import KVCache

MAX_SECONDS = 30.0  # detection reads the first 30 s of each input, as Whisper's detect_language does
UNCERTAIN = 0.5  # below this top probability, treat the language as uncertain (code-switching, too short, no speech)
TOP = 5  # how many languages a Result keeps (Result.language_probabilities)
DEFAULT_KV_BYTES = 2 << 30  # KV memory the per-language copies of the prompt cache may take at once


def model_languages(config) -> tuple[str, ...]:
    """The languages a model's probabilities are spread over: its ``support_languages``, else the built-in 30."""
    return supported_languages(config.support_languages) if config.support_languages else LANGUAGES


def header_tokens(tok, languages: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The header ids every language shares after the prompt (``language``), and each language's ids after them
    (its name's tokens, then ``<asr_text>``), as a forced-language prompt spells them."""
    plain = build_prompt_ids(tok, 0)
    rests = []
    for name in languages:
        forced = build_prompt_ids(tok, 0, language=name, supported=languages)
        if forced[: len(plain)] != plain:
            raise ValueError(f"the prompt forcing {name!r} does not extend the plain prompt; this tokenizer merges "
                             "the header into the prompt, so language probabilities cannot be read")
        rests.append(forced[len(plain):])
    common = os.path.commonprefix(rests)
    rests = [r[len(common):] for r in rests]
    if len({tuple(r) for r in rests}) < len(rests):
        raise ValueError(f"two of the languages {list(languages)} spell the same header; pass distinct names")
    return list(common), rests


def header_logprobs(logits: jax.Array, state: Any, step_fn: Callable, repeat_rows: Callable,
                    rests: Sequence[Sequence[int]], group: int | None = None) -> tuple[np.ndarray, int]:
    """Log-probability of each language's header ids ``rests`` (C lists) for every decoder row -> ((rows, C), steps).

    ``logits`` (rows, V) follow the shared header; ``state`` is the decoder state after it, ``repeat_rows(state,
    k)`` copies each of its rows k times in place, and ``step_fn(tokens, active, state) -> (logits, state)`` is one
    decoder step (``qasr_jax.decoding.search``'s contract). Languages are scored ``group`` at a time (default: all).
    """
    rows, n_lang = logits.shape[0], len(rests)
    group = n_lang if group is None else max(1, min(group, n_lang))
    first = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    out = np.asarray(first[:, np.array([r[0] for r in rests])], np.float64)  # (rows, C)
    steps = 0
    for lo in range(0, n_lang, group):
        chunk = rests[lo : lo + group]
        depth = max(map(len, chunk))
        ids = np.zeros((group, depth), np.int32)  # every chunk has `group` rows: one shape, one compiled step
        lengths = np.zeros((group,), np.int64)  # the padding rows after the last language never take part
        for c, r in enumerate(chunk):
            ids[c, : len(r)], lengths[c] = r, len(r)
        copies = repeat_rows(state, group) if depth > 1 else None
        for j in range(depth - 1):
            active = j + 1 < lengths
            step_logits, copies = step_fn(jnp.asarray(np.tile(ids[:, j], rows)), jnp.asarray(np.tile(active, rows)),
                                          copies)
            steps += 1
            lp = jnp.take_along_axis(jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1),
                                     jnp.asarray(np.tile(ids[:, j + 1], rows))[:, None], axis=1)
            lp = np.asarray(lp, np.float64).reshape(rows, group)
            out[:, lo : lo + len(chunk)] += np.where(active, lp, 0.0)[:, : len(chunk)]
    return out, steps


def normalise(logprobs: np.ndarray, languages: Sequence[str]) -> list[dict[str, float]]:
    """Per row, each language's probability (summing to 1), most probable first."""
    p = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return [dict(sorted(zip(languages, map(float, row)), key=lambda kv: -kv[1])) for row in p]


def _repeat_cache(cache: KVCache, k: int) -> KVCache:
    # Row r of the prefilled cache becomes rows r * k .. r * k + k - 1: one copy per language.
    return jax.tree_util.tree_map(lambda axis, x: jnp.repeat(x, k, axis=axis), cache.row_axes(), cache)


def language_distributions(model, tok, waves: Sequence[np.ndarray], contexts: Sequence[str] | None = None,
                           batch_size: int = 8, max_seconds: float = MAX_SECONDS,
                           kv_bytes: int = DEFAULT_KV_BYTES) -> tuple[list[dict[str, float]], int]:
    """Each 16 kHz wave's language distribution (its first ``max_seconds``; ``contexts`` as in transcription),
    batched ``batch_size`` at a time -> (distributions, decoder steps taken)."""
    languages = model_languages(model.config)
    common, rests = header_tokens(tok, languages)
    contexts = list(contexts) if contexts is not None else [""] * len(waves)
    if not waves:
        return [], 0
    engine, audio_cfg, text = model.engine, model.config.audio, model.config.text
    depth = max(map(len, rests))  # cache room for the header's steps
    out: list[dict[str, float]] = []
    steps = 0
    for lo in range(0, len(waves), batch_size):
        take = [np.asarray(w, np.float32)[: int(max_seconds * SAMPLE_RATE)] for w in waves[lo : lo + batch_size]]
        ctx = contexts[lo : lo + batch_size]
        rows = batch_rows(len(take), batch_size, model.data_size)
        take_padded = take + [take[-1]] * (rows - len(take))
        frames = frame_bucket(max(n_frames(w.shape[0]) for w in take_padded), audio_cfg)
        feats, valid = log_mel_batch(take_padded, pad_to=frames)
        audio, n_tok = engine.encode(feats, valid)
        prompts = [build_prompt_ids(tok, int(n), ctx[min(r, len(ctx) - 1)]) + common
                   for r, n in enumerate(np.asarray(n_tok))]
        width = prompt_width(max(map(len, prompts)))
        ids = np.zeros((rows, width), np.int32)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = p
        cache = engine.init_cache(rows, width + depth)
        logits, cache = engine.extend(cache, engine.embed(engine.put(ids), audio),
                                      np.array([len(p) for p in prompts], np.int32))
        per_row = 2 * text.layers * text.kv_heads * text.head_dim * (width + depth) * engine.dtype.itemsize
        group = max(1, kv_bytes // (per_row * rows))
        scores, n = header_logprobs(logits, cache, lambda t, a, c: engine.step(c, t, a), _repeat_cache, rests, group)
        steps += n
        out += normalise(scores[: len(take)], languages)
    return out, steps


def top(distribution: dict[str, float], k: int = TOP) -> dict[str, float]:
    """The ``k`` most probable languages of a distribution (most probable first), rounded to 6 digits."""
    return {name: round(p, 6) for name, p in list(distribution.items())[:k]}


def attach(result, distribution: dict[str, float] | None) -> None:
    """Fill a Result's ``language_probability`` (of its language) and ``language_probabilities`` (top 5)."""
    if distribution is None:
        return
    result.language_probabilities = top(distribution)
    if result.language is not None:
        result.language_probability = round(distribution.get(result.language, 0.0), 6)


def load_waves(audio) -> tuple[list[np.ndarray], bool]:
    """One input or a list of them (paths, ``(samples, rate)`` tuples, 16 kHz arrays) -> (16 kHz waves, was one)."""
    one = isinstance(audio, (str, os.PathLike, tuple, np.ndarray))
    items = [audio] if one else list(audio)
    if not items:
        raise ValueError("no audio given; pass a file path, an array or a list of them")
    return [load_audio(x) for x in items], one
