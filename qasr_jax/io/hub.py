"""Resolve a model argument: a local folder as it is, or a Hugging Face Hub id downloaded once and cached; and the
files shipped in ``qasr_jax/data`` (the bundled models, an example clip, the VAD weights)."""

from __future__ import annotations

import importlib.resources
import os

# What a checkpoint folder needs (weights, config, tokenizer, front-end settings); nothing else is fetched.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


# Models shipped inside the package (short name -> folder under qasr_jax/data): trained here, see docs/tiny_model.md.
BUNDLED = {"tiny-en": "tiny-en/model-hf", "tiny-en-official": "tiny-en/model"}


def data_path(name: str) -> str:
    """The installed path of a file or folder shipped in ``qasr_jax/data``."""
    return str(importlib.resources.files("qasr_jax").joinpath("data", name))


def bundled_model(name: str = "tiny-en") -> str:
    """The folder of a model shipped with qasr-jax: "tiny-en" (-hf layout) or "tiny-en-official" (the released
    layout): a 2.9 M-parameter English model trained on synthetic speech, for examples and tests."""
    if name not in BUNDLED:
        raise ValueError(f"no bundled model {name!r}; choose one of {sorted(BUNDLED)}")
    return data_path(BUNDLED[name])


def example_audio() -> str:
    """The path of a clip shipped with qasr-jax, for examples that must run without an upload: tiny-en's first
    held-out clip (espeak-ng saying "girl king two train", 16 kHz Ogg Vorbis; tests/data/tiny_en's heldout_0000)."""
    return data_path("tiny-en/example.ogg")


def resolve_model_path(model: str | os.PathLike) -> str:
    """A local checkpoint folder, a bundled model's short name ("tiny-en"), or a hub id such as
    "Qwen/Qwen3-ASR-0.6B" downloaded with huggingface_hub."""
    path = os.fspath(model)
    if os.path.isdir(path):
        return path
    if path in BUNDLED:
        return bundled_model(path)
    if os.path.exists(path):
        raise ValueError(f"model {path!r} is a file; pass the checkpoint folder that holds config.json")
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_id:
        raise FileNotFoundError(f"model folder {path!r} does not exist; pass a checkpoint folder or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo: one actionable message
        raise FileNotFoundError(
            f"could not download {path!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "If this machine is offline, download the checkpoint elsewhere and pass its local folder instead."
        ) from e
