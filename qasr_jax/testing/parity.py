"""The PyTorch reference's side of a parity check (needs the ``test`` extra): its feature extraction, a fixed
prompt, its logits, greedy ids, loss and gradients, and the relative error every parity test measures."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor

from qasr_jax.io.prompts import build_prompt_ids
from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.modeling.config import audio_token_count

# The released vocabulary's chat prompt around the audio, and a transcript after it.
PREFIX = [151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669]  # system turn, user turn, <|audio_start|>
SUFFIX = [151670, 151645, 198, 151644, 77091, 198]  # <|audio_end|><|im_end|>\n<|im_start|>assistant\n
TEXT = [11528, 6364, 151704, 9707, 1879, 13]  # "language English<asr_text>Hello world."
ZERO_GRADIENT = ("self_attn.k_proj.bias",)  # exactly zero in exact arithmetic: softmax ignores a shift of all keys


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def reference_inputs(wave):
    """The reference feature extractor on one waveform: (features (1, 128, T), mask (1, T)) as torch tensors."""
    fe = Qwen3ASRFeatureExtractor()
    out = fe(wave, sampling_rate=16000, padding="longest", return_tensors="pt", return_attention_mask=True)
    return out["input_features"], out["attention_mask"]


def prompt(n_audio: int) -> list[int]:
    return PREFIX + [151676] * n_audio + SUFFIX + TEXT


def reference_prompt_logits(ck, wave) -> tuple[list[int], np.ndarray]:
    """The prompt ids for ``wave`` and the reference model's float32 logits over them: (ids, (len, V))."""
    feats, mask = reference_inputs(wave)
    ids = prompt(audio_token_count(int(mask.sum()), ck.cfg.audio))
    with torch.no_grad():
        ref = ck.torch_model(input_ids=torch.tensor([ids]), input_features=feats, input_features_mask=mask).logits
    return ids, ref[0].numpy()


def reference_ids(ck, tok, wave, language=None, context="", new: int = 10) -> list[int]:
    """transformers' greedy generate on one input alone, from the same prompt ids."""
    torch_model = ck.torch_model
    feats, mask = reference_inputs(wave)
    n_audio = audio_token_count(int(mask.sum()), ck.cfg.audio)
    ids = torch.tensor([build_prompt_ids(tok, n_audio, context, language)])
    with torch.no_grad():
        out = torch_model.generate(input_ids=ids, input_features=feats, input_features_mask=mask,
                                   max_new_tokens=new, do_sample=False, eos_token_id=list(tok.eos_ids))
    gen = out[0, ids.shape[1]:].tolist()
    return gen[: next((i for i, t in enumerate(gen) if t in tok.eos_ids), len(gen))]


def reference_loss_and_grads(ck, folder: str, batch: list[dict]) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' loss and gradients: each row is the chat prompt then the target tokenized by transformers'
    own tokenizer with <|im_end|>; labels are -100 except at the target tokens, right-padded batch."""
    tok = AutoTokenizer.from_pretrained(folder)
    fe = Qwen3ASRFeatureExtractor()
    alone = [fe([r["audio"]], sampling_rate=16000, padding="longest", return_tensors="pt",
                return_attention_mask=True) for r in batch]  # each clip as if alone
    frames = max(a["input_features"].shape[2] for a in alone)
    feats = torch.zeros(len(batch), 128, frames)
    feat_mask = torch.zeros(len(batch), frames, dtype=torch.long)
    ids, labels = [], []
    for i, (r, a) in enumerate(zip(batch, alone)):
        n = a["input_features"].shape[2]
        feats[i, :, :n], feat_mask[i, :n] = a["input_features"][0], a["attention_mask"][0]
        prefix = build_prompt_ids(Tokenizer.from_dir(folder), audio_token_count(int(a["attention_mask"].sum()),
                                                                                 ck.cfg.audio), r["prompt"])
        target = tok(r["text"] + "<|im_end|>", add_special_tokens=False).input_ids
        ids.append(prefix + target)
        labels.append([-100] * len(prefix) + target)
    width = max(map(len, ids))
    pad = lambda x, v: x + [v] * (width - len(x))  # noqa: E731
    input_ids = torch.tensor([pad(x, tok.pad_token_id) for x in ids])  # <|endoftext|> of this checkpoint
    mask = torch.tensor([pad([1] * len(x), 0) for x in ids])
    model = ck.torch_model
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=mask, input_features=feats, input_features_mask=feat_mask,
                labels=torch.tensor([pad(x, -100) for x in labels]))
    out.loss.backward()
    grads = {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()}
    model.zero_grad()
    return float(out.loss), grads


def assert_grads_close(ours: dict, ref: dict, tol: float) -> None:
    """Every gradient (checkpoint names) within ``tol`` of the reference's, relative to its max; the
    ``ZERO_GRADIENT`` ones both near zero."""
    assert set(ours) == set(ref)
    overall = max(np.abs(g).max() for g in ref.values())
    for name, want in ref.items():
        got = ours[name]
        assert got.shape == want.shape, name
        if name.endswith(ZERO_GRADIENT):
            assert np.abs(got).max() <= 1e-6 * overall and np.abs(want).max() <= 1e-6 * overall, name
            continue
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= tol, (name, err)
