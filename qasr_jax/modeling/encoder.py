"""The AuT audio encoder (per-1-s-chunk conv stack, windowed pre-LN layers) and the projector, as Flax modules.

See ``qasr_jax.modeling.model`` for the whole model; the parameter tree is ``audio_tower/...`` and ``projector/...``
there.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.kernels import windowed_attention
from qasr_jax.modeling import axes as ax
from qasr_jax.modeling.axes import constrain, per_row_and_head
from qasr_jax.modeling.config import AudioConfig
from qasr_jax.modeling.quant import Linear

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


def dense(features, name: str, dtype: Dtype, bias: bool = True) -> Linear:
    return Linear(features, bias, dtype, name=name)


def sinusoid_positions(length: int, channels: int) -> np.ndarray:
    """(length, channels) float32: sin then cos (concatenated, not interleaved), timescales 1 .. 10000."""
    inc = np.log(10000.0) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32))
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Audio encoder
# ----------------------------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer with windowed self-attention and an exact-GELU MLP."""

    cfg: AudioConfig
    dtype: Dtype
    attention_impl: str
    interpret: bool = False
    layout: Any = None

    @nn.compact
    def __call__(self, x, n_tokens):
        cfg, dt, lay = self.cfg, self.dtype, self.layout
        batch, seq, d = x.shape
        head_dim = d // cfg.heads
        h = LayerNorm(dt, name="attn_norm")(x)
        q, k, v = (constrain(dense(d, n, dt)(h).reshape(batch, seq, cfg.heads, head_dim), ax.AUDIO_QKV, lay)
                   for n in ("q", "k", "v"))
        attend = functools.partial(
            windowed_attention, window=cfg.window_tokens, impl=self.attention_impl, interpret=self.interpret
        )
        att = per_row_and_head(attend, q, k, v, n_tokens, lay)  # each device: its own rows and heads
        x = x + dense(d, "o", dt)(att.reshape(batch, seq, d))
        h = LayerNorm(dt, name="mlp_norm")(x)
        h = constrain(gelu(dense(cfg.ffn_dim, "fc1", dt)(h)), ax.AUDIO_MLP, lay)
        return constrain(x + dense(d, "fc2", dt)(h), ax.AUDIO_ACT, lay)


class AudioEncoder(nn.Module):
    """AuT: per-1-s-chunk conv stack, per-chunk sinusoidal positions, windowed pre-LN layers, ln_post."""

    cfg: AudioConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    interpret: bool = False  # run a Pallas kernel in the interpreter (tests on CPU)
    layout: Any = None
    remat: bool = False  # recompute each layer's activations in the backward pass (training memory)

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
        x = dense(cfg.d_model, "conv_out", dt, bias=False)(x)
        x = x + jnp.asarray(sinusoid_positions(steps, cfg.d_model), dt)[None]  # positions restart every chunk
        x = x.reshape(batch, n_chunks * steps, cfg.d_model)
        # Only the last chunk of an audio can be partial, so valid tokens are a prefix of each row.
        n_tokens = _token_count(n_frames, cfg)
        # No padding to whole windows here: the attention pads its own windows, projections and MLPs run on
        # the chunks' tokens only.
        x = constrain(x, ax.AUDIO_ACT, self.layout)
        layer = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        for i in range(cfg.layers):
            x = layer(cfg, dt, self.attention_impl, self.interpret, self.layout, name=f"layers_{i}")(x, n_tokens)
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


def _stack(x: jax.Array, convs, dt) -> jax.Array:
    for kernel, bias in convs:
        x = jax.lax.conv_general_dilated(x.astype(dt), kernel, (2, 2), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = gelu(x + bias)
    return x


def _conv_stack(x: jax.Array, convs, dt, group: int = CONV_GROUP) -> jax.Array:
    """Three stride-2 3x3 convs + GELU over (chunks, mels, frames, 1) chunks, ``group`` chunks at a time.

    A long input would otherwise hold every chunk's first (largest) activation at once: 20 minutes of audio
    needed 8.8 GB of XLA temp memory for the conv stack alone. Chunks are independent, so groups give the same
    numbers; the last group is padded with zero chunks, cut off again after.
    """
    if x.shape[0] <= group:
        return _stack(x, convs, dt)
    return _grouped_stack(x, convs, dt, group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grouped_stack(x: jax.Array, convs, dt, group: int) -> jax.Array:
    chunks = x.shape[0]
    groups = -(-chunks // group)
    x = jnp.pad(x, ((0, groups * group - chunks),) + ((0, 0),) * 3)
    y = jax.lax.map(lambda xg: _stack(xg, convs, dt), x.reshape(groups, group, *x.shape[1:]))
    return y.reshape(groups * group, *y.shape[2:])[:chunks]


# The backward takes all chunks at once (training memory): XLA:CPU leaves kernel-gradient convolutions inside a
# loop body in a non-canonical layout and runs them ~40x slower (64 chunks: 6.6 s instead of 0.17 s).
_grouped_stack.defvjp(lambda x, convs, dt, group: (_grouped_stack(x, convs, dt, group), (x, convs)),
                      lambda dt, group, res, dy: jax.vjp(lambda x, c: _stack(x, c, dt), *res)[1](dy))


def _token_count(n_frames: jax.Array, cfg: AudioConfig) -> jax.Array:
    full, rem = jnp.divmod(n_frames, cfg.chunk_frames)
    for _ in range(3):
        rem = (rem + 1) // 2
    return (full * cfg.tokens_per_chunk + rem).astype(jnp.int32)


class Projector(nn.Module):
    """proj1 -> GELU -> proj2: encoder width to the decoder's hidden size."""

    cfg: AudioConfig
    dtype: Dtype = jnp.float32
    layout: Any = None

    @nn.compact
    def __call__(self, x):
        x = constrain(gelu(dense(self.cfg.d_model, "proj1", self.dtype)(x)), ax.AUDIO_MLP, self.layout)
        return constrain(dense(self.cfg.output_dim, "proj2", self.dtype)(x), ax.ACT, self.layout)
