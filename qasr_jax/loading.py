"""``qasr_jax.load``: a checkpoint folder (official, -hf or Orbax export) -> a ready ``Model``."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.compiles import jit_with_encoder
from qasr_jax.config import ModelConfig, audio_token_count, frame_bucket, load_config
from qasr_jax.hub import resolve_model_path
from qasr_jax.layouts import unstack_layers
from qasr_jax.model import KVCache, Qwen3ASRModule

DTYPES = ("float32", "bfloat16")


def _bucket(n: int, step: int) -> int:
    """Round n up to a multiple of step (at least one step): shapes inside a bucket share one compilation."""
    return max(step, -(-n // step) * step)


class Model:
    """A loaded Qwen3-ASR or ForcedAligner: config, params and jitted encoder / forward functions.

    On one device the params are held per layer (``layers_0``, ...; see ``qasr_jax.model``) and the layers run
    unrolled, which reads each layer's weights in place; ``params`` may be passed in either layout.

    With a ``mesh`` (a ``jax.sharding.Mesh``, "data=4,model=2" or a ``qasr_jax.sharding.Layout``) the params are
    placed shard by shard as ``sharding`` says (a preset of ``qasr_jax.sharding.PRESETS`` or rules; None: "tensor"
    when the model axis is larger than 1, else "data"), and the batched methods take batches whose row count
    divides by the data axis (``data_size``).
    """

    def __init__(self, config: ModelConfig, params, dtype: str = "float32", attention_impl: str = "auto",
                 interpret: bool = False, mesh=None, sharding=None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.config = config
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.layout = None
        if mesh is None:
            if sharding is not None:
                raise ValueError("sharding= needs a mesh=")
            self.module = Qwen3ASRModule(config, jnp.dtype(dtype), attention_impl, interpret, scan_layers=False)
            self.params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), unstack_layers(params))
            self._encode = jit_with_encoder(functools.partial(self.module.apply, method=Qwen3ASRModule.encode))
            self._encode_batch = self._encode
            self._forward = jit_with_encoder(self.module.apply)
            self._embed = jax.jit(functools.partial(self.module.apply, method=Qwen3ASRModule.embed))
            self._prefill = jax.jit(functools.partial(self.module.apply, method=Qwen3ASRModule.prefill))
            self._step = jax.jit(functools.partial(self.module.apply, method=Qwen3ASRModule.step), donate_argnums=2)
            self._init_cache = None
        else:
            self._init_sharded(params, interpret, mesh, sharding)

    def _init_sharded(self, params, interpret, mesh, sharding) -> None:
        from qasr_jax import sharding as sh

        self.layout = sh.make_layout(mesh, sharding)
        dt = jnp.dtype(self.dtype)
        self.module = Qwen3ASRModule(self.config, dt, self.attention_impl, interpret, self.layout)
        self.params = sh.place_params(params, self.layout, self.config, self.dtype)
        # One-input methods (encode, logits) take batch 1: plain jits, the params' shardings drive the partitioning.
        self._encode = jit_with_encoder(functools.partial(self.module.apply, method=Qwen3ASRModule.encode))
        self._forward = jit_with_encoder(self.module.apply)
        programs = sh.batch_programs(self.module, self.layout, sh.param_shardings(self.params, self.layout,
                                                                                  self.config), self.config)
        self._encode_batch, self._embed = programs["encode"], programs["embed"]
        self._prefill, self._step, self._init_cache = programs["prefill"], programs["step"], programs["init_cache"]

    @property
    def mesh(self):
        """The ``jax.sharding.Mesh`` the params live on, or None (one device)."""
        return None if self.layout is None else self.layout.mesh

    @property
    def data_size(self) -> int:
        """Devices along the mesh's data axis (1 without a mesh): batched calls take a multiple of this many rows."""
        return 1 if self.layout is None else self.layout.data_size

    def put_batch(self, x) -> jax.Array:
        """A batch (rows first) on the devices: rows split over the data axis with a mesh, else ``jnp.asarray``."""
        from qasr_jax.sharding import put_batch

        return put_batch(x, self.layout)

    # -- the audio front end -------------------------------------------------------------------------------
    @staticmethod
    def log_mel(wave) -> np.ndarray:
        """float32 16 kHz mono waveform -> log-mel (128, n_frames), n_frames = max(n_samples, 8000) // 160."""
        from qasr_jax.audio import log_mel

        return np.asarray(log_mel(wave))

    def _pad_feats(self, feats) -> tuple[jax.Array, jax.Array]:
        feats = np.asarray(feats, np.float32)
        mels = self.config.audio.num_mel_bins
        if feats.ndim != 2 or feats.shape[0] != mels:
            raise ValueError(f"features must be ({mels}, n_frames) log-mel, got shape {feats.shape}")
        n = feats.shape[1]
        if n == 0:
            raise ValueError("features have no frames")
        padded = np.zeros((1, mels, frame_bucket(n, self.config.audio)), np.float32)  # new lengths reuse compiles
        padded[0, :, :n] = feats
        return jnp.asarray(padded), jnp.array([n], jnp.int32)

    # -- the public numeric API ----------------------------------------------------------------------------
    def encode(self, feats) -> np.ndarray:
        """Log-mel (128, n_frames) -> projector output (n_audio_tokens, text_hidden) as float32 numpy."""
        x, n = self._pad_feats(feats)
        out, n_tokens = self._encode({"params": self.params}, x, n)
        return np.asarray(out[0, : int(n_tokens[0])], np.float32)

    def encode_batch(self, feats: jax.Array, n_frames: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Padded batch (batch, 128, frames), n_frames (batch,) -> (audio embeds (batch, seq, hidden), n_tokens)."""
        if self.layout is not None:
            feats, n_frames = self.put_batch(feats), self.put_batch(n_frames)
        return self._encode_batch({"params": self.params}, feats, n_frames)

    # -- cached decoding ------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache of ``max_len`` slots for ``batch`` rows, in the model's dtype (sharded with a mesh)."""
        if self._init_cache is not None:
            from qasr_jax.sharding import check_rows

            check_rows(batch, self.layout)
            return self._init_cache(batch, max_len)
        return KVCache.init(self.config.text, batch, max_len, jnp.dtype(self.dtype))

    def embed(self, input_ids: jax.Array, audio_embeds: jax.Array) -> jax.Array:
        """Prompt ids (batch, seq) + audio embeds (batch, audio_seq, hidden) -> decoder input embeds."""
        if self.layout is not None:
            input_ids, audio_embeds = self.put_batch(input_ids), self.put_batch(audio_embeds)
        return self._embed({"params": self.params}, input_ids, audio_embeds)

    def prefill(self, embeds: jax.Array, token_mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Right-padded prompt embeds into an empty cache -> (float32 next-token logits (batch, vocab), cache)."""
        if self.layout is not None:
            embeds, token_mask = self.put_batch(embeds), self.put_batch(token_mask)
        return self._prefill({"params": self.params}, embeds, token_mask, cache)

    def step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append one token per row (batch,) -> (float32 logits (batch, vocab), cache); the old cache is donated."""
        if self.layout is not None:
            tokens = self.put_batch(tokens)
        return self._step({"params": self.params}, tokens, cache)

    def logits(self, input_ids, feats) -> np.ndarray:
        """Prompt ids (holding the right number of ``<|audio_pad|>``) + log-mel -> float32 logits (len, vocab|classes)."""
        ids = np.asarray(input_ids, np.int64).reshape(-1)
        x, n = self._pad_feats(feats)
        want = audio_token_count(int(n[0]), self.config.audio)
        have = int((ids == self.config.audio_token_id).sum())
        if have != want:
            raise ValueError(
                f"input_ids hold {have} <|audio_pad|> tokens but {feats.shape[1]} frames encode to {want}; "
                "put exactly that many audio pads in the prompt"
            )
        length = len(ids)
        padded = np.zeros((1, _bucket(length, 64)), np.int32)
        padded[0, :length] = ids
        mask = np.zeros(padded.shape, bool)
        mask[0, :length] = True
        out = self._forward({"params": self.params}, jnp.asarray(padded), x, n, jnp.asarray(mask))
        return np.asarray(out[0, :length], np.float32)


def load(path: str | os.PathLike, dtype: str = "float32", attention_impl: str = "auto", mesh=None,
         sharding=None) -> Model:
    """Load a Qwen3-ASR / ForcedAligner folder (official or -hf safetensors layout, or a qasr_jax Orbax export)
    or hub id.

    ``attention_impl`` picks the encoder's windowed attention: "auto" (the Pallas kernel where it applies, else
    XLA), "xla", or "pallas" (an error where the kernel cannot run). ``mesh`` ("data=4,model=2", a
    ``jax.sharding.Mesh``) and ``sharding`` ("data", "tensor", "fsdp") spread the model over devices, each
    parameter read straight into its shards (see ``Model``).
    """
    from qasr_jax.convert.orbax_io import is_orbax_export, restore_orbax

    path = resolve_model_path(path)
    if mesh is not None:
        from qasr_jax.sharding import make_layout

        mesh, sharding = make_layout(mesh, sharding), None
    if is_orbax_export(path):
        params, cfg = restore_orbax(path, dtype=None if mesh is None else dtype, layout=mesh)
    else:
        from qasr_jax.convert.checkpoint import load_hf_params

        cfg = load_config(path)
        params = load_hf_params(path, cfg, dtype)
    return Model(cfg, params, dtype=dtype, attention_impl=attention_impl, mesh=mesh, sharding=sharding)
