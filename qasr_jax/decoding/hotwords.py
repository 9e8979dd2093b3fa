"""Hotwords: contextual biasing by shallow fusion over a token prefix tree, inside the compiled search.

Each request may bring its own hotwords. Their token sequences (the word as written, lower case and each word
capitalised, each with and without a leading space) form a trie held as fixed-size arrays (:class:`Trie`: one edge per
node but the root, ``parent -> child`` on a token, each node's depth and the depth of the deepest complete
hotword on its path), padded to a bucket of edges so that new lists compile nothing.

Every hypothesis carries its trie node and the bonus it has earned. A token that extends the current match to
node ``c`` brings the hypothesis' bonus to ``earned + depth(c) * boost``; a token that breaks the match keeps
only what complete hotwords on the path earned (``earned + term_depth * boost``) and restarts from the root
(where the token may start another hotword). So a partial match that breaks scores exactly as with no biasing,
and an unfinished prefix at the end is not rewarded: the final bonus is ``earned + term_depth(node) * boost``.
Bonuses are kept apart from the model's log-probabilities (which results report unbiased) and only ever added
when hypotheses are ranked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.decoding.buckets import next_pow2

DEFAULT_BOOST = 2.0  # log-probability units per matched token (see Transcriber.transcribe's hotword_boost)
MIN_EDGES = 64  # trie buckets: 64, 128, 256, ... edges
EMPTY_TRIE = (np.zeros(0, np.int32),) * 2 + (np.zeros(1, np.int32),) * 2  # build_trie's arrays of no hotword


@flax.struct.dataclass
class Trie:
    """Per request (leading axis): the trie's edges (E,) and nodes (E + 1,); node 0 is the root."""

    parent: jax.Array  # (requests, E) int32: an edge's source node (-1: unused slot)
    token: jax.Array  # (requests, E) int32: the token on the edge
    depth: jax.Array  # (requests, E + 1) int32: tokens from the root
    term_depth: jax.Array  # (requests, E + 1) int32: depth of the deepest complete hotword on the path, self included
    boost: jax.Array  # (requests,) float32


@flax.struct.dataclass
class Bias:
    """The tries of the requests and each hypothesis' place in its trie."""

    trie: Trie
    node: jax.Array  # (hypotheses,) int32
    earned: jax.Array  # (hypotheses,) float32: bonus of the complete hotwords passed so far


def variants(word: str) -> list[str]:
    """The spellings of a hotword searched for: as written, lower case and each word capitalised, each with and
    without a leading space (byte-level BPE spells a word after a space differently)."""
    word = " ".join(word.split())
    capitalised = " ".join(w[:1].upper() + w[1:] for w in word.split(" "))
    forms = dict.fromkeys([word, word.lower(), capitalised])
    return [f for w in forms for f in (w, " " + w)]


def edge_bucket(n: int) -> int:
    """Edges of a trie with n edges, rounded up to a power of two (at least 64)."""
    return next_pow2(n, MIN_EDGES)


def build_trie(words: Sequence[str], encode: Callable[[str], list[int]]) -> tuple[np.ndarray, ...]:
    """Host arrays (parent, token, depth, term_depth) of the trie of ``words`` (their variants, encoded)."""
    children: list[dict[int, int]] = [{}]
    depth, terminal = [0], [False]
    for word in words:
        if not word.strip():
            continue
        for form in variants(word):
            node = 0
            for tok in encode(form):
                if tok not in children[node]:
                    children[node][tok] = len(children)
                    children.append({})
                    depth.append(depth[node] + 1)
                    terminal.append(False)
                node = children[node][tok]
            terminal[node] = True
    n = len(children)
    parent, token = np.full(n - 1, -1, np.int32), np.zeros(n - 1, np.int32)
    term = np.zeros(n, np.int32)
    for src, kids in enumerate(children):  # children are numbered after their parents
        for tok, dst in kids.items():
            parent[dst - 1], token[dst - 1] = src, tok
            term[dst] = depth[dst] if terminal[dst] else term[src]
    return parent, token, np.asarray(depth, np.int32), term


def for_search(words: Sequence[str], encode: Callable[[str], list[int]], boost: float = DEFAULT_BOOST) -> tuple | None:
    """One request's hotwords (no blank ones: ``decoding.request.prepare`` drops them) as the search takes them:
    (host trie, boost), or None without hotwords."""
    if not words:
        return None
    if not (np.isfinite(boost) and boost >= 0):
        raise ValueError(f"hotword_boost must be a non-negative number, got {boost!r}")
    return build_trie(words, encode), float(boost)


def edges_of(hotwords: tuple | None) -> int:
    """The edges of a request's trie (``for_search``; 0 without hotwords): the room a driver or batcher needs."""
    return 0 if hotwords is None else len(hotwords[0][0])


def with_context(context: str, words: Sequence[str]) -> str:
    """The context text with the hotwords after it (the model was trained to read names and terms there)."""
    return " ".join(filter(None, [context, ", ".join(words)]))


def pack(tries: Sequence[tuple[np.ndarray, ...]], boosts: Sequence[float], edges: int) -> Trie:
    """Stack per-request host tries, padded to ``edges`` edges, into one Trie."""
    k = len(tries)
    parent, token = np.full((k, edges), -1, np.int32), np.zeros((k, edges), np.int32)
    depth, term = np.zeros((k, edges + 1), np.int32), np.zeros((k, edges + 1), np.int32)
    for i, (p, t, d, td) in enumerate(tries):
        if len(p) > edges:
            raise ValueError(f"a hotword trie of {len(p)} edges does not fit {edges}; use edge_bucket()")
        parent[i, : len(p)], token[i, : len(t)], depth[i, : len(d)], term[i, : len(td)] = p, t, d, td
    arrays = (parent, token, depth, term, np.asarray(boosts, np.float32))
    return Trie(*(jax.device_put(x) for x in arrays))  # transferred: no compiled conversion per shape


def empty(requests: int, edges: int) -> Trie:
    """Tries with no hotword for ``requests`` requests."""
    return pack([EMPTY_TRIE] * requests, [0.0] * requests, edges)


def initial(edges: int, requests: int, hypotheses: int) -> Bias | None:
    """No hotwords yet for ``requests`` requests of ``hypotheses`` hypotheses; None when ``edges`` is 0 (off)."""
    if not edges:
        return None
    zeros = jnp.zeros((hypotheses,), jnp.int32)
    return Bias(empty(requests, edges), zeros, zeros.astype(jnp.float32))


def _per_hypothesis(trie: Trie, beams: int) -> Trie:
    return jax.tree_util.tree_map(lambda x: jnp.repeat(x, beams, axis=0), trie)


def bonus_table(bias: Bias, vocab: int, beams: int = 1) -> jax.Array:
    """(hypotheses, vocab) float32: each hypothesis' total bonus after each possible next token (see module doc)."""
    t = _per_hypothesis(bias.trie, beams)
    rows = jnp.arange(bias.node.shape[0])[:, None]
    at = lambda x: jnp.take_along_axis(x, bias.node[:, None], axis=1)[:, 0]  # noqa: E731
    boost = t.boost
    kept = bias.earned + at(t.term_depth) * boost  # a break keeps what complete hotwords earned
    table = jnp.broadcast_to(kept[:, None], (bias.node.shape[0], vocab))
    from_root = t.parent == 0  # a broken match restarts at the root, where the token may begin another hotword
    table = table.at[rows, t.token].add(jnp.where(from_root, boost[:, None], 0.0))
    extends = (t.parent == bias.node[:, None]) & (t.parent >= 0)  # edges leaving the current node
    child_depth = jnp.take_along_axis(t.depth, jnp.arange(1, t.depth.shape[1])[None, :], axis=1)
    hit = jnp.zeros(table.shape, bool).at[rows, t.token].max(extends)
    value = jnp.zeros(table.shape, jnp.float32).at[rows, t.token].max(
        jnp.where(extends, bias.earned[:, None] + child_depth * boost[:, None], -jnp.inf))
    return jnp.where(hit, value, table)


def transition(bias: Bias, token: jax.Array, beams: int = 1) -> Bias:
    """Each hypothesis' node and earned bonus after its ``token`` (hypotheses,)."""
    t = _per_hypothesis(bias.trie, beams)
    at = lambda x, n: jnp.take_along_axis(x, n[:, None], axis=1)[:, 0]  # noqa: E731
    child = jnp.arange(1, t.depth.shape[1])[None, :]  # edge e leads to node e + 1

    def follow(src):
        match = (t.parent == src[:, None]) & (t.token == token[:, None])
        return jnp.where(match.any(1), jnp.max(jnp.where(match, child, 0), axis=1), -1)

    step = follow(bias.node)
    restart = jnp.maximum(follow(jnp.zeros_like(bias.node)), 0)
    broke = step < 0
    earned = bias.earned + jnp.where(broke, at(t.term_depth, bias.node) * t.boost, 0.0)
    return bias.replace(node=jnp.where(broke, restart, step).astype(jnp.int32), earned=earned)


def final_bonus(bias: Bias, beams: int = 1) -> jax.Array:
    """(hypotheses,) the bonus a hypothesis keeps if it ends here: unfinished prefixes are not rewarded."""
    t = _per_hypothesis(bias.trie, beams)
    return bias.earned + jnp.take_along_axis(t.term_depth, bias.node[:, None], axis=1)[:, 0] * t.boost


def candidates(bias: Bias, parent: jax.Array, token: jax.Array, beams: int) -> tuple[Bias, jax.Array]:
    """Beam search's candidates (requests, n_cand), each continuing beam ``parent`` with ``token``: their trie
    places (requests * n_cand hypotheses) and the bonus each keeps if it ends there (requests, n_cand)."""
    requests, n_cand = parent.shape
    hyp = (jnp.arange(requests)[:, None] * beams + parent).reshape(-1)
    cand = transition(bias.replace(node=bias.node[hyp], earned=bias.earned[hyp]), token.reshape(-1), n_cand)
    return cand, final_bonus(cand, n_cand).reshape(requests, n_cand)


def keep(cand: Bias, chosen: jax.Array) -> Bias:
    """The trie places of the candidates ``chosen`` (requests, beams) as the next live beams."""
    requests, beams = chosen.shape
    n_cand = cand.node.shape[0] // requests
    pick = (jnp.arange(requests)[:, None] * n_cand + chosen).reshape(-1)
    return cand.replace(node=cand.node[pick], earned=cand.earned[pick])


def restart(bias: Bias, requests: jax.Array, hypotheses: jax.Array, tries: Trie) -> Bias:
    """New ``tries`` for ``requests`` (k,), their ``hypotheses`` back at the root with nothing earned."""
    trie = jax.tree_util.tree_map(lambda big, new: big.at[requests].set(new), bias.trie, tries)
    zero = jnp.zeros(hypotheses.shape, jnp.int32)
    return Bias(trie, bias.node.at[hypotheses].set(zero), bias.earned.at[hypotheses].set(zero.astype(jnp.float32)))
