"""Silero's own VAD as the reference for ``qasr_jax.vad.network`` (needs the ``test`` extra: silero-vad, onnxruntime,
torch).

``silero_vad_16k.safetensors`` inside the silero-vad 6.2.3 wheel holds other weights than the v6 model its ONNX and
TorchScript files run (every tensor but the STFT basis differs), so ours are written from the TorchScript model's
16 kHz branch by ``export_weights`` under Silero's own safetensors names; ``tests/vad/test_vad.py`` checks the shipped
file against it.
"""

from __future__ import annotations

import importlib.resources

import numpy as np

# Silero's safetensors names -> the 16 kHz branch of its TorchScript model (silero_vad.jit).
_JIT_NAMES = {
    "stft_conv.weight": "_model.stft.forward_basis_buffer",
    **{f"conv{i + 1}.{kind}": f"_model.encoder.{i}.reparam_conv.{kind}"
       for i in range(4) for kind in ("weight", "bias")},
    **{f"lstm_cell.{kind}": f"_model.decoder.rnn.{kind}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "final_conv.weight": "_model.decoder.decoder.2.weight",
    "final_conv.bias": "_model.decoder.decoder.2.bias",
}


def silero_file(name: str) -> str:
    """The path of a file in the installed silero-vad package's data folder."""
    return str(importlib.resources.files("silero_vad").joinpath("data", name))


def v6_weights() -> dict[str, np.ndarray]:
    """Silero VAD v6's 16 kHz weights as its TorchScript model holds them, under Silero's safetensors names."""
    import torch

    state = torch.jit.load(silero_file("silero_vad.jit"), map_location="cpu").state_dict()
    return {ours: state[theirs].numpy().copy() for ours, theirs in _JIT_NAMES.items()}


def export_weights(path: str) -> None:
    """Write ``v6_weights()`` to ``path`` as safetensors (how ``qasr_jax/data/silero_vad_16k.safetensors`` is made)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in v6_weights().items()}, path)


def onnx_model():
    """Silero's default ONNX model under onnxruntime (its ``OnnxWrapper``, as ``load_silero_vad(onnx=True)``)."""
    from silero_vad import load_silero_vad

    return load_silero_vad(onnx=True)


def reference_probabilities(wave: np.ndarray) -> np.ndarray:
    """Silero's per-512-sample speech probabilities of a 16 kHz waveform, from its ONNX model under onnxruntime."""
    import torch

    out = onnx_model().audio_forward(torch.from_numpy(np.asarray(wave, np.float32))[None], 16000)
    return out.numpy()[0]


def reference_segments(wave: np.ndarray, **options) -> list[tuple[int, int]]:
    """Silero's ``get_speech_timestamps`` on a 16 kHz waveform with its ONNX model, as (start, end) samples."""
    import torch
    from silero_vad import get_speech_timestamps

    spans = get_speech_timestamps(torch.from_numpy(np.asarray(wave, np.float32)), onnx_model(), **options)
    return [(s["start"], s["end"]) for s in spans]
