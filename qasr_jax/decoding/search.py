"""Greedy and beam search, per request, over any decoder: a step function and a state pytree.

Nothing here knows the model. A decoder is ``step_fn(tokens (rows,), active (rows,), state) -> (logits (rows, V),
state)`` plus ``batch_axes``, a prefix tree of ``state`` giving each leaf's row axis (None: shared), which beam
search uses to reorder rows. Requests live in *rows*: one decoder row each for greedy search, ``beam_size``
consecutive decoder rows for beam search. Every request has its own step count, so a request can join (``start``
then ``pick`` on its prompt's logits) or leave while the others go on; that is what the engine's slots are made of.
:func:`search` runs a whole batch to the end in one ``lax.while_loop`` (flax's wmt ``decode.py`` is the model).

Semantics follow transformers' ``generate(do_sample=False)`` so that token ids are identical:

* greedy: argmax of the processed logits; a request stops at its first EOS (EOS not returned).
* beam search (HF ``_beam_search``): the top ``max(2, 1 + len(eos_ids)) * beam_size`` candidates of all beams; a
  candidate ending in EOS (or reaching ``max_new_tokens``) is a finished hypothesis only when it ranks among the
  first ``beam_size`` candidates; finished scores are ``sum of log-probs (EOS included) / n ** length_penalty`` with
  ``n`` the generated tokens including EOS; the best ``beam_size`` finished hypotheses are kept.
  ``early_stopping``: False (HF default) stops a request when the best live beam divided by its current length can
  no longer beat the worst kept hypothesis; True also stops as soon as ``beam_size`` are kept; "never" with
  ``length_penalty > 0`` divides by ``max_new_tokens`` instead.
* logits processors (repetition penalty, no-repeat n-grams, EOS suppression) act where HF's do: on the logits in
  greedy search, on the log-probs in beam search.

Each generated token also gets its log-probability (after the processors, before any length penalty); hotwords
(``qasr_jax.decoding.hotwords``) bias the ranking only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from qasr_jax.decoding import hotwords as hw
from qasr_jax.decoding import processors as P
from qasr_jax.decoding.settings import EARLY_STOPPING, SearchConfig, SearchResult, SearchSettings

NEG = -1.0e9  # HF's "impossible" score, added (not assigned) so that orderings match transformers'

# (tokens (rows,), active (rows,) bool, state) -> (logits (rows, V), state)
StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


# Rows of a decoder state: each leaf holds the rows on its own axis (batch_axes) ---


def _map_rows(fn: Callable[[jax.Array, int], jax.Array], state, batch_axes):
    return jax.tree_util.tree_map(
        lambda axis, x: x if axis is None else fn(x, axis), batch_axes, state, is_leaf=lambda a: a is None
    )


def add_beam_dim(state, batch_axes, beam_size: int):
    """Repeat every row ``beam_size`` times: row b becomes rows b * beam_size .. b * beam_size + beam_size - 1."""
    return _map_rows(lambda x, axis: jnp.repeat(x, beam_size, axis=axis), state, batch_axes)


def gather_rows(state, batch_axes, rows: jax.Array):
    """Take rows (new_rows,) of every leaf along its row axis (beam reordering)."""
    return _map_rows(lambda x, axis: jnp.take(x, rows, axis=axis), state, batch_axes)


def _set_rows(big, idx: jax.Array, new):
    """``big`` with rows ``idx`` (leading axis) replaced by ``new``'s rows (every leaf of two equal trees)."""
    return jax.tree_util.tree_map(lambda b, n: b.at[idx].set(n), big, new)


def _pick_rows(update: jax.Array, new, old):
    """Per leading row: ``new`` where ``update``, else ``old`` (every leaf of two equal trees)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(update.reshape(update.shape + (1,) * (n.ndim - 1)), n, o),
                                  new, old)


# Greedy search: one decoder row per request ------------------


@flax.struct.dataclass
class GreedyRows:
    t: jax.Array  # (rows,) int32: tokens chosen so far
    max_new: jax.Array  # (rows,) int32
    tokens: jax.Array  # (rows, out_len) int32
    logprobs: jax.Array  # (rows, out_len) float32: each chosen token's log-prob
    lengths: jax.Array  # (rows,) int32, EOS excluded
    finished: jax.Array  # (rows,) bool: ended with an EOS
    done: jax.Array  # (rows,) bool: no more steps (finished, at max_new, looped, or no request)
    looped: jax.Array  # (rows,) bool: stopped in a decoding loop (SearchConfig.loop_period)
    logprob: jax.Array  # (rows,) float32: sum of log-probs of the chosen tokens, EOS included
    last: jax.Array  # (rows,) int32: the token fed to the next step
    guard: P.Guard
    bias: hw.Bias | None  # hotwords (SearchConfig.hotword_edges > 0)


def _greedy_init(cfg: SearchConfig, n: int, out_len: int, vocab: int, history_len: int) -> GreedyRows:
    zeros = jnp.zeros((n,), jnp.int32)
    return GreedyRows(
        t=zeros, max_new=zeros, tokens=jnp.full((n, out_len), cfg.pad_id, jnp.int32),
        logprobs=jnp.zeros((n, out_len), jnp.float32), lengths=zeros, finished=zeros.astype(bool),
        done=jnp.ones((n,), bool), looped=zeros.astype(bool), logprob=jnp.zeros((n,), jnp.float32), last=zeros,
        guard=P.init_guard(n, vocab, history_len, cfg), bias=hw.initial(cfg.hotword_edges, n, n),
    )


def _greedy_pick(s: GreedyRows, logits, update, cfg: SearchConfig, z: SearchSettings) -> GreedyRows:
    scores = P.process(logits, s.guard, cfg, z)  # HF processes the logits in greedy search
    rank = scores if s.bias is None else scores + hw.bonus_table(s.bias, scores.shape[-1])
    token = jnp.argmax(rank, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), token[:, None], axis=1)[:, 0]
    is_eos = jnp.isin(token, z.eos_ids)
    keep = ~is_eos
    fed = jnp.where(keep, token, cfg.pad_id)
    at = jnp.arange(s.tokens.shape[1])[None, :] == s.t[:, None]  # (rows, out_len): this step's position
    tokens, lengths = jnp.where(at & keep[:, None], token[:, None], s.tokens), s.lengths + keep
    looped = P.ends_in_loop(tokens, lengths, cfg.loop_period, cfg.loop_repeats) & keep if cfg.loop_period else s.looped
    new = GreedyRows(
        t=s.t + 1, max_new=s.max_new, tokens=tokens,
        logprobs=jnp.where(at & keep[:, None], logp[:, None], s.logprobs),
        lengths=lengths, finished=is_eos, done=is_eos | (s.t + 1 >= s.max_new) | looped, looped=looped,
        logprob=s.logprob + logp, last=fed, guard=P.guard_append(s.guard, fed),
        bias=None if s.bias is None else hw.transition(s.bias, token),
    )
    return _pick_rows(update, new, s)


def _greedy_result(s: GreedyRows, z: SearchSettings) -> SearchResult:
    n = jnp.maximum(s.lengths + s.finished, 1).astype(jnp.float32)
    return SearchResult(s.tokens, s.lengths, s.logprob / n**z.length_penalty, s.finished, s.t, s.logprobs,
                        s.looped)


# Beam search: beam_size consecutive decoder rows per request ---


@flax.struct.dataclass
class BeamRows:
    t: jax.Array  # (requests,) int32: tokens in every live beam
    max_new: jax.Array  # (requests,) int32
    alive_tokens: jax.Array  # (requests, beams, out_len) int32
    alive_logprobs: jax.Array  # (requests, beams, out_len) float32
    alive_scores: jax.Array  # (requests, beams) float32 summed log-probs (no hotword bonus), best first
    done_tokens: jax.Array  # (requests, beams, out_len) int32: kept finished hypotheses
    done_logprobs: jax.Array  # (requests, beams, out_len) float32
    done_scores: jax.Array  # (requests, beams) float32 length-penalised, best first; ~NEG when empty
    done_lengths: jax.Array  # (requests, beams) int32, EOS excluded
    done_eos: jax.Array  # (requests, beams) bool: the hypothesis ended with an EOS
    done_mask: jax.Array  # (requests, beams) bool: the slot holds a finished hypothesis
    improvable: jax.Array  # (requests,) bool: a live beam may still beat the kept hypotheses
    done: jax.Array  # (requests,) bool: no more steps
    parents: jax.Array  # (requests * beams,) int32: decoder row each live beam continues (reorders the state)
    last: jax.Array  # (requests * beams,) int32: each live beam's newest token
    guard: P.Guard  # (requests * beams) rows
    bias: hw.Bias | None  # hotwords: the requests' tries, each beam's place in its trie


def _beam_init(cfg: SearchConfig, n: int, out_len: int, vocab: int, history_len: int) -> BeamRows:
    beams = cfg.beam_size
    tokens = jnp.full((n, beams, out_len), cfg.pad_id, jnp.int32)
    floats = jnp.zeros((n, beams, out_len), jnp.float32)
    zeros = jnp.zeros((n, beams), jnp.int32)
    return BeamRows(
        t=jnp.zeros((n,), jnp.int32), max_new=jnp.zeros((n,), jnp.int32), alive_tokens=tokens,
        alive_logprobs=floats, alive_scores=jnp.zeros((n, beams), jnp.float32), done_tokens=tokens,
        done_logprobs=floats, done_scores=jnp.full((n, beams), NEG, jnp.float32), done_lengths=zeros,
        done_eos=zeros.astype(bool), done_mask=zeros.astype(bool), improvable=jnp.ones((n,), bool),
        done=jnp.ones((n,), bool), parents=jnp.arange(n * beams, dtype=jnp.int32),
        last=jnp.zeros((n * beams,), jnp.int32), guard=P.init_guard(n * beams, vocab, history_len, cfg),
        bias=hw.initial(cfg.hotword_edges, n, n * beams),
    )


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (requests, n, ...) at idx (requests, m) along axis 1 -> (requests, m, ...)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_pick(s: BeamRows, logits, update, cfg: SearchConfig, z: SearchSettings) -> BeamRows:
    requests, beams, out_len = s.alive_tokens.shape
    vocab = logits.shape[-1]
    t = s.t[:, None]  # (requests, 1)
    n_cand = max(2, 1 + z.eos_ids.shape[0]) * beams  # enough that `beams` candidates survive all-EOS steps
    logp = P.process(jax.nn.log_softmax(logits, axis=-1), s.guard, cfg, z)  # HF processes log-probs in beam search
    rank = logp if s.bias is None else logp + hw.bonus_table(s.bias, vocab, beams)  # hotwords: ranking only
    logp, rank = (x.reshape(requests, beams * vocab) for x in (logp, rank))
    total = rank + jnp.repeat(s.alive_scores, vocab, axis=1)
    cand_rank, flat = jax.lax.top_k(total, n_cand)  # (requests, n_cand), best first
    cand_logp = jnp.take_along_axis(logp, flat, axis=1)  # each candidate token's own log-prob
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_scores = cand_rank if s.bias is None else _gather(s.alive_scores, parent) + cand_logp
    cand_bias, final = (None, None) if s.bias is None else hw.candidates(s.bias, parent, token, beams)
    at = (jnp.arange(out_len) == t[:, :, None])  # (requests, 1, out_len): this step's position
    cand_tokens = jnp.where(at, token[..., None], _gather(s.alive_tokens, parent))  # (requests, n_cand, out_len)
    cand_logprobs = jnp.where(at, cand_logp[..., None], _gather(s.alive_logprobs, parent))
    is_eos = jnp.isin(token, z.eos_ids)
    ends = is_eos | (t + 1 >= s.max_new[:, None])  # (requests, n_cand)

    # Live beams for the next step: the best candidates that did not end.
    alive_rank, keep = jax.lax.top_k(cand_rank + ends * NEG, beams)
    alive_scores = alive_rank if s.bias is None else _gather(cand_scores, keep)
    alive_tokens, alive_logprobs = _gather(cand_tokens, keep), _gather(cand_logprobs, keep)
    parents = (jnp.arange(requests)[:, None] * beams + _gather(parent, keep)).reshape(-1).astype(jnp.int32)
    last = _gather(token, keep).reshape(-1)
    bias = s.bias if s.bias is None else hw.keep(cand_bias, keep)

    # Finished hypotheses: only candidates among the first `beams` count, each penalised by its generated length.
    full_stop = z.early_stopping == EARLY_STOPPING[True]
    just = ends & (jnp.arange(n_cand) < beams)[None, :] & (t < s.max_new[:, None])  # max_new_tokens 0: none
    fin = (cand_scores if final is None else cand_scores + final) / (t + 1).astype(jnp.float32) ** z.length_penalty
    fin += (jnp.all(s.done_mask, axis=1, keepdims=True) & full_stop) * NEG
    fin += ~s.improvable[:, None] * NEG
    fin += ~just * NEG
    done_scores, best = jax.lax.top_k(jnp.concatenate([s.done_scores, fin], axis=1), beams)
    cand_lengths = t + ~is_eos  # (requests, n_cand); EOS is not returned

    def merge(done, cand):
        return _gather(jnp.concatenate([done, cand], axis=1), best)

    # Can a live beam still beat the worst kept hypothesis? (HF's heuristic; sticky once False.)
    never = (z.early_stopping == EARLY_STOPPING["never"]) & (z.length_penalty > 0)
    hypothetical = jnp.where(never, s.max_new[:, None], t + 1).astype(jnp.float32)
    best_alive = alive_rank[:, :1] / hypothetical**z.length_penalty
    done_mask = merge(s.done_mask, just)
    worst_done = jnp.where(done_mask, jnp.min(done_scores, axis=1, keepdims=True), NEG)
    improvable = s.improvable & jnp.any(best_alive > worst_done, axis=1)
    full = jnp.all(done_mask, axis=1) & full_stop

    new = BeamRows(
        t=s.t + 1, max_new=s.max_new, alive_tokens=alive_tokens, alive_logprobs=alive_logprobs,
        alive_scores=alive_scores, done_tokens=merge(s.done_tokens, cand_tokens),
        done_logprobs=merge(s.done_logprobs, cand_logprobs), done_scores=done_scores,
        done_lengths=merge(s.done_lengths, cand_lengths), done_eos=merge(s.done_eos, is_eos), done_mask=done_mask,
        improvable=improvable, done=(s.t + 1 >= s.max_new) | ~improvable | full,
        parents=parents, last=last, guard=P.guard_append(jax.tree_util.tree_map(lambda x: x[parents], s.guard), last),
        bias=bias,
    )
    per_request = {f.name for f in dataclasses.fields(BeamRows)} - {"parents", "last", "guard", "bias"}
    beam_update = jnp.repeat(update, beams)
    chosen = _pick_rows(update, {k: getattr(new, k) for k in per_request}, {k: getattr(s, k) for k in per_request})
    return BeamRows(
        **chosen, parents=jnp.where(beam_update, new.parents, s.parents),
        last=jnp.where(beam_update, new.last, s.last), guard=_pick_rows(beam_update, new.guard, s.guard),
        bias=bias if bias is None else bias.replace(node=jnp.where(beam_update, bias.node, s.bias.node),
                                                    earned=jnp.where(beam_update, bias.earned, s.bias.earned)),
    )


def _beam_result(s: BeamRows, cfg: SearchConfig) -> SearchResult:
    out_len = s.done_tokens.shape[2]
    lengths = s.done_lengths[:, 0]
    real = jnp.arange(out_len)[None, :] < lengths[:, None]
    tokens = jnp.where(real, s.done_tokens[:, 0], cfg.pad_id)
    return SearchResult(tokens, lengths, s.done_scores[:, 0], s.done_eos[:, 0], jnp.minimum(s.t, s.max_new),
                        jnp.where(real, s.done_logprobs[:, 0], 0.0), jnp.zeros(lengths.shape, bool))


# Requests in rows: start, pick, step, run, result ------------

Rows = GreedyRows | BeamRows


def init_rows(cfg: SearchConfig, requests: int, out_len: int, vocab: int, history_len: int = 0) -> Rows:
    """Room for ``requests`` requests (``requests * beam_size`` decoder rows), all empty (done)."""
    init = _greedy_init if cfg.beam_size == 1 else _beam_init
    return init(cfg, requests, out_len, vocab, history_len)


def start(rows: Rows, ids: jax.Array, max_new: jax.Array, cfg: SearchConfig, prompt_ids=None,
          prompt_len=None, tries: hw.Trie | None = None) -> Rows:
    """Reset requests ``ids`` (k,) for new prompts: ``max_new`` (k,) tokens each (cut to the output buffer), guard
    history ``prompt_ids`` (k, P) with ``prompt_len`` (k,) real ids, hotword ``tries`` (k requests, or None). Their
    first token: ``pick`` on the prompts' logits, updating the started requests that are not done."""
    k, beams = ids.shape[0], _beams(rows)
    out_len = rows.tokens.shape[1] if beams == 0 else rows.alive_tokens.shape[2]
    fresh = (_greedy_init if beams == 0 else _beam_init)(dataclasses.replace(cfg, hotword_edges=0), k, out_len, 1, 0)
    beams = max(beams, 1)
    max_new = jnp.minimum(max_new.astype(jnp.int32), out_len)
    fresh = fresh.replace(max_new=max_new, done=max_new == 0)
    beam_rows = isinstance(rows, BeamRows)
    if beam_rows:  # only beam 0 may start: the beams are identical copies after the prompt
        fresh = fresh.replace(alive_scores=fresh.alive_scores.at[:, 1:].set(NEG))
    if prompt_ids is None:
        prompt_ids, prompt_len = jnp.zeros((k, 0), jnp.int32), jnp.zeros((k,), jnp.int32)
    guard = P.guard_from_prompt(rows.guard, jnp.repeat(prompt_ids, beams, axis=0), jnp.repeat(prompt_len, beams),
                                cfg)
    fields = {f.name: getattr(fresh, f.name) for f in dataclasses.fields(fresh)} | {"guard": guard}
    decoder_rows = (ids[:, None] * beams + jnp.arange(beams)).reshape(-1)
    if beam_rows:
        fields["parents"] = decoder_rows.astype(jnp.int32)
    bias = fields.pop("bias")
    out = {}
    for name, value in fields.items():
        current = getattr(rows, name)
        per_row = name in ("parents", "last", "guard") and beam_rows
        out[name] = _set_rows(current, decoder_rows if per_row else ids, value)
    if rows.bias is not None:
        bias = hw.restart(rows.bias, ids, decoder_rows, hw.empty(k, cfg.hotword_edges) if tries is None else tries)
    return type(rows)(**out, bias=bias)


def _beams(rows: Rows) -> int:
    """Decoder rows per request of beam-search rows; 0 for greedy rows."""
    return rows.alive_tokens.shape[1] if isinstance(rows, BeamRows) else 0


def pick(rows: Rows, logits: jax.Array, update: jax.Array, cfg: SearchConfig, z: SearchSettings) -> Rows:
    """Choose the next token of requests where ``update`` (requests,) from ``logits`` (decoder rows, V)."""
    if isinstance(rows, BeamRows):
        return _beam_pick(rows, logits, update, cfg, z)
    return _greedy_pick(rows, logits, update, cfg, z)


def decoder_active(rows: Rows) -> jax.Array:
    """(decoder rows,) bool: rows whose request still takes steps."""
    return jnp.repeat(~rows.done, max(1, _beams(rows)))


def step(step_fn: StepFn, rows: Rows, state, batch_axes, cfg: SearchConfig, z: SearchSettings):
    """One decoder step for every live request, then its next token -> (rows, state)."""
    active = ~rows.done
    if isinstance(rows, BeamRows):
        state = gather_rows(state, batch_axes, rows.parents)
    logits, state = step_fn(rows.last, decoder_active(rows), state)
    return pick(rows, logits, active, cfg, z), state


def run(step_fn: StepFn, rows: Rows, state, batch_axes, cfg: SearchConfig, z: SearchSettings,
        max_steps: jax.Array | int, until_any_done: bool = False):
    """Step (one ``lax.while_loop``) until all requests are done, ``max_steps`` steps, or (``until_any_done``) a
    request live at the start is done -> (rows, state, steps taken)."""
    live = ~rows.done

    def cond(carry):
        rows, _, n = carry
        go = (n < max_steps) & jnp.any(~rows.done)
        if until_any_done:
            go &= ~jnp.any(live & rows.done)
        return go

    def body(carry):
        rows, state, n = carry
        rows, state = step(step_fn, rows, state, batch_axes, cfg, z)
        return rows, state, n + 1

    return jax.lax.while_loop(cond, body, (rows, state, jnp.zeros((), jnp.int32)))


def result(rows: Rows, cfg: SearchConfig, z: SearchSettings) -> SearchResult:
    """The best hypothesis of every request."""
    return _beam_result(rows, cfg) if isinstance(rows, BeamRows) else _greedy_result(rows, z)


def search(step_fn: StepFn, logits: jax.Array, state, batch_axes, settings: SearchSettings, max_new_tokens, *,
           out_len: int, cfg: SearchConfig, prompt_ids: jax.Array | None = None,
           prompt_len: jax.Array | None = None, tries: hw.Trie | None = None) -> SearchResult:
    """Decode a batch to the end from its prompts' next-token logits (batch, V) and decoder state (one row per
    prompt; beam search widens it) with ``step_fn``; traceable, jit it.

    ``max_new_tokens`` (scalar or (batch,)) is cut to the static ``out_len`` (``step_fn`` must have room for that
    many steps). ``prompt_ids`` (batch, seq) with ``prompt_len`` (batch,) real ids join the repetition guard;
    ``tries`` (batch requests, ``cfg.hotword_edges`` edges) bias each row towards its hotwords.
    """
    batch, vocab = logits.shape
    ids = jnp.arange(batch)
    history = 0 if prompt_ids is None else prompt_ids.shape[1]
    if prompt_ids is not None and prompt_len is None:
        prompt_len = jnp.full((batch,), prompt_ids.shape[1], jnp.int32)
    rows = init_rows(cfg, batch, out_len, vocab, history + out_len)
    max_new = jnp.broadcast_to(jnp.asarray(max_new_tokens, jnp.int32), (batch,))
    rows = start(rows, ids, max_new, cfg, prompt_ids, prompt_len, tries)
    if cfg.beam_size > 1:
        state = add_beam_dim(state, batch_axes, cfg.beam_size)
        logits = jnp.repeat(logits, cfg.beam_size, axis=0)
    rows = pick(rows, logits, ~rows.done, cfg, settings)
    rows, _, _ = run(step_fn, rows, state, batch_axes, cfg, settings, out_len)
    return result(rows, cfg, settings)
