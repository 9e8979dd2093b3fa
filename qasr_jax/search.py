"""Greedy and beam search over the fixed-size KV cache, as one jitted program: prefill + ``lax.while_loop``.

The search core (:func:`search`) is model-agnostic: it takes the logits after the prompt, a decoder state whose
leaves carry the batch on a known axis, and a ``step_fn(tokens, state) -> (logits, state)``, so it runs on the
Qwen3 decoder (:func:`generate`) and on scripted step functions in tests alike.

Semantics follow transformers' ``generate(do_sample=False)`` so that token ids are identical:

* greedy: argmax of the processed logits; a row stops at its first EOS (EOS not returned).
* beam search (HF ``_beam_search``): the top ``max(2, 1 + len(eos_ids)) * beam_size`` candidates of all beams; a
  candidate ending in EOS (or reaching ``max_new_tokens``) is a finished hypothesis only when it ranks among the
  first ``beam_size`` candidates; finished scores are ``sum of log-probs (EOS included) / n ** length_penalty`` with
  ``n`` the generated tokens including EOS (the prompt does not count); the best ``beam_size`` finished hypotheses
  are kept. ``early_stopping``: False (HF default) stops a row when the best live beam divided by its current
  length can no longer beat the worst kept hypothesis; True also stops as soon as ``beam_size`` are kept; "never"
  with ``length_penalty > 0`` divides by ``max_new_tokens`` instead.
* logits processors (repetition penalty, no-repeat n-grams, EOS suppression) act where HF's do: on the logits in
  greedy search, on the log-probs in beam search.

The repetition guard's history is the prompt ids when ``prompt_ids`` is given (HF semantics: the prompt's
``<|audio_pad|>``, chat-template and newline tokens count too) plus the generated tokens; without ``prompt_ids``
only the generated tokens count (HF's ``prompt_ignore_length``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from qasr_jax.model import KVCache, Qwen3ASRModule

EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
PAD_ID = 151643  # <|endoftext|>: fills token positions at and past each row's length
NEG = -1.0e9  # HF's "impossible" score, added (not assigned) so that orderings match transformers'
KV_CACHE_AXES = KVCache(k=1, v=1, valid=0, end=None)  # batch axis of each KVCache leaf; None: shared by all rows

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]  # (tokens (rows,), state) -> (logits (rows, V), state)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Static search settings (each distinct value compiles once); the numeric ones live in SearchSettings."""

    beam_size: int = 1
    penalize_repetition: bool = False  # apply SearchSettings.repetition_penalty (off: no history is kept)
    no_repeat_ngram_size: int = 0
    pad_id: int = PAD_ID

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 turns it off), got {self.no_repeat_ngram_size}")


EARLY_STOPPING = {False: 0, True: 1, "never": 2}  # HF's early_stopping values -> SearchSettings.early_stopping


@flax.struct.dataclass
class SearchSettings:
    """Traced search settings: changing any of them compiles nothing."""

    max_new_tokens: jax.Array  # () int32, at most the static output buffer
    eos_ids: jax.Array  # (n_eos,) int32; only n_eos is static
    length_penalty: jax.Array  # () float32: beam scores are sum_logprobs / generated_len ** length_penalty
    repetition_penalty: jax.Array  # () float32, used when SearchConfig.penalize_repetition
    early_stopping: jax.Array  # () int32: EARLY_STOPPING[False | True | "never"] (beam search only)
    suppress_eos: jax.Array  # () bool: EOS scores -inf, so every row runs to max_new_tokens

    @classmethod
    def make(cls, max_new_tokens, eos_ids=EOS_IDS, length_penalty=1.0, repetition_penalty=1.0,
             early_stopping: bool | str = False, suppress_eos=False) -> "SearchSettings":
        """Settings from Python values (HF names and meanings)."""
        if early_stopping not in EARLY_STOPPING:
            raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
        return cls(
            max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32), eos_ids=jnp.asarray(eos_ids, jnp.int32).reshape(-1),
            length_penalty=jnp.asarray(length_penalty, jnp.float32),
            repetition_penalty=jnp.asarray(repetition_penalty, jnp.float32),
            early_stopping=jnp.asarray(EARLY_STOPPING[early_stopping], jnp.int32),
            suppress_eos=jnp.asarray(suppress_eos, bool),
        )


class SearchResult(NamedTuple):
    """Per batch row: the best hypothesis (EOS excluded) and its score."""

    tokens: jax.Array  # (batch, out_len) int32; positions at and past `lengths` hold pad_id
    lengths: jax.Array  # (batch,) int32 generated tokens, EOS excluded
    scores: jax.Array  # (batch,) float32 sum of log-probs (EOS included) / (lengths + finished) ** length_penalty
    finished: jax.Array  # (batch,) bool: ended with an EOS (False: stopped at max_new_tokens)
    steps: jax.Array  # () int32: tokens the loop advanced every row (< max_new_tokens when it stopped early)


# ----------------------------------------------------------------------------------------------------------------
# Rows of a decoder state: each leaf holds the batch on its own axis (KV_CACHE_AXES for the KV cache).
# ----------------------------------------------------------------------------------------------------------------


def _map_rows(fn: Callable[[jax.Array, int], jax.Array], state, batch_axes):
    return jax.tree_util.tree_map(
        lambda axis, x: x if axis is None else fn(x, axis), batch_axes, state, is_leaf=lambda a: a is None
    )


def add_beam_dim(state, batch_axes, beam_size: int):
    """Repeat every row ``beam_size`` times: row b becomes rows b * beam_size .. b * beam_size + beam_size - 1."""
    return _map_rows(lambda x, axis: jnp.repeat(x, beam_size, axis=axis), state, batch_axes)


def gather_rows(state, batch_axes, rows: jax.Array):
    """Take rows (new_rows,) of every leaf along its batch axis (beam reordering)."""
    return _map_rows(lambda x, axis: jnp.take(x, rows, axis=axis), state, batch_axes)


# ----------------------------------------------------------------------------------------------------------------
# Repetition guard: HF's RepetitionPenaltyLogitsProcessor and NoRepeatNGramLogitsProcessor on a fixed buffer.
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Guard:
    """Per-row token history for the repetition guard; fields are None when their processor is off."""

    seen: jax.Array | None  # (rows, vocab) bool: ids in the history (repetition penalty)
    history: jax.Array | None  # (rows, prompt + out_len) int32: ids in order (no-repeat n-grams)
    length: jax.Array | None  # (rows,) int32: real ids in `history`


def _init_guard(cfg: SearchConfig, prompt_ids, prompt_len, rows: int, vocab: int, out_len: int) -> Guard:
    if prompt_ids is None:
        prompt_ids = jnp.zeros((rows, 0), jnp.int32)
        prompt_len = jnp.zeros((rows,), jnp.int32)
    real = jnp.arange(prompt_ids.shape[1])[None, :] < prompt_len[:, None]  # (rows, prompt)
    seen = history = length = None
    if cfg.penalize_repetition:
        seen = jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], prompt_ids].max(real)
    if cfg.no_repeat_ngram_size:
        prompt = jnp.where(real, prompt_ids, cfg.pad_id).astype(jnp.int32)
        history = jnp.concatenate([prompt, jnp.full((rows, out_len), cfg.pad_id, jnp.int32)], axis=1)
        length = prompt_len.astype(jnp.int32)
    return Guard(seen, history, length)


def _guard_append(guard: Guard, tokens: jax.Array) -> Guard:
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


def _process(scores: jax.Array, guard: Guard, cfg: SearchConfig, z: SearchSettings) -> jax.Array:
    """HF's logits processors on scores (rows, vocab): repetition penalty, banned n-grams, suppressed EOS."""
    if guard.seen is not None:
        p = z.repetition_penalty
        scores = jnp.where(guard.seen, jnp.where(scores < 0, scores * p, scores / p), scores)
    if guard.history is not None:
        banned = _banned_ngrams(guard.history, guard.length, cfg.no_repeat_ngram_size, scores.shape[-1])
        scores = jnp.where(banned, -jnp.inf, scores)
    is_eos = jnp.zeros(scores.shape[-1], bool).at[z.eos_ids].set(True)  # (vocab,)
    return jnp.where(is_eos & z.suppress_eos, -jnp.inf, scores)


# ----------------------------------------------------------------------------------------------------------------
# Greedy search
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class GreedyState:
    t: jax.Array  # () int32: tokens chosen so far
    tokens: jax.Array  # (batch, out_len) int32
    lengths: jax.Array  # (batch,) int32, EOS excluded
    finished: jax.Array  # (batch,) bool
    logprob: jax.Array  # (batch,) float32: sum of log-probs of the chosen tokens, EOS included
    last: jax.Array  # (batch,) int32: the token fed to the next step
    guard: Guard


def _greedy_pick(s: GreedyState, logits, cfg: SearchConfig, z: SearchSettings) -> GreedyState:
    active = (s.t < z.max_new_tokens) & ~s.finished  # (batch,)
    scores = _process(logits, s.guard, cfg, z)  # HF processes the logits in greedy search
    token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), token[:, None], axis=1)[:, 0]
    is_eos = jnp.isin(token, z.eos_ids)
    keep = active & ~is_eos
    fed = jnp.where(keep, token, cfg.pad_id)
    return GreedyState(
        t=s.t + 1,
        tokens=s.tokens.at[:, s.t].set(fed, mode="drop"),
        lengths=s.lengths + keep,
        finished=s.finished | (active & is_eos),
        logprob=s.logprob + jnp.where(active, logp, 0.0),
        last=fed,
        guard=_guard_append(s.guard, fed),
    )


def _greedy(step_fn: StepFn, logits, state, guard: Guard, z: SearchSettings, out_len: int,
            cfg: SearchConfig) -> SearchResult:
    batch = logits.shape[0]
    s = GreedyState(
        t=jnp.zeros((), jnp.int32), tokens=jnp.full((batch, out_len), cfg.pad_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32), finished=jnp.zeros((batch,), bool),
        logprob=jnp.zeros((batch,), jnp.float32), last=jnp.zeros((batch,), jnp.int32), guard=guard,
    )
    s = _greedy_pick(s, logits, cfg, z)  # the first token comes from the prefill logits: n tokens take n - 1 steps

    def cond(carry):
        s, _ = carry
        return (s.t < z.max_new_tokens) & ~jnp.all(s.finished)

    def body(carry):
        s, state = carry
        logits, state = step_fn(s.last, state)
        return _greedy_pick(s, logits, cfg, z), state

    s, _ = jax.lax.while_loop(cond, body, (s, state))
    n = jnp.maximum(s.lengths + s.finished, 1).astype(jnp.float32)
    steps = jnp.minimum(s.t, z.max_new_tokens)
    return SearchResult(s.tokens, s.lengths, s.logprob / n**z.length_penalty, s.finished, steps)


# ----------------------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
    t: jax.Array  # () int32: tokens in every live beam
    alive_tokens: jax.Array  # (batch, beams, out_len) int32
    alive_scores: jax.Array  # (batch, beams) float32 summed log-probs, best first
    done_tokens: jax.Array  # (batch, beams, out_len) int32: kept finished hypotheses
    done_scores: jax.Array  # (batch, beams) float32 length-penalised, best first; about NEG when empty
    done_lengths: jax.Array  # (batch, beams) int32, EOS excluded
    done_eos: jax.Array  # (batch, beams) bool: the hypothesis ended with an EOS
    done_mask: jax.Array  # (batch, beams) bool: the slot holds a finished hypothesis
    improvable: jax.Array  # (batch,) bool: a live beam may still beat the kept hypotheses
    parents: jax.Array  # (batch * beams,) int32: flat row each live beam continues (reorders the state)
    last: jax.Array  # (batch * beams,) int32: each live beam's newest token
    guard: Guard


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (batch, n, ...) at idx (batch, m) along axis 1 -> (batch, m, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_pick(s: BeamState, logits, cfg: SearchConfig, z: SearchSettings) -> BeamState:
    batch, beams, _ = s.alive_tokens.shape
    vocab = logits.shape[-1]
    n_cand = max(2, 1 + z.eos_ids.shape[0]) * beams  # enough that `beams` candidates survive all-EOS steps
    logp = _process(jax.nn.log_softmax(logits, axis=-1), s.guard, cfg, z)  # HF processes log-probs in beam search
    logp = logp.reshape(batch, beams, vocab) + s.alive_scores[..., None]
    cand_scores, flat = jax.lax.top_k(logp.reshape(batch, beams * vocab), n_cand)  # (batch, n_cand), best first
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_tokens = _gather(s.alive_tokens, parent).at[:, :, s.t].set(token)  # (batch, n_cand, out_len)
    is_eos = jnp.isin(token, z.eos_ids)
    ends = is_eos | (s.t + 1 >= z.max_new_tokens)  # (batch, n_cand)

    # Live beams for the next step: the best candidates that did not end.
    alive_scores, keep = jax.lax.top_k(cand_scores + ends * NEG, beams)
    alive_tokens = _gather(cand_tokens, keep)
    parents = (jnp.arange(batch)[:, None] * beams + _gather(parent, keep)).reshape(-1).astype(jnp.int32)
    last = _gather(token, keep).reshape(-1)

    # Finished hypotheses: only candidates among the first `beams` count, each penalised by its generated length.
    full_stop = z.early_stopping == EARLY_STOPPING[True]
    just = ends & (jnp.arange(n_cand) < beams)[None, :] & (s.t < z.max_new_tokens)  # max_new_tokens 0: none
    fin = cand_scores / (s.t + 1).astype(jnp.float32) ** z.length_penalty
    fin += (jnp.all(s.done_mask, axis=1, keepdims=True) & full_stop) * NEG
    fin += ~s.improvable[:, None] * NEG
    fin += ~just * NEG
    done_scores, best = jax.lax.top_k(jnp.concatenate([s.done_scores, fin], axis=1), beams)
    cand_lengths = jnp.broadcast_to(s.t + ~is_eos, is_eos.shape)  # EOS is not returned

    def merge(done, cand):
        return _gather(jnp.concatenate([done, cand], axis=1), best)

    # Can a live beam still beat the worst kept hypothesis? (HF's heuristic; sticky once False.)
    never = (z.early_stopping == EARLY_STOPPING["never"]) & (z.length_penalty > 0)
    hypothetical = jnp.where(never, z.max_new_tokens, s.t + 1).astype(jnp.float32)
    best_alive = alive_scores[:, :1] / hypothetical**z.length_penalty
    done_mask = merge(s.done_mask, just)
    worst_done = jnp.where(done_mask, jnp.min(done_scores, axis=1, keepdims=True), NEG)
    improvable = s.improvable & jnp.any(best_alive > worst_done, axis=1)

    return BeamState(
        t=s.t + 1, alive_tokens=alive_tokens, alive_scores=alive_scores,
        done_tokens=merge(s.done_tokens, cand_tokens), done_scores=done_scores,
        done_lengths=merge(s.done_lengths, cand_lengths), done_eos=merge(s.done_eos, is_eos), done_mask=done_mask,
        improvable=improvable, parents=parents, last=last,
        guard=_guard_append(jax.tree_util.tree_map(lambda x: x[parents], s.guard), last),
    )


def _beam_search(step_fn: StepFn, logits, state, batch_axes, guard: Guard, z: SearchSettings, out_len: int,
                 cfg: SearchConfig) -> SearchResult:
    batch, beams = logits.shape[0], cfg.beam_size
    rows = batch * beams
    state = add_beam_dim(state, batch_axes, beams)
    guard = jax.tree_util.tree_map(lambda x: jnp.repeat(x, beams, axis=0), guard)
    empty = jnp.full((batch, beams, out_len), cfg.pad_id, jnp.int32)
    zeros = jnp.zeros((batch, beams), jnp.int32)
    s = BeamState(
        t=jnp.zeros((), jnp.int32), alive_tokens=empty,
        # Only beam 0 may start: the beams are identical copies after the prompt.
        alive_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(NEG),
        done_tokens=empty, done_scores=jnp.full((batch, beams), NEG, jnp.float32), done_lengths=zeros,
        done_eos=zeros.astype(bool), done_mask=zeros.astype(bool), improvable=jnp.ones((batch,), bool),
        parents=jnp.arange(rows, dtype=jnp.int32), last=jnp.zeros((rows,), jnp.int32), guard=guard,
    )
    s = _beam_pick(s, jnp.repeat(logits, beams, axis=0), cfg, z)

    def cond(carry):
        s, _ = carry
        full = jnp.all(s.done_mask, axis=1) & (z.early_stopping == EARLY_STOPPING[True])
        return (s.t < z.max_new_tokens) & jnp.any(s.improvable & ~full)

    def body(carry):
        s, state = carry
        logits, state = step_fn(s.last, gather_rows(state, batch_axes, s.parents))
        return _beam_pick(s, logits, cfg, z), state

    s, _ = jax.lax.while_loop(cond, body, (s, state))
    lengths = s.done_lengths[:, 0]
    tokens = jnp.where(jnp.arange(out_len)[None, :] < lengths[:, None], s.done_tokens[:, 0], cfg.pad_id)
    return SearchResult(tokens, lengths, s.done_scores[:, 0], s.done_eos[:, 0], jnp.minimum(s.t, z.max_new_tokens))


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------


def search(step_fn: StepFn, logits: jax.Array, state, batch_axes, settings: SearchSettings, *, out_len: int,
           cfg: SearchConfig = SearchConfig(), prompt_ids: jax.Array | None = None,
           prompt_len: jax.Array | None = None) -> SearchResult:
    """Decode from the prompt's next-token logits (batch, V) and decoder state with `step_fn`; traceable, jit it.

    ``batch_axes`` is a prefix tree of ``state`` giving each leaf's batch axis (None: shared by all rows).
    ``settings.max_new_tokens`` is cut to the static ``out_len`` (``step_fn`` must have room for that many
    steps). ``prompt_ids`` (batch, seq) with ``prompt_len`` (batch,) real ids per row (right-padded) join the
    repetition guard's history.
    """
    batch, vocab = logits.shape
    settings = settings.replace(max_new_tokens=jnp.minimum(settings.max_new_tokens, out_len))
    if prompt_ids is not None and prompt_len is None:
        prompt_len = jnp.full((batch,), prompt_ids.shape[1], jnp.int32)
    guard = _init_guard(cfg, prompt_ids, prompt_len, batch, vocab, out_len)
    if cfg.beam_size == 1:
        return _greedy(step_fn, logits, state, guard, settings, out_len, cfg)
    return _beam_search(step_fn, logits, state, batch_axes, guard, settings, out_len, cfg)


@functools.partial(jax.jit, static_argnames=("module", "cache_len", "cfg"))
def generate_jit(module: Qwen3ASRModule, params, embeds, token_mask, settings: SearchSettings, prompt_ids=None, *,
                 cache_len: int, cfg: SearchConfig) -> SearchResult:
    """Prefill + search in one compiled program; shapes, ``cache_len`` and ``cfg`` are static, ``settings`` traced."""
    batch, seq = token_mask.shape
    cache = KVCache.init(module.cfg.text, batch, cache_len, module.dtype)
    logits, cache = module.apply({"params": params}, embeds, token_mask, cache, method=Qwen3ASRModule.prefill)

    def step_fn(tokens, cache):
        return module.apply({"params": params}, tokens, cache, method=Qwen3ASRModule.step)

    return search(
        step_fn, logits, cache, KV_CACHE_AXES, settings, out_len=cache_len - seq, cfg=cfg, prompt_ids=prompt_ids,
        prompt_len=token_mask.sum(1).astype(jnp.int32),
    )


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def generate(model, embeds, token_mask, *, max_new_tokens: int, beam_size: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, eos_ids=EOS_IDS, repetition_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, prompt_ids=None, suppress_eos: bool = False,
             max_len: int | None = None, pad_id: int = PAD_ID) -> SearchResult:
    """Greedy (beam_size=1) or beam search from right-padded prompt embeds (batch, seq, hidden) + token_mask.

    ``model`` is a ``qasr_jax.Model`` or a ``(module, params)`` pair. ``max_len`` is the KV cache's slot count
    (prompt width + output buffer, static); by default the buffer is ``max_new_tokens`` rounded up to 64, so other
    ``max_new_tokens`` and prompt lengths inside the same padded width reuse the compiled program. Pass
    ``prompt_ids`` (batch, seq) to count the prompt in the repetition guard, as transformers does.
    """
    module, params = (model.module, model.params) if hasattr(model, "module") else model
    batch, seq = token_mask.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_len is None:
        max_len = seq + _round_up(max_new_tokens, 64)
    if seq + max_new_tokens > max_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not fit: the prompt takes {seq} of the KV cache's "
            f"max_len={max_len} slots, leaving {max_len - seq} for new tokens; pass max_len >= "
            f"{seq + max_new_tokens} or ask for fewer tokens"
        )
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 turns it off), got {repetition_penalty}")
    settings = SearchSettings.make(max_new_tokens, eos_ids, length_penalty, repetition_penalty, early_stopping,
                                   suppress_eos)
    if settings.eos_ids.shape[0] == 0:
        raise ValueError("eos_ids is empty: pass at least one EOS id (suppress_eos=True runs to max_new_tokens)")
    cfg = SearchConfig(beam_size, repetition_penalty != 1.0, no_repeat_ngram_size, pad_id)
    if prompt_ids is not None:
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        if prompt_ids.shape != (batch, seq):
            raise ValueError(f"prompt_ids must match token_mask's shape {(batch, seq)}, got {prompt_ids.shape}")
    return generate_jit(module, params, jnp.asarray(embeds), jnp.asarray(token_mask, bool), settings, prompt_ids,
                        cache_len=max_len, cfg=cfg)
