"""Flax (linen) modules: the AuT audio encoder, the projector, the Qwen3 decoder and the heads.

Parameters are plain pytrees in one of two layouts, chosen by the modules' ``scan_layers``:
- stacked (``scan_layers=True``, the canonical layout): layers run under ``nn.scan`` with a leading ``layers`` axis
  on every per-layer parameter, so a 28-layer decoder compiles once per shape and converts, shards and saves as a
  few big arrays;
- per layer (``scan_layers=False``, what ``qasr_jax.Model`` runs on one device): ``layers_0``, ``layers_1``, ...
  subtrees, the layers unrolled in Python, and each decoder layer's q|k|v and gate|up kernels concatenated into
  one ("qkv", "gate_up"). Under a scan XLA copies each layer's weights out of the stacked arrays on every call (on
  CPU the decode step spent more time on that copy than on the matmuls); separate arrays are read in place, and
  fewer, wider matmuls stream the weights faster in the memory-bound decode step. ``qasr_jax.layouts``
  converts between the two.
Norms, softmax, RoPE tables and logits are computed in float32 whatever the parameter and activation dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.config import AudioConfig, ModelConfig, TextConfig, audio_token_count
from qasr_jax.kernels import windowed_attention
from qasr_jax.sharding import constrain, per_row_and_head, use_layout

Dtype = jnp.dtype


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch's default."""
    return jax.nn.gelu(x, approximate=False)


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics (torch's eps 1e-5)."""

    dtype: Dtype = jnp.float32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


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


def _dense(features: int, name: str, dtype: Dtype, bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)


def sinusoid_positions(length: int, channels: int) -> np.ndarray:
    """(length, channels) float32: sin then cos (concatenated, not interleaved), timescales 1 .. 10000."""
    inc = np.log(10000.0) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Audio encoder
# ----------------------------------------------------------------------------------------------------------------


# Logical axes of the main activations (see qasr_jax.sharding): no-ops unless a Layout is active.
_AUDIO_ACT = ("batch", "length", "audio_embed")
_AUDIO_QKV = ("batch", "length", "audio_heads", None)
_ACT = ("batch", "length", "embed")
_KV_SLICE = ("batch", "kv_heads", "length", None)  # keys and values as cached: (batch, kv_heads, slots, head_dim)


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer with windowed self-attention and an exact-GELU MLP."""

    cfg: AudioConfig
    dtype: Dtype
    attention_impl: str
    interpret: bool = False

    @nn.compact
    def __call__(self, x, n_tokens):
        cfg, dt = self.cfg, self.dtype
        batch, seq, d = x.shape
        head_dim = d // cfg.heads
        h = LayerNorm(dt, name="attn_norm")(x)
        q, k, v = (
            constrain(_dense(d, n, dt)(h).reshape(batch, seq, cfg.heads, head_dim), _AUDIO_QKV)
            for n in ("q", "k", "v")
        )
        attend = functools.partial(
            windowed_attention, window=cfg.window_tokens, impl=self.attention_impl, interpret=self.interpret
        )
        att = per_row_and_head(attend, q, k, v, n_tokens)  # each device attends over its own rows and heads
        x = x + _dense(d, "o", dt)(att.reshape(batch, seq, d))
        h = LayerNorm(dt, name="mlp_norm")(x)
        h = constrain(gelu(_dense(cfg.ffn_dim, "fc1", dt)(h)), ("batch", "length", "audio_mlp"))
        return constrain(x + _dense(d, "fc2", dt)(h), _AUDIO_ACT), None


class AudioEncoder(nn.Module):
    """AuT: per-1-s-chunk conv stack, per-chunk sinusoidal positions, windowed pre-LN layers, ln_post."""

    cfg: AudioConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    interpret: bool = False  # run a Pallas kernel in the interpreter (tests on CPU)
    scan_layers: bool = True

    @nn.compact
    def __call__(self, feats, n_frames):
        """feats (batch, mels, frames) with frames a multiple of the chunk; n_frames (batch,) valid frames.

        Returns (hidden (batch, seq, d_model), n_tokens (batch,)); positions at or past n_tokens are padding.
        seq is the token count of all chunks (13 per chunk for the released models).
        """
        cfg, dt = self.cfg, self.dtype
        batch, mels, frames = feats.shape
        if frames % cfg.chunk_frames:
            raise ValueError(f"feature frames ({frames}) must be a multiple of the {cfg.chunk_frames}-frame chunk")
        n_chunks = frames // cfg.chunk_frames
        # Frames past each audio's end are zeros, as when the last partial chunk is zero-padded on its own.
        keep = jnp.arange(frames)[None, :] < n_frames[:, None]
        x = jnp.where(keep[:, None, :], feats, 0.0).astype(dt)
        # (batch * chunks, mels, chunk_frames, 1): NHWC with H = mel bins, W = time; each chunk convolved alone.
        x = x.reshape(batch, mels, n_chunks, cfg.chunk_frames).transpose(0, 2, 1, 3)
        x = x.reshape(batch * n_chunks, mels, cfg.chunk_frames, 1)
        convs = [ConvParams((3, 3, 1 if i == 1 else cfg.downsample_hidden_size, cfg.downsample_hidden_size), dt,
                            name=f"conv2d{i}")() for i in (1, 2, 3)]
        x = _conv_stack(x, convs, dt)
        chunks, freq, steps, channels = x.shape  # (batch * chunks, 16, 13, hidden)
        # conv_out reads each time step flattened channel-major, (channels, freq), as torch's (C, F) view does.
        x = x.transpose(0, 2, 3, 1).reshape(chunks, steps, channels * freq)
        x = _dense(cfg.d_model, "conv_out", dt, bias=False)(x)
        x = x + jnp.asarray(sinusoid_positions(steps, cfg.d_model), dt)[None]  # positions restart every chunk
        x = x.reshape(batch, n_chunks * steps, cfg.d_model)
        # Only the last chunk of an audio can be partial, so valid tokens are a prefix of each row.
        n_tokens = _token_count(n_frames, cfg)
        # No padding to whole windows here: the attention pads its own windows, projections and MLPs run on
        # the chunks' tokens only.
        x = constrain(x, _AUDIO_ACT)
        if self.scan_layers:
            layers = nn.scan(
                EncoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.layers,
            )(cfg, dt, self.attention_impl, self.interpret, name="layers")
            x, _ = layers(x, n_tokens)
        else:
            for i in range(cfg.layers):
                x, _ = EncoderLayer(cfg, dt, self.attention_impl, self.interpret, name=f"layers_{i}")(x, n_tokens)
        return LayerNorm(dt, name="ln_post")(x), n_tokens


class ConvParams(nn.Module):
    """An HWIO 3x3 conv's kernel and bias (the parameters of ``nn.Conv``), applied by ``_conv_stack``."""

    shape: tuple[int, int, int, int]
    dtype: Dtype

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, self.dtype)
        return kernel, self.param("bias", nn.initializers.zeros, self.shape[-1:], self.dtype)


CONV_GROUP = 50  # chunks convolved per step: 50 s of audio keeps the 480-channel activations near 300 MB


def _conv_stack(x: jax.Array, convs, dt, group: int = CONV_GROUP) -> jax.Array:
    """Three stride-2 3x3 convs + GELU over (chunks, mels, frames, 1) chunks, ``group`` chunks at a time.

    A long input would otherwise hold every chunk's first (largest) activation at once: 20 minutes of audio
    needed 8.8 GB of XLA temp memory for the conv stack alone. Chunks are independent, so groups give the same
    numbers; the last group is padded with zero chunks, cut off again after.
    """

    def stack(x):
        for kernel, bias in convs:
            x = jax.lax.conv_general_dilated(x.astype(dt), kernel, (2, 2), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = gelu(x + bias)
        return x

    chunks = x.shape[0]
    if chunks <= group:
        return stack(x)
    groups = -(-chunks // group)
    x = jnp.pad(x, ((0, groups * group - chunks),) + ((0, 0),) * 3)
    y = jax.lax.map(stack, x.reshape(groups, group, *x.shape[1:]))
    return y.reshape(groups * group, *y.shape[2:])[:chunks]


def _token_count(n_frames: jax.Array, cfg: AudioConfig) -> jax.Array:
    full, rem = jnp.divmod(n_frames, cfg.chunk_frames)
    for _ in range(3):
        rem = (rem + 1) // 2
    return (full * cfg.tokens_per_chunk + rem).astype(jnp.int32)


class Projector(nn.Module):
    """proj1 -> GELU -> proj2: encoder width to the decoder's hidden size."""

    cfg: AudioConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = constrain(gelu(_dense(self.cfg.d_model, "proj1", self.dtype)(x)), ("batch", "length", "audio_mlp"))
        return constrain(_dense(self.cfg.output_dim, "proj2", self.dtype)(x), _ACT)


# ----------------------------------------------------------------------------------------------------------------
# Qwen3 decoder
# ----------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Fixed-size decoder KV cache; every item writes its next token into the same slot ``end``."""

    # Slots next to head_dim, the layout attention's dots read without a transpose.
    k: jax.Array  # (layers, batch, kv_heads, max_len, head_dim)
    v: jax.Array  # (layers, batch, kv_heads, max_len, head_dim)
    valid: jax.Array  # (batch, max_len) bool: slots that hold a real (non-padding) token
    end: jax.Array  # () int32: next slot to write

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype: Dtype = jnp.float32) -> "KVCache":
        """An empty cache of ``max_len`` slots."""
        shape = (cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (batch, seq, head_dim) float32 for rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (batch, seq, heads, head_dim); rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def qkv_widths(cfg: TextConfig) -> tuple[int, int, int]:
    """Output widths of the q, k and v projections."""
    return cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim


class DecoderLayer(nn.Module):
    """Qwen3 layer: GQA with per-head q/k RMSNorm before RoPE, SwiGLU MLP, pre-RMSNorm."""

    cfg: TextConfig
    dtype: Dtype
    fused: bool = False  # per-layer layout: q|k|v and gate|up are one kernel each ("qkv", "gate_up")

    @nn.compact
    def __call__(self, x, kv, cos, sin, mask, write_at, layer=None):
        """x (batch, seq, hidden); kv the (k, v) cache or None; mask (batch, seq, keys) bool.

        kv is this layer's (batch, kv_heads, slots, head_dim) pair, or with ``layer`` (a static index) the whole
        stacked (layers, batch, ...) pair, updated in place at that layer. With a cache, the new keys are written
        at slot ``write_at``. The mask's key axis says what the queries attend over: the cache slots (max_len
        keys, one-token steps) or their own keys (seq keys, prefill).
        """
        cfg, dt = self.cfg, self.dtype
        batch, seq, _ = x.shape
        groups = cfg.heads // cfg.kv_heads
        h = RMSNorm(dt, cfg.rms_norm_eps, name="attn_norm")(x)
        widths = qkv_widths(cfg)
        if self.fused:
            q, k, v = jnp.split(_dense(sum(widths), "qkv", dt, bias=False)(h), np.cumsum(widths)[:-1], axis=-1)
        else:
            q, k, v = (_dense(w, n, dt, bias=False)(h) for w, n in zip(widths, "qkv"))
        q = q.reshape(batch, seq, cfg.heads, cfg.head_dim)
        k, v = (t.reshape(batch, seq, cfg.kv_heads, cfg.head_dim) for t in (k, v))
        q = constrain(apply_rope(RMSNorm(dt, cfg.rms_norm_eps, name="q_norm")(q), cos, sin),
                      ("batch", "length", "heads", None))
        k = apply_rope(RMSNorm(dt, cfg.rms_norm_eps, name="k_norm")(k), cos, sin)
        k, v = (constrain(t.transpose(0, 2, 1, 3), _KV_SLICE) for t in (k, v))  # (batch, kv_heads, seq, head_dim)
        if kv is not None:
            if layer is None:
                ck, cv = (constrain(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (0, 0, write_at, 0)),
                                    _KV_SLICE) for c, new in zip(kv, (k, v)))
                kv = (ck, cv)
            else:
                kv = tuple(jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), (layer, 0, 0, write_at, 0))
                           for c, new in zip(kv, (k, v)))
                ck, cv = kv[0][layer], kv[1][layer]
            if mask.shape[-1] == ck.shape[2]:  # the mask spans the cache slots: attend over the cache
                k, v = ck.astype(dt), cv.astype(dt)
        # (batch, seq, kv_heads, groups, head_dim): query heads grouped by the kv head they share.
        qg = q.reshape(batch, seq, cfg.kv_heads, groups, cfg.head_dim)
        scores = jnp.einsum("bqhgd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None], scores * cfg.head_dim**-0.5, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        # Batch axes leading in the output too: with (b, q, h, g, d) out XLA transposed every layer's V (b = 1) or
        # ran 64 tiny products (b = 8); the transpose of the small result after is cheap.
        att = jnp.einsum("bhgqk,bhkd->bhgqd", probs, v).transpose(0, 3, 1, 2, 4)
        att = att.reshape(batch, seq, cfg.heads * cfg.head_dim)
        x = x + _dense(cfg.hidden_size, "o", dt, bias=False)(att)
        h = RMSNorm(dt, cfg.rms_norm_eps, name="mlp_norm")(x)
        if self.fused:
            gate, up = jnp.split(_dense(2 * cfg.intermediate_size, "gate_up", dt, bias=False)(h), 2, axis=-1)
        else:
            gate, up = (_dense(cfg.intermediate_size, n, dt, bias=False)(h) for n in ("gate", "up"))
        mlp = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        x = constrain(x + _dense(cfg.hidden_size, "down", dt, bias=False)(mlp), _ACT)
        return x, kv


class TextDecoder(nn.Module):
    """Qwen3 decoder stack: token embedding, layers (scanned or unrolled), final RMSNorm."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    scan_layers: bool = True

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        if self.scan_layers:
            self.layers = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.layers,
            )(cfg, self.dtype)
        else:
            self.layers = [DecoderLayer(cfg, self.dtype, fused=True) for _ in range(cfg.layers)]  # layers_0, ...
        self.norm = RMSNorm(self.dtype, cfg.rms_norm_eps)

    def __call__(self, embeds, positions, mask, cache: KVCache | None = None, write_at=0):
        """embeds (batch, seq, hidden), positions (batch, seq) -> (hidden after the final norm, new cache kv)."""
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        kv = None if cache is None else (cache.k, cache.v)
        x = constrain(embeds.astype(self.dtype), _ACT)
        if self.scan_layers:
            x, kv = self.layers(x, kv, cos, sin, mask, write_at)
        else:
            for i, layer in enumerate(self.layers):
                x, kv = layer(x, kv, cos, sin, mask, write_at, None if kv is None else i)
        return self.norm(x), kv


def _in_layout(method):
    """Run a Qwen3ASRModule method with its ``layout`` active, so the ``constrain`` calls inside pin activations."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with use_layout(self.layout):
            return method(self, *args, **kwargs)

    return wrapped


def _constrain_cache(cache: KVCache) -> KVCache:
    kv = ("layers", "batch", "kv_heads", "length", None)
    return KVCache(k=constrain(cache.k, kv), v=constrain(cache.v, kv), valid=constrain(cache.valid, ("batch", None)),
                   end=cache.end)


class Qwen3ASRModule(nn.Module):
    """The whole model: encoder + projector + decoder + head (LM head, tied or not, or aligner classes)."""

    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    interpret: bool = False
    layout: Any = None  # a qasr_jax.sharding.Layout: activations are pinned to its mesh while tracing
    scan_layers: bool = True  # False: per-layer parameters (layers_0, ...), layers unrolled (see the module doc)

    def setup(self):
        cfg = self.cfg
        self.audio_tower = AudioEncoder(cfg.audio, self.dtype, self.attention_impl, self.interpret, self.scan_layers)
        self.projector = Projector(cfg.audio, self.dtype)
        self.decoder = TextDecoder(cfg.text, self.dtype, self.scan_layers)
        # Heads compute in float32 on weights stored in the model dtype.
        f32 = jnp.float32
        if cfg.is_aligner:
            self.score = nn.Dense(cfg.num_labels, use_bias=False, dtype=f32, param_dtype=self.dtype)
        elif not cfg.text.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.text.vocab_size, use_bias=False, dtype=f32, param_dtype=self.dtype)

    @_in_layout
    def encode(self, feats, n_frames):
        """Log-mel (batch, mels, frames) -> (projector output (batch, seq, text hidden), n_tokens (batch,))."""
        hidden, n_tokens = self.audio_tower(feats, n_frames)
        return self.projector(hidden), n_tokens

    @_in_layout
    def embed(self, input_ids, audio_embeds):
        """Token embeddings with the k-th ``<|audio_pad|>`` of each row replaced by that row's k-th audio token."""
        x = self.decoder.embed(input_ids)
        is_audio = input_ids == self.cfg.audio_token_id
        idx = jnp.clip(jnp.cumsum(is_audio, axis=1) - 1, 0, audio_embeds.shape[1] - 1)
        audio = jnp.take_along_axis(audio_embeds, idx[..., None], axis=1).astype(x.dtype)
        return constrain(jnp.where(is_audio[..., None], audio, x), _ACT)

    @_in_layout
    def head(self, hidden):
        """Final hidden states -> float32 logits (vocabulary, or aligner classes)."""
        hidden = hidden.astype(jnp.float32)
        if self.cfg.is_aligner:
            logits = self.score(hidden)
        elif self.cfg.text.tie_word_embeddings:
            # Contract over the embedding's own last axis: ``@ embedding.T`` makes XLA copy the whole matrix.
            logits = jnp.einsum("...h,vh->...v", hidden, self.decoder.embed.embedding.astype(jnp.float32))
        else:
            logits = self.lm_head(hidden)
        axes = ("batch", "length", "classes" if self.cfg.is_aligner else "vocab")
        return constrain(logits, axes[-logits.ndim:])

    @_in_layout
    def decode(self, embeds, positions, mask, cache: KVCache | None = None, write_at=0):
        """Run the decoder (see TextDecoder) and return (hidden, kv)."""
        return self.decoder(embeds, positions, mask, cache, write_at)

    @_in_layout
    def prefill(self, embeds, token_mask, cache: KVCache):
        """Right-padded prompt embeds (batch, seq, hidden) into an empty cache -> (next-token logits, cache)."""
        positions, mask = prompt_positions_and_mask(token_mask)
        hidden, (k, v) = self.decode(embeds, positions, mask, cache, 0)
        last = jnp.maximum(token_mask.sum(1) - 1, 0)  # each row's last real token
        logits = self.head(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
        seq = token_mask.shape[1]
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask.astype(bool), (0, 0))
        return logits, _constrain_cache(KVCache(k=k, v=v, valid=valid, end=jnp.asarray(seq, jnp.int32)))

    @_in_layout
    def step(self, tokens, cache: KVCache):
        """One new token per row (batch,) at slot ``cache.end`` -> (logits (batch, vocab), cache)."""
        positions = cache.valid.sum(1)[:, None]  # each row's next position counts its real tokens only
        valid = cache.valid.at[:, cache.end].set(True)
        embeds = self.decoder.embed(tokens[:, None])
        hidden, (k, v) = self.decode(embeds, positions, valid[:, None, :], cache, cache.end)
        return self.head(hidden[:, 0]), _constrain_cache(KVCache(k=k, v=v, valid=valid, end=cache.end + 1))

    @_in_layout
    def __call__(self, input_ids, feats, n_frames, token_mask=None):
        """Full forward without cache: logits (batch, seq, vocab or classes) at every prompt position."""
        audio, _ = self.encode(feats, n_frames)
        embeds = self.embed(input_ids, audio)
        if token_mask is None:
            token_mask = jnp.ones(input_ids.shape, bool)
        positions, mask = prompt_positions_and_mask(token_mask)
        hidden, _ = self.decode(embeds, positions, mask)
        return self.head(hidden)


def prompt_positions_and_mask(token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For a padded prompt batch: positions (batch, seq) counting real tokens only, causal mask (batch, seq, seq)."""
    positions = jnp.maximum(jnp.cumsum(token_mask, axis=1) - 1, 0)
    seq = token_mask.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    return positions, causal[None] & token_mask[:, None, :]


@functools.lru_cache(maxsize=None)
def param_shapes(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The parameter tree as ShapeDtypeStructs (no memory used), from ``jax.eval_shape`` of init."""
    module = Qwen3ASRModule(cfg, jnp.dtype(dtype))
    frames = cfg.audio.chunk_frames
    n_tok = audio_token_count(frames, cfg.audio)
    ids = jnp.full((1, n_tok), cfg.audio_token_id, jnp.int32)
    feats = jnp.zeros((1, cfg.audio.num_mel_bins, frames), jnp.float32)
    return jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), ids, feats, jnp.array([frames], jnp.int32))["params"]
    )
