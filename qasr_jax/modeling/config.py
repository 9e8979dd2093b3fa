"""Frozen model configs, read from either published config.json schema, plus named presets.

Two schemas exist: the official one (``thinker_config.{audio_config,text_config}``, as in ``Qwen/Qwen3-ASR-0.6B``)
and the transformers-native one (``audio_config``/``text_config`` at top level, as in the ``-hf`` repos).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# What a command or function loads when no model is named: hub ids, downloaded once and cached.
DEFAULT_MODEL = "Qwen/Qwen3-ASR-0.6B"
DEFAULT_ALIGNER = "Qwen/Qwen3-ForcedAligner-0.6B"

# The longest audio decoded as one piece, in seconds (the official toolkit's limit): longer audio is cut at quiet
# points into pieces of at most this length; the server refuses longer uploads unless told otherwise.
MAX_AUDIO_SECONDS = 1200.0


class ConfigError(ValueError):
    """A config.json that is missing a field or contradicts itself."""


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """The AuT encoder and its projector."""

    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    output_dim: int
    num_mel_bins: int = 128
    n_window: int = 50
    n_window_infer: int = 800
    downsample_hidden_size: int = 480

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ConfigError(f"audio d_model={self.d_model} is not divisible by encoder_attention_heads={self.heads}")
        if self.n_window_infer % self.chunk_frames:
            raise ConfigError(
                f"audio n_window_infer={self.n_window_infer} must be a multiple of 2 * n_window = {self.chunk_frames}"
            )

    @property
    def chunk_frames(self) -> int:
        """Mel frames per conv chunk (1 s for the released models)."""
        return 2 * self.n_window

    @property
    def tokens_per_chunk(self) -> int:
        """Encoder tokens out of one full chunk after three stride-2 convs (13 for 100 frames)."""
        return conv_out_len(self.chunk_frames)

    @property
    def chunks_per_window(self) -> int:
        return self.n_window_infer // self.chunk_frames

    @property
    def window_tokens(self) -> int:
        """Tokens per attention window: 13 * n_window_infer / (2 * n_window) = 104 (8 s) for the released models."""
        return self.tokens_per_chunk * self.chunks_per_window

    @property
    def freq_bins(self) -> int:
        """Mel bins left after the three stride-2 convs (16 for 128 mels)."""
        return conv_out_len(self.num_mel_bins)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 65536

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ConfigError(
                f"text num_attention_heads={self.heads} is not a multiple of num_key_value_heads={self.kv_heads}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A whole model: ``num_labels`` is None for ASR (LM head) and the class count for the forced aligner; the
    token ids are its tokenizer's ``<|audio_pad|>`` and ``<timestamp>`` (the aligner's slot marker; None for ASR)."""

    audio: AudioConfig
    text: TextConfig
    audio_token_id: int
    num_labels: int | None = None
    timestamp_token_id: int | None = None
    timestamp_segment_ms: float = 80.0
    support_languages: tuple[str, ...] = ()

    def __post_init__(self):
        if self.is_aligner and self.timestamp_token_id is None:
            raise ConfigError("a forced aligner config needs timestamp_token_id, the id of its <timestamp> slots")
        if self.audio.output_dim != self.text.hidden_size:
            raise ConfigError(
                f"audio output_dim={self.audio.output_dim} must equal text hidden_size={self.text.hidden_size}: "
                "the projector's output replaces token embeddings"
            )

    @property
    def is_aligner(self) -> bool:
        return self.num_labels is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of ``to_dict`` (the form qasr_jax writes beside an Orbax export)."""
        d = dict(d)
        d["audio"] = AudioConfig(**d["audio"])
        d["text"] = TextConfig(**d["text"])
        d["support_languages"] = tuple(d.get("support_languages") or ())
        return cls(**d)


def conv_out_len(n: int) -> int:
    """Length after three (kernel 3, stride 2, pad 1) convolutions: ceil(ceil(ceil(n/2)/2)/2); 0 stays 0."""
    for _ in range(3):
        n = (n + 1) // 2
    return n


def audio_token_count(n_frames: int, audio: AudioConfig) -> int:
    """Number of encoder tokens for ``n_frames`` valid mel frames (13 per full chunk plus the remainder's)."""
    full, rem = divmod(n_frames, audio.chunk_frames)
    return full * audio.tokens_per_chunk + conv_out_len(rem)


def _need(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"config.json: missing field {where}.{key}")
    return d[key]


def _rope_theta(t: dict, where: str) -> float:
    """rope_theta from either the flat field or transformers 5's ``rope_parameters``; only plain RoPE is supported.

    The official config's "interleaved MRoPE" has three identical position streams for audio-only prompts,
    which makes it plain 1-D RoPE; any scaling type (yarn, linear, ...) is not what the released models use.
    """
    params = t.get("rope_parameters") or {}
    scaling = t.get("rope_scaling") or {}
    for src in (params, scaling):
        rope_type = src.get("rope_type", src.get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"config.json: {where}: rope_type={rope_type!r} is not supported (only plain RoPE)")
    if "rope_theta" in t and "rope_theta" in params and float(t["rope_theta"]) != float(params["rope_theta"]):
        raise ConfigError(
            f"config.json: {where}.rope_theta={t['rope_theta']} contradicts "
            f"{where}.rope_parameters.rope_theta={params['rope_theta']}"
        )
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(_need(t, "rope_theta", where))


def _audio_from(a: dict, where: str) -> AudioConfig:
    act = a.get("activation_function", "gelu")
    if act != "gelu":
        raise ConfigError(f"config.json: {where}.activation_function={act!r}; the AuT encoder uses exact 'gelu'")
    return AudioConfig(
        d_model=_need(a, "d_model", where),
        layers=_need(a, "encoder_layers", where),
        heads=_need(a, "encoder_attention_heads", where),
        ffn_dim=_need(a, "encoder_ffn_dim", where),
        output_dim=_need(a, "output_dim", where),
        num_mel_bins=a.get("num_mel_bins", 128),
        n_window=_need(a, "n_window", where),
        n_window_infer=_need(a, "n_window_infer", where),
        downsample_hidden_size=a.get("downsample_hidden_size", 480),
    )


def _text_from(t: dict, where: str, tie: bool) -> TextConfig:
    heads = _need(t, "num_attention_heads", where)
    hidden = _need(t, "hidden_size", where)
    return TextConfig(
        vocab_size=_need(t, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_need(t, "intermediate_size", where),
        layers=_need(t, "num_hidden_layers", where),
        heads=heads,
        kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or hidden // heads,
        rope_theta=_rope_theta(t, where),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=tie,
        max_position_embeddings=t.get("max_position_embeddings", 65536),
    )


def _token_id(value, token: str, folder: str | None) -> int:
    """A token id from config.json, else from the checkpoint's tokenizer (the official ASR configs name no
    ``<timestamp>``): never a Qwen id assumed for a vocabulary that may not be Qwen's."""
    if value is None and folder is not None:
        from qasr_jax.io.tokenizer import Tokenizer

        value = Tokenizer.from_dir(folder).token_to_id(token)
    if value is None:
        raise ConfigError(f"config.json names no {token} id, and no tokenizer beside it has that token")
    return int(value)


def config_from_hf_dict(cfg: dict, folder: str | None = None) -> ModelConfig:
    """Build a ModelConfig from a config.json dict of either schema; a token id it lacks is read from the
    tokenizer in the checkpoint ``folder``."""
    if "thinker_config" in cfg:  # official layout
        th = cfg["thinker_config"]
        where = "thinker_config"
        a, t = _need(th, "audio_config", where), _need(th, "text_config", where)
        is_aligner = "forced_aligner" in str(cfg.get("model_type", "")) or "classify_num" in th
        num_labels = _need(th, "classify_num", where) if is_aligner else None
        tie = bool(t.get("tie_word_embeddings", th.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))))
        timestamp_token_id = cfg.get("timestamp_token_id", th.get("timestamp_token_id"))
        segment = cfg.get("timestamp_segment_time", th.get("timestamp_segment_time", 80.0))
        audio_token_id = th.get("audio_token_id")
        langs = cfg.get("support_languages") or ()
        a_where, t_where = f"{where}.audio_config", f"{where}.text_config"
    elif "audio_config" in cfg and "text_config" in cfg:  # transformers-native (-hf) layout
        a, t = cfg["audio_config"], cfg["text_config"]
        archs = cfg.get("architectures") or []
        is_aligner = any("TokenClassification" in x for x in archs)
        if is_aligner:
            num_labels = cfg.get("num_labels") or len(_need(cfg, "id2label", "<top>"))
        else:
            num_labels = None
        tie = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", True))) and not is_aligner
        timestamp_token_id = cfg.get("timestamp_token_id")
        segment = cfg.get("timestamp_segment_time", 80.0)
        audio_token_id = cfg.get("audio_token_id")
        langs = cfg.get("support_languages") or ()
        a_where, t_where = "audio_config", "text_config"
    else:
        raise ConfigError(
            "config.json has neither 'thinker_config' (official layout) nor 'audio_config' and 'text_config' "
            "(transformers-native layout)"
        )
    return ModelConfig(
        audio=_audio_from(a, a_where),
        text=_text_from(t, t_where, tie),
        num_labels=num_labels,
        audio_token_id=_token_id(audio_token_id, "<|audio_pad|>", folder),
        timestamp_token_id=_token_id(timestamp_token_id, "<timestamp>", folder) if is_aligner else None,
        timestamp_segment_ms=float(segment),
        support_languages=tuple(langs),
    )


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` from a checkpoint folder (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {path!r}: pass a checkpoint folder that holds one")
    with open(file) as f:
        return config_from_hf_dict(json.load(f), os.path.dirname(file))


def _text(hidden: int, intermediate: int, vocab: int, tie: bool) -> TextConfig:
    return TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, layers=28, heads=16, kv_heads=8,
        head_dim=128, tie_word_embeddings=tie,
    )


QWEN_AUDIO_PAD, QWEN_TIMESTAMP = 151676, 151705  # the released models' tokenizer: <|audio_pad|>, <timestamp>

PRESETS: dict[str, ModelConfig] = {
    "asr-0.6b": ModelConfig(
        audio=AudioConfig(d_model=896, layers=18, heads=14, ffn_dim=3584, output_dim=1024),
        text=_text(1024, 3072, 151936, True), audio_token_id=QWEN_AUDIO_PAD,
    ),
    "asr-1.7b": ModelConfig(
        audio=AudioConfig(d_model=1024, layers=24, heads=16, ffn_dim=4096, output_dim=2048),
        text=_text(2048, 6144, 151936, True), audio_token_id=QWEN_AUDIO_PAD,
    ),
    "aligner-0.6b": ModelConfig(
        audio=AudioConfig(d_model=1024, layers=24, heads=16, ffn_dim=4096, output_dim=1024),
        text=_text(1024, 3072, 152064, False), audio_token_id=QWEN_AUDIO_PAD,
        num_labels=5000, timestamp_token_id=QWEN_TIMESTAMP,
    ),
    # Small enough to build, convert and run in a test in seconds; same structure (GQA, 8 s windows, 128 mels).
    "tiny": ModelConfig(
        audio=AudioConfig(d_model=32, layers=2, heads=4, ffn_dim=64, output_dim=48, downsample_hidden_size=8),
        text=TextConfig(
            vocab_size=151936, hidden_size=48, intermediate_size=96, layers=2, heads=4, kv_heads=2, head_dim=16,
            tie_word_embeddings=True,
        ),
        audio_token_id=QWEN_AUDIO_PAD,
    ),
}


def preset(name: str) -> ModelConfig:
    """A named preset: 'asr-0.6b', 'asr-1.7b', 'aligner-0.6b' or 'tiny'."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
