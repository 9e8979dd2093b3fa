"""``qasr_jax.load``: a checkpoint folder (official, -hf or Orbax export) or hub id -> a ready ``Model``."""

from __future__ import annotations

import os

import jax
import numpy as np

from qasr_jax.decoding.buckets import frame_bucket, round_up
from qasr_jax.decoding.engine import Engine
from qasr_jax.io.hub import resolve_model_path
from qasr_jax.modeling.config import ModelConfig, audio_token_count, load_config
from qasr_jax.modeling.quant import cast_params, quantize_params

DTYPES = ("float32", "bfloat16")
LAYERS = ("auto", "scan", "unrolled")
LAYERS_ENV = "QASR_JAX_LAYERS"  # overrides the per-platform default of layers="auto" (e.g. to run the tests scanned)


def default_layers(backend: str | None = None) -> str:
    """How the decoder's layers run where ``layers="auto"``: scanned on GPU and TPU (one layer compiled, not 28),
    unrolled on CPU (XLA:CPU copies each scanned layer's weights every step; benchmarks/RESULTS.md, "Compile");
    $QASR_JAX_LAYERS overrides it."""
    chosen = os.environ.get(LAYERS_ENV, "").strip().lower()
    if chosen not in ("", "auto"):
        return _resolve_layers(chosen, "$" + LAYERS_ENV)
    return "unrolled" if (backend or jax.default_backend()) == "cpu" else "scan"


KV_BLOCK_ENV = "QASR_JAX_KV_BLOCK"  # overrides default_kv_block (0: every decode step reads its whole cache)
CPU_KV_BLOCK = 64  # positions a block; 32 and 128 measured no faster on CPU (benchmarks/RESULTS.md)


def default_kv_block(backend: str | None = None) -> int | None:
    """How a decode step reads its KV cache (``qasr_jax.modeling.cache_attention``): on CPU in blocks of
    ``CPU_KV_BLOCK`` positions up to the longest row's keys (a batch-8 int8 step over a 320-position cache 141 ->
    118 ms), elsewhere the whole cache until a GPU and a TPU have timed the blocks (benchmarks/gpu_checks.sh);
    $QASR_JAX_KV_BLOCK overrides it (0: the whole cache)."""
    chosen = os.environ.get(KV_BLOCK_ENV, "").strip()
    if chosen:
        if not chosen.isdigit():
            raise ValueError(f"${KV_BLOCK_ENV} must be a whole number of positions (0: the whole cache), "
                             f"got {chosen!r}")
        return int(chosen) or None
    return CPU_KV_BLOCK if (backend or jax.default_backend()) == "cpu" else None


def _resolve_layers(layers: str, name: str = "layers") -> str:
    if layers not in LAYERS:
        raise ValueError(f"{name} must be one of {LAYERS}, got {layers!r}")
    return default_layers() if layers == "auto" else layers


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _layout(mesh, sharding):
    if mesh is None:
        if sharding is not None:
            raise ValueError("sharding= needs a mesh=")
        return None
    from qasr_jax.modeling.sharding import make_layout

    return make_layout(mesh, sharding)


class Model:
    """A loaded Qwen3-ASR or ForcedAligner: config, params and its ``engine`` (every compiled program).

    The parameter tree is the same on one device and on a mesh (see ``qasr_jax.modeling.model``). With a ``mesh`` (a
    ``jax.sharding.Mesh``, "data=4,model=2" or a ``qasr_jax.modeling.axes.Layout``) the params are placed shard by
    shard as ``sharding`` says (a preset of ``qasr_jax.modeling.sharding.PRESETS`` or rules; None: "tensor" when the
    model axis is larger than 1, else "data"), and batches take a row count that divides by the data axis
    (``data_size``).
    ``quantize="int8"`` stores the matmul weights of the decoder's and the audio encoder's layers and the LM head as
    int8 (``qasr_jax.modeling.quant.quantize_params``); the rest of the model stays in ``dtype``. ``layers``
    ("auto", "scan", "unrolled") is how the decoder's layers run (see :func:`default_layers`); ``params`` is the one
    per-layer tree either way. A decode step reads its KV cache as :func:`default_kv_block` says.
    """

    def __init__(self, config: ModelConfig, params, dtype: str = "float32", attention_impl: str = "auto",
                 interpret: bool = False, mesh=None, sharding=None, quantize: str | None = None,
                 source: str | None = None, layers: str = "auto"):
        _check_dtype(dtype)
        self.config = config
        self.dtype = dtype
        self.quantize = quantize
        self.source = source  # the folder it was loaded from (its tokenizer lives there), or None
        layout = _layout(mesh, sharding)
        if quantize is not None and layout is not None:
            raise ValueError("quantize= runs on one device; drop mesh= or quantize=")
        if quantize is not None and jax.default_backend() == "gpu":  # measured slower than bf16 (docs/tpu.md)
            raise ValueError(f"quantize={quantize!r} is for CPU (and TPU): on a GPU it decodes slower than "
                             "bfloat16; drop quantize= and load with dtype='bfloat16'")
        if layout is None:
            params = cast_params(params, dtype)
            if quantize is not None:
                params = quantize_params(params, config, quantize)
        else:
            from qasr_jax.modeling.sharding import place_params

            params = place_params(params, layout, config, dtype)
        self.engine = Engine(config, params, dtype, attention_impl, interpret, layout, layers=_resolve_layers(layers),
                             kv_block=default_kv_block())

    @property
    def params(self):
        """The parameter tree (``layers_0``, ...; with ``layers="scan"`` a per-layer copy of the stacked weights)."""
        return self.engine.params

    @params.setter
    def params(self, params) -> None:
        self.engine.params = params

    @property
    def layers(self) -> str:
        """How the decoder's layers run: "scan" or "unrolled"."""
        return self.engine.layers

    @property
    def module(self):
        """The Flax module (pure ``apply``)."""
        return self.engine.module

    @property
    def layout(self):
        """The ``qasr_jax.modeling.axes.Layout`` (mesh + rules) the params live on, or None (one device)."""
        return self.engine.layout

    @property
    def mesh(self):
        """The ``jax.sharding.Mesh`` the params live on, or None (one device)."""
        return None if self.layout is None else self.layout.mesh

    @property
    def data_size(self) -> int:
        """Devices along the mesh's data axis (1 without a mesh): batched calls take a multiple of this many rows."""
        return self.engine.data_size

    def put_batch(self, x) -> jax.Array:
        """A batch (rows first) on the devices: rows split over the data axis with a mesh."""
        return self.engine.put(x)

    # -- the audio front end -------------------------------------------------------------------------------
    @staticmethod
    def log_mel(wave) -> np.ndarray:
        """float32 16 kHz mono waveform -> log-mel (128, n_frames), n_frames = max(n_samples, 8000) // 160."""
        from qasr_jax.io.audio import log_mel

        return np.asarray(log_mel(wave))

    def _pad_feats(self, feats) -> tuple[np.ndarray, np.ndarray]:
        feats = np.asarray(feats, np.float32)
        mels = self.config.audio.num_mel_bins
        if feats.ndim != 2 or feats.shape[0] != mels:
            raise ValueError(f"features must be ({mels}, n_frames) log-mel, got shape {feats.shape}")
        n = feats.shape[1]
        if n == 0:
            raise ValueError("features have no frames")
        padded = np.zeros((1, mels, frame_bucket(n, self.config.audio)), np.float32)  # new lengths reuse compiles
        padded[0, :, :n] = feats
        return padded, np.array([n], np.int32)

    # -- the public numeric API ----------------------------------------------------------------------------
    def encode(self, feats) -> np.ndarray:
        """Log-mel (128, n_frames) -> projector output (n_audio_tokens, text_hidden) as float32 numpy."""
        out, n_tokens = self.engine.encode(*self._pad_feats(feats))
        return np.asarray(out[0, : int(n_tokens[0])], np.float32)

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
        padded = np.zeros((1, round_up(length, 64)), np.int32)
        padded[0, :length] = ids
        mask = np.zeros(padded.shape, bool)
        mask[0, :length] = True
        out = self.engine.logits(padded, x, n, mask)
        return np.asarray(out[0, :length], np.float32)


def load(path: str | os.PathLike, dtype: str = "float32", attention_impl: str = "auto", mesh=None,
         sharding=None, quantize: str | None = None, layers: str = "auto") -> Model:
    """Load a Qwen3-ASR / ForcedAligner folder (official or -hf safetensors layout, or a qasr_jax Orbax export)
    or hub id.

    ``attention_impl`` picks the encoder's windowed attention: "auto" (the Pallas kernel where it applies, else
    XLA), "xla", or "pallas" (an error where the kernel cannot run). ``mesh`` ("data=4,model=2", a
    ``jax.sharding.Mesh``) and ``sharding`` ("data", "tensor", "fsdp") spread the model over devices. Parameters
    are read one at a time and placed (each device receiving only its shards) before the next is read, so the
    peak memory stays near the size of the loaded parameters. ``quantize="int8"``: int8 layer weights and LM head
    (one device; combinable with ``dtype``), about 1.5-2x faster decode steps and a 1.4x faster encoder on CPU.
    ``layers``: "scan" compiles one decoder layer instead of 28 (the default on GPU and TPU), "unrolled" (the
    default on CPU) the fastest CPU step; "auto" picks by platform.
    """
    from qasr_jax.convert.orbax_io import is_orbax_export, restore_orbax

    _check_dtype(dtype)
    _resolve_layers(layers)  # a bad value fails before anything is read
    path = resolve_model_path(path)
    layout = _layout(mesh, sharding)
    if is_orbax_export(path):
        params, cfg = restore_orbax(path, dtype=dtype, placement=layout or "device")
    else:
        from qasr_jax.convert.checkpoint import load_hf_params

        cfg = load_config(path)
        params = load_hf_params(path, cfg, dtype, place=_placer(layout, cfg, dtype))
    return Model(cfg, params, dtype=dtype, attention_impl=attention_impl, mesh=layout, quantize=quantize,
                 source=path, layers=layers)


def _placer(layout, cfg: ModelConfig, dtype: str):
    """(param path, host array) -> the parameter on its device(s)."""
    if layout is None:
        return lambda path, host: jax.device_put(host)
    from jax.sharding import NamedSharding

    from qasr_jax.modeling.sharding import head_units, logical_axes, place_leaf

    units = head_units(cfg)

    def place(path, host):
        spec = layout.spec(logical_axes("/".join(path), host.ndim), host.shape, units)
        return place_leaf(host, NamedSharding(layout.mesh, spec), dtype)

    return place
