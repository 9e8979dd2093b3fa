"""Flax (linen) modules: the AuT audio encoder, the projector, the Qwen3 decoder and the heads.

The parameter tree is the same on one device and on a mesh: each layer has its own subtree (``layers_0``,
``layers_1``, ...). The decoder runs its layers unrolled (XLA:CPU reads every weight where it lies; under a scan it
copied each layer's weights out of the stacked arrays on every call) or, with ``layers="scan"``, as one scanned
layer over weights stacked at load (``stack_layers``): XLA compiles one layer instead of 28, and on GPU and TPU the
slice is cheap. Each decoder layer's q, k and v kernels are one ``qkv`` kernel of shape (hidden, kv_heads,
groups + 2, head_dim), the queries of a kv head next to that head's key and value, and gate and up are one
``gate_up`` kernel (hidden, 2, intermediate): fewer, wider matmuls stream the weights faster in the memory-bound
decode step, and a split over kv heads or the MLP width keeps q, k, v (or gate, up) together.

A ``layout`` (``qasr_jax.modeling.axes.Layout``) passed to the module pins the main activations to a mesh; without one
the annotations are no-ops. Norms, softmax, RoPE tables and logits are computed in float32 whatever the parameter and
activation dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from qasr_jax.modeling import axes as ax
from qasr_jax.modeling.axes import constrain
from qasr_jax.modeling.cache_attention import attend
from qasr_jax.modeling.config import ModelConfig, TextConfig, audio_token_count
from qasr_jax.modeling.encoder import AudioEncoder, Projector, dense
from qasr_jax.modeling.quant import Embedding, Linear

Dtype = jnp.dtype


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in float32, cast back, then scale (the reference's order of operations)."""

    dtype: Dtype = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return scale * y.astype(self.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Qwen3 decoder
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Fixed-size decoder KV cache of ``slots`` rows: row r holds its tokens' keys and values at [0, lengths[r]).

    Each row has its own length (and so its own positions), so rows can be filled, extended and freed one by one
    (the engine's slots) while one step advances all of them.

    ``k`` and ``v`` are tuples of buffers, laid out for how the decoder runs its layers (``init``'s ``stacked``).
    Unrolled: one buffer per layer, which that layer's attention reads where it lies (slicing a layer out of one
    stacked (layers, ...) array copied that layer's whole cache, in every layer of every decode step). Scanned: one
    buffer of every layer's, layers first, which rides in the scan's carry as it is, each layer scattering into its
    own slice in place (per-layer buffers would be stacked on entry and split on exit: two copies of the whole cache
    per call). :meth:`row_axes` says which axis of each leaf holds the rows.
    """

    # Cache positions next to head_dim: the layout attention's dots read without a transpose.
    k: tuple[jax.Array, ...]  # one (slots, kv_heads, max_len, head_dim) buffer per layer, or one (layers, slots, ...)
    v: tuple[jax.Array, ...]  # as k
    lengths: jax.Array  # (slots,) int32: tokens held by each row

    @classmethod
    def init(cls, cfg: TextConfig, slots: int, max_len: int, dtype: Dtype = jnp.float32,
             stacked: bool = False) -> "KVCache":
        """An empty cache of ``slots`` rows of ``max_len`` positions: one buffer per layer, or with ``stacked`` (for
        ``layers="scan"``) one buffer of every layer's."""
        shape = (slots, cfg.kv_heads, max_len, cfg.head_dim)
        shapes = [(cfg.layers,) + shape] if stacked else [shape] * cfg.layers
        return cls(k=tuple(jnp.zeros(s, dtype) for s in shapes), v=tuple(jnp.zeros(s, dtype) for s in shapes),
                   lengths=jnp.zeros((slots,), jnp.int32))

    def row_axes(self) -> "KVCache":
        """The axis of each leaf that holds the rows, as a tree like this cache (``search``'s ``batch_axes``): a
        buffer's first axis, its second when stacked (after the layers); the lengths' only one."""
        return KVCache(k=tuple(t.ndim - 4 for t in self.k), v=tuple(t.ndim - 4 for t in self.v), lengths=0)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[-2]

    @property
    def slots(self) -> int:
        return self.k[0].shape[-4]


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (batch, seq, head_dim) float32 for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (batch, seq, ..., head_dim); rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    shape = cos.shape[:2] + (1,) * (x.ndim - 3) + cos.shape[2:]  # broadcast over the head axes
    return (x32 * cos.reshape(shape) + rotated * sin.reshape(shape)).astype(x.dtype)


@flax.struct.dataclass
class CacheWrite:
    """Where a decoder call writes its new keys and values: cache rows ``rows`` (None: every row, in order), each
    token i of row b at position ``positions[b, i]`` (at or past max_len: not written)."""

    rows: jax.Array | None  # (batch,) int32
    positions: jax.Array  # (batch, seq) int32


def _scatter(cache: jax.Array, idx, new: jax.Array) -> jax.Array:
    """``cache.at[idx].set(new)``, positions past the end dropped: ``idx`` ends (..., rows (batch, 1), :,
    positions (batch, seq), :) and ``new`` is (batch, seq, kv_heads, head_dim).

    A 16-bit float cache is scattered as uint16: XLA:CPU scatters bf16 by converting the whole cache buffer to
    float32 and back, in every layer.

    A single token (batch 1, seq 1) is scattered one kv head at a time (the heads indexed too, kv_heads updates of
    head_dim): XLA turns a one-update scatter into a dynamic-update-slice, which its CPU fusion duplicated into the
    attention dot's operand (the dot reads the buffer without its unit batch axis), and the two in-place writes of
    one buffer cost four whole-buffer copies of it, in every layer of a batch-1 decode step. The same values land
    at the same places (the compiled batch-1 step's results are bit-for-bit those of the one-update form)."""
    if new.shape[0] * new.shape[1] == 1:
        heads = jnp.arange(cache.shape[-3])
        idx = idx[:-4] + (idx[-4][..., None], heads, idx[-2][..., None], idx[-1])
    if cache.dtype.itemsize != 2:
        return cache.at[idx].set(new.astype(cache.dtype), mode="drop")
    bits = jax.lax.bitcast_convert_type(new.astype(cache.dtype), jnp.uint16)
    out = jax.lax.bitcast_convert_type(cache, jnp.uint16).at[idx].set(bits, mode="drop")
    return jax.lax.bitcast_convert_type(out, cache.dtype)


class DecoderLayer(nn.Module):
    """Qwen3 layer: GQA with per-head q/k RMSNorm before RoPE, SwiGLU MLP, pre-RMSNorm."""

    cfg: TextConfig
    dtype: Dtype
    layout: Any = None
    kv_block: int | None = None  # a decode step attends over its cache's filled blocks of this many positions

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, write: CacheWrite | None = None, layer=None):
        """x (batch, seq, hidden); mask (batch, seq, keys) bool.

        Without ``kv`` the queries attend over their own keys (keys = seq). With ``kv``, this layer's (k, v) cache
        buffers (with ``layer``, the index of this layer in the scan's stacked pair of every layer's buffers), the
        new keys and values are written as ``write`` says, and the queries attend over their rows of the cache
        (keys = max_len); the updated pair is returned.
        """
        cfg, dt, lay = self.cfg, self.dtype, self.layout
        batch = x.shape[0]
        groups = cfg.heads // cfg.kv_heads
        h = RMSNorm(dt, cfg.rms_norm_eps, name="attn_norm")(x)
        qkv = dense((cfg.kv_heads, groups + 2, cfg.head_dim), "qkv", dt, bias=False)(h)
        # (batch, seq, kv_heads, groups, head_dim): query heads grouped by the kv head they share.
        q = qkv[:, :, :, :groups]
        k, v = qkv[:, :, :, groups], qkv[:, :, :, groups + 1]  # (batch, seq, kv_heads, head_dim)
        q = constrain(apply_rope(RMSNorm(dt, cfg.rms_norm_eps, name="q_norm")(q), cos, sin), ax.QUERY, lay)
        k = apply_rope(RMSNorm(dt, cfg.rms_norm_eps, name="k_norm")(k), cos, sin)
        if kv is not None:
            rows = write.rows if write.rows is not None else jnp.arange(batch)
            # Scatter (batch, seq, kv_heads, head_dim) into the cache at ([layer,] row, :, position, :).
            idx = (rows[:, None], slice(None), write.positions, slice(None))
            idx = idx if layer is None else (layer,) + idx
            kv = tuple(_scatter(c, idx, new) for c, new in zip(kv, (k, v)))
            k, v = kv if layer is None else (kv[0][layer], kv[1][layer])  # (slots, kv_heads, max_len, head_dim)
            if write.rows is not None:
                k, v = k[write.rows], v[write.rows]
            k, v = (constrain(t, ax.KV, lay).astype(dt) for t in (k, v))
        else:
            k, v = (constrain(t.transpose(0, 2, 1, 3), ax.KV, lay) for t in (k, v))
        att = attend(q, k, v, mask, dt, self.kv_block if kv is not None else None)
        x = x + dense(cfg.hidden_size, "o", dt, bias=False)(att)
        h = RMSNorm(dt, cfg.rms_norm_eps, name="mlp_norm")(x)
        gate_up = dense((2, cfg.intermediate_size), "gate_up", dt, bias=False)(h)
        mlp = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ax.MLP, lay)
        x = constrain(x + dense(cfg.hidden_size, "down", dt, bias=False)(mlp), ax.ACT, lay)
        return x, kv


class ScannedLayer(nn.Module):
    """One decoder layer as a scan body: carry (x, every layer's cache buffers stacked or None), the layer's index
    as the scanned input."""

    cfg: TextConfig
    dtype: Dtype
    layout: Any = None
    remat: bool = False
    kv_block: int | None = None

    @nn.compact
    def __call__(self, carry, cos, sin, mask, write, layer):
        layer_cls = nn.remat(DecoderLayer, static_argnums=()) if self.remat else DecoderLayer
        body = layer_cls(self.cfg, self.dtype, self.layout, self.kv_block, name="layer")
        return body(*carry[:1], cos, sin, mask, carry[1], write, layer), None


SCANNED = "layers"  # the decoder's stacked subtree in scan mode: SCANNED/layer/<the layer's params>, layers first
LAYER_MODES = ("unrolled", "scan")


@functools.lru_cache(maxsize=None)
def _layer_program(cfg, dtype, layout, kv_block):
    """A decoder layer as a function of its parameters, jitted inline: JAX traces it once per input shape and pastes
    the traced program wherever it is called, so the compiled program is the same as with the layers called one by
    one."""
    def run(params, *args):
        return DecoderLayer(cfg, dtype, layout, kv_block, parent=None).apply({"params": params}, *args)
    return jax.jit(run, inline=True)


class TextDecoder(nn.Module):
    """Qwen3 decoder stack: token embedding, layers (``layers_0``, ...; stacked under ``layers`` when
    ``layers="scan"``), final RMSNorm."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    layout: Any = None
    remat: bool = False  # recompute each layer's activations in the backward pass (training memory)
    layers: str = "unrolled"  # or "scan": one compiled layer over stacked weights (see the module doc)
    kv_block: int | None = None  # decode steps attend over the cache's filled blocks (``cache_attention.attend``)
    # Unrolled calls with a cache trace one layer for all (off where a transform such as qwix's LoRA intercepts the
    # layers inside the module, or with remat: training)
    trace_once: bool = False

    def setup(self):
        cfg = self.cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, self.dtype)
        if self.layers == "scan":
            scan = nn.scan(ScannedLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                           in_axes=(nn.broadcast,) * 4 + (0,), length=cfg.layers)
            self.stack = scan(cfg, self.dtype, self.layout, self.remat, self.kv_block, name=SCANNED)
        else:
            layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
            self.stack = [layer(cfg, self.dtype, self.layout, self.kv_block, name=f"layers_{i}")
                          for i in range(cfg.layers)]
        self.norm = RMSNorm(self.dtype, cfg.rms_norm_eps)

    def __call__(self, embeds, positions, mask, cache: KVCache | None = None, write: CacheWrite | None = None):
        """embeds (batch, seq, hidden), positions (batch, seq) -> (hidden after the final norm, the new cache
        buffers (k, v), each a tuple laid out as the cache's (stacked in scan mode), or None)."""
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = constrain(embeds.astype(self.dtype), ax.ACT, self.layout)
        if self.layers == "scan":  # the stacked buffers ride in the carry: each layer scatters into its slice in place
            kv = None if cache is None else (cache.k[0], cache.v[0])
            (x, kv), _ = self.stack((x, kv), cos, sin, mask, write, jnp.arange(self.cfg.layers))
            kv = None if kv is None else ((kv[0],), (kv[1],))
        else:
            pairs = [None] * self.cfg.layers if cache is None else list(zip(cache.k, cache.v))
            # With a cache (the engine's prefill and steps), one layer is traced and its program replayed for the
            # others: tracing the 0.6B's 28 layers took 0.45 s of each new process's first step, now 0.07 s.
            once = self.trace_once and not self.remat and cache is not None and not self.is_initializing()
            for i, layer in enumerate(self.stack):
                if once:
                    run = _layer_program(self.cfg, self.dtype, self.layout, self.kv_block)
                    x, pairs[i] = run(layer.variables["params"], x, cos, sin, mask, pairs[i], write)
                else:
                    x, pairs[i] = layer(x, cos, sin, mask, pairs[i], write)
            kv = None if cache is None else tuple(zip(*pairs))
        return self.norm(x), kv


class Qwen3ASRModule(nn.Module):
    """The whole model: encoder + projector + decoder + head (LM head, tied or not, or aligner classes)."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    interpret: bool = False
    layout: Any = None  # a qasr_jax.modeling.axes.Layout: activations are pinned to its mesh while tracing
    remat: bool = False  # recompute each layer's activations in the backward pass (training memory)
    layers: str = "unrolled"  # the decoder's layers: "unrolled" or "scan" (over stack_layers' tree)
    kv_block: int | None = None  # decode steps attend over the cache's filled blocks of this many positions
    trace_once: bool = False  # see TextDecoder

    def setup(self):
        cfg, lay = self.cfg, self.layout
        self.audio_tower = AudioEncoder(cfg.audio, self.dtype, self.attention_impl, self.interpret, lay, self.remat)
        self.projector = Projector(cfg.audio, self.dtype, lay)
        self.decoder = TextDecoder(cfg.text, self.dtype, lay, self.remat, self.layers, self.kv_block, self.trace_once)
        # Heads compute in float32 on weights stored in the model dtype.
        if cfg.is_aligner:
            self.score = Linear(cfg.num_labels, False, self.dtype, out_dtype=jnp.float32)
        elif not cfg.text.tie_word_embeddings:
            self.lm_head = Linear(cfg.text.vocab_size, False, self.dtype, out_dtype=jnp.float32)

    def encode(self, feats, n_frames):
        """Log-mel (batch, mels, frames) -> (projector output (batch, seq, text hidden), n_tokens (batch,))."""
        hidden, n_tokens = self.audio_tower(feats, n_frames)
        return self.projector(hidden), n_tokens

    def embed(self, input_ids, audio_embeds):
        """Token embeddings with the k-th ``<|audio_pad|>`` of each row replaced by that row's k-th audio token."""
        x = self.decoder.embed(input_ids)
        is_audio = input_ids == self.cfg.audio_token_id
        idx = jnp.clip(jnp.cumsum(is_audio, axis=1) - 1, 0, audio_embeds.shape[1] - 1)
        audio = jnp.take_along_axis(audio_embeds, idx[..., None], axis=1).astype(x.dtype)
        return constrain(jnp.where(is_audio[..., None], audio, x), ax.ACT, self.layout)

    def head(self, hidden):
        """Final hidden states -> float32 logits (vocabulary, or aligner classes)."""
        hidden = hidden.astype(self.dtype)  # the final norm's output: exact in the model dtype
        if self.cfg.is_aligner:
            logits = self.score(hidden)
        elif self.cfg.text.tie_word_embeddings:
            logits = self.decoder.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        names = ("batch",) + ("length",) * (logits.ndim - 2) + ("classes" if self.cfg.is_aligner else "vocab",)
        return constrain(logits, names, self.layout)

    def decode(self, embeds, positions, mask, cache: KVCache | None = None, write: CacheWrite | None = None):
        """Run the decoder (see TextDecoder) and return (hidden, kv)."""
        return self.decoder(embeds, positions, mask, cache, write)

    def extend(self, embeds, n_new, cache: KVCache, rows=None):
        """Append right-padded tokens to cache rows: embeds (batch, seq, hidden), ``n_new`` (batch,) real tokens
        per row, ``rows`` (batch,) the cache rows (None: every row, in order). Each row's tokens go after the
        ones it holds (a prompt into an empty row, a prompt's rest on top of a kept prefix, one decode step).

        Returns (float32 logits after each row's last new token (batch, vocab), cache); a row with no new token
        is left as it was.
        """
        batch, seq = embeds.shape[:2]
        start = cache.lengths if rows is None else cache.lengths[rows]  # (batch,)
        offsets = jnp.arange(seq)
        positions = start[:, None] + offsets[None, :]  # (batch, seq): each row's positions continue its own
        new = offsets[None, :] < n_new[:, None]
        write = CacheWrite(rows, jnp.where(new, positions, cache.max_len))  # padding tokens are not written
        mask = jnp.arange(cache.max_len)[None, None, :] <= positions[:, :, None]  # (batch, seq, max_len): causal
        hidden, (k, v) = self.decode(embeds, positions, mask, cache, write)
        last = jnp.maximum(n_new - 1, 0)  # each row's last new token
        logits = self.head(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
        lengths = start + n_new
        lengths = lengths if rows is None else cache.lengths.at[rows].set(lengths)
        return logits, _constrain_cache(KVCache(k=k, v=v, lengths=lengths), self.layout)

    def step(self, tokens, active, cache: KVCache):
        """One new token per cache row (slots,) where ``active`` (slots,) -> (logits (slots, vocab), cache)."""
        embeds = self.decoder.embed(tokens[:, None])
        return self.extend(embeds, active.astype(jnp.int32), cache)

    def __call__(self, input_ids, feats, n_frames, token_mask=None):
        """Full forward without cache: logits (batch, seq, vocab or classes) at every prompt position."""
        return self.head(self.prompt_hidden(input_ids, feats, n_frames, token_mask))

    def prompt_hidden(self, input_ids, feats, n_frames, token_mask=None):
        """Final hidden states (batch, seq, hidden) at every prompt position of right-padded prompts, no cache."""
        return self.prompt_hidden_and_audio(input_ids, feats, n_frames, token_mask)[0]

    def prompt_hidden_and_audio(self, input_ids, feats, n_frames, token_mask=None):
        """:meth:`prompt_hidden` and what the encoder gave it: (hidden, audio embeds (batch, seq, hidden), n_tokens)
        (an auxiliary loss on the encoder reads the audio)."""
        audio, n_tokens = self.encode(feats, n_frames)
        embeds = self.embed(input_ids, audio)
        if token_mask is None:
            token_mask = jnp.ones(input_ids.shape, bool)
        positions, mask = prompt_positions_and_mask(token_mask)
        hidden, _ = self.decode(embeds, positions, mask)
        return hidden, audio, n_tokens


def _constrain_cache(cache: KVCache, layout) -> KVCache:
    return jax.tree_util.tree_map(lambda axis, t: constrain(t, ax.cache_axes(axis, t.ndim), layout),
                                  cache.row_axes(), cache)


def prompt_positions_and_mask(token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For a padded prompt batch: positions (batch, seq) counting real tokens only, causal mask (batch, seq, seq)."""
    positions = jnp.maximum(jnp.cumsum(token_mask, axis=1) - 1, 0)
    seq = token_mask.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    return positions, causal[None] & token_mask[:, None, :]


def _initializer(cfg: ModelConfig, dtype: str):
    module = Qwen3ASRModule(cfg, jnp.dtype(dtype))
    frames = cfg.audio.chunk_frames
    n_tok = audio_token_count(frames, cfg.audio)

    def init(key):  # the example inputs are made inside the trace
        ids = jnp.full((1, n_tok), cfg.audio_token_id, jnp.int32)
        feats = jnp.zeros((1, cfg.audio.num_mel_bins, frames), jnp.float32)
        return module.init(key, ids, feats, jnp.array([frames], jnp.int32))["params"]

    return init


@functools.lru_cache(maxsize=None)
def param_shapes(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The parameter tree as ShapeDtypeStructs (no memory used), from ``jax.eval_shape`` of init."""
    init = _initializer(cfg, dtype)
    return jax.eval_shape(lambda: init(jax.random.PRNGKey(0)))  # the key too is made inside the trace


def init_params(cfg: ModelConfig, seed: int = 0, dtype: str = "float32") -> dict:
    """Fresh weights to train from scratch: Flax's initialisers (LeCun-normal matrices, unit norms, zero biases),
    the token embedding scaled to std 0.02 as in Qwen3's own initialisation (it is also the tied output head)."""
    params = jax.jit(_initializer(cfg, dtype))(jax.random.PRNGKey(seed))
    embed = params["decoder"]["embed"]["embedding"]
    params["decoder"]["embed"]["embedding"] = embed * (0.02 / jnp.std(embed))
    return params


def _stack_leaves(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):  # an abstract tree (compiling ahead, no weights)
        return jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype)
    return jnp.stack(xs)


def stack_layers(params: dict, n_layers: int) -> dict:
    """The scan view of a parameter tree: the decoder's ``layers_0`` .. ``layers_{n-1}`` stacked (layers first)."""
    dec = dict(params["decoder"])
    per_layer = [dec.pop(f"layers_{i}") for i in range(n_layers)]
    dec[SCANNED] = {"layer": jax.tree_util.tree_map(_stack_leaves, *per_layer)}
    return {**params, "decoder": dec}


def unstack_layers(params: dict, n_layers: int) -> dict:
    """The one parameter tree (``layers_0``, ...) from :func:`stack_layers`' view: copies of each layer's slice."""
    dec = dict(params["decoder"])
    stacked = dec.pop(SCANNED)["layer"]
    dec.update({f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(n_layers)})
    return {**params, "decoder": dec}
