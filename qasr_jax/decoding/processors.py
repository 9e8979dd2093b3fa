"""Logits processors of the search: HF's repetition penalty and no-repeat n-grams on a fixed-size history, and EOS
suppression, acting where transformers' do (on the logits in greedy search, on the log-probs in beam search).

The repetition guard's history is the prompt ids when given (HF semantics: the prompt's ``<|audio_pad|>``,
chat-template and newline tokens count too) plus the generated tokens; without prompt ids only the generated ones.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# The loop guard's defaults: a pattern of up to 20 tokens repeated 20 times back to back (the official text repair,
# ``detect_and_fix_repetitions``, undoes a pattern of up to 20 characters repeated 20 times).
LOOP_PERIOD = 20
LOOP_REPEATS = 20


@flax.struct.dataclass
class Guard:
    """Per decoder row token history for the repetition guard; fields are None when their processor is off."""

    seen: jax.Array | None  # (rows, vocab) bool: ids in the history (repetition penalty)
    history: jax.Array | None  # (rows, history_len) int32: ids in order (no-repeat n-grams)
    length: jax.Array | None  # (rows,) int32: real ids in `history`


def init_guard(rows: int, vocab: int, history_len: int, cfg) -> Guard:
    """An empty guard for a ``search.SearchConfig``: ``seen`` when the repetition penalty is on, a history of
    ``history_len`` ids for no-repeat n-grams."""
    seen = jnp.zeros((rows, vocab), bool) if cfg.penalize_repetition else None
    history = length = None
    if cfg.no_repeat_ngram_size:
        history = jnp.full((rows, history_len), cfg.pad_id, jnp.int32)
        length = jnp.zeros((rows,), jnp.int32)
    return Guard(seen, history, length)


def guard_from_prompt(guard: Guard, prompt_ids, prompt_len, cfg) -> Guard:
    """A fresh guard for ``prompt_ids`` (rows, P) with ``prompt_len`` (rows,) real ids (P = 0: no history)."""
    rows, width = prompt_ids.shape
    real = jnp.arange(width)[None, :] < prompt_len[:, None]
    seen = history = length = None
    if guard.seen is not None:
        seen = jnp.zeros((rows, guard.seen.shape[1]), bool).at[jnp.arange(rows)[:, None], prompt_ids].max(real)
    if guard.history is not None:
        history = jnp.full((rows, guard.history.shape[1]), cfg.pad_id, jnp.int32)
        history = history.at[:, :width].set(jnp.where(real, prompt_ids, cfg.pad_id))
        length = prompt_len.astype(jnp.int32)
    return Guard(seen, history, length)


def guard_append(guard: Guard, tokens: jax.Array) -> Guard:
    """The guard with each row's new token (rows,) added to its history."""
    rows = jnp.arange(tokens.shape[0])
    seen, history, length = guard.seen, guard.history, guard.length
    if seen is not None:
        seen = seen.at[rows, tokens].set(True)
    if history is not None:
        history = history.at[rows, length].set(tokens, mode="drop")
        length = length + 1
    return Guard(seen, history, length)


def _banned_ngrams(history: jax.Array, length: jax.Array, n: int, vocab: int) -> jax.Array:
    """(rows, vocab) bool: tokens that would complete an n-gram already in the history (HF's rule)."""
    rows, width = history.shape
    starts = width - n + 1
    grams = jnp.stack([history[:, j : j + starts] for j in range(n)], axis=-1)  # (rows, starts, n)
    key_at = jnp.clip(length[:, None] - (n - 1) + jnp.arange(n - 1), 0, width - 1)
    key = jnp.take_along_axis(history, key_at, axis=1)  # (rows, n - 1): the last n - 1 ids
    match = jnp.all(grams[..., : n - 1] == key[:, None, :], axis=-1)  # (rows, starts)
    match &= jnp.arange(starts)[None, :] <= (length - n)[:, None]  # the whole n-gram lies in the history
    match &= (length + 1 >= n)[:, None]
    return jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], grams[..., n - 1]].max(match)


def process(scores: jax.Array, guard: Guard, cfg, z) -> jax.Array:
    """HF's logits processors on scores (rows, vocab) for a ``search.SearchConfig`` and ``SearchSettings``:
    repetition penalty, banned n-grams, suppressed EOS."""
    if guard.seen is not None:
        p = z.repetition_penalty
        scores = jnp.where(guard.seen, jnp.where(scores < 0, scores * p, scores / p), scores)
    if guard.history is not None:
        banned = _banned_ngrams(guard.history, guard.length, cfg.no_repeat_ngram_size, scores.shape[-1])
        scores = jnp.where(banned, -jnp.inf, scores)
    is_eos = jnp.zeros(scores.shape[-1], bool).at[z.eos_ids].set(True)  # (vocab,)
    return jnp.where(is_eos & z.suppress_eos, -jnp.inf, scores)




def ends_in_loop(tokens: jax.Array, lengths: jax.Array, max_period: int, repeats: int) -> jax.Array:
    """(rows,) bool: rows whose last ``k * repeats`` tokens are one k-token pattern ``repeats`` times back to back,
    for some period k <= ``max_period`` (a decoding loop: "I think I think I think ..."); ``tokens`` (rows, out_len)
    hold ``lengths`` (rows,) real tokens each."""
    window = max_period * repeats
    at = lengths[:, None] - window + jnp.arange(window)[None, :]  # (rows, window): the last `window` positions
    last = jnp.take_along_axis(tokens, jnp.clip(at, 0, tokens.shape[1] - 1), axis=1)
    looped = jnp.zeros(lengths.shape, bool)
    for k in range(1, max_period + 1):
        span = k * repeats  # the pattern's copies; each token equals the one k before it
        same = jnp.all(last[:, window - span + k :] == last[:, window - span : window - k], axis=1)
        looped |= same & (lengths >= span)
    return looped
