"""Training recipes: the auxiliary CTC loss on the encoder (equal to torch's CTC), SpecAugment and teacher-forcing
noise (only where they belong, seeded), the cosine schedule, a CTC head that never reaches a checkpoint, and a
run that stops at the first non-finite loss without writing it."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qasr_jax
from qasr_jax.testing import DATA, speech, synthetic
from qasr_jax.training.data import Augment, collate, examples_from_records, read_manifest
from qasr_jax.training.finetune import NonFiniteError, finetune
from qasr_jax.training.trainer import CTC_HEAD, TrainConfig, Trainer, ctc_loss, schedule

NEW_WORDS = os.path.join(DATA, "newwords", "newwords.jsonl")
TEXTS = ["language English<asr_text>the violin and the rocket", "language English<asr_text>a b c d e f g",
         "language English<asr_text>hello world again"]


def batch_of(tok, cfg, **kw):
    waves = [speech("hello_en.wav"), synthetic(2.5, 1), synthetic(1.2, 2)]
    examples = examples_from_records([{"audio": w, "text": t} for w, t in zip(waves, TEXTS)])
    return collate(waves, examples, tok, cfg, rows=4, **kw)


def test_ctc_loss_equals_torch():
    rng = np.random.default_rng(0)
    rows, seq, hidden, classes, width = 3, 11, 8, 13, 5
    head = {"kernel": rng.normal(size=(hidden, classes)).astype(np.float32),
            "bias": rng.normal(size=(classes,)).astype(np.float32)}
    audio = rng.normal(size=(rows, seq, hidden)).astype(np.float32)
    n_tokens = np.array([11, 7, 9])
    lengths = np.array([5, 2, 3])
    labels = rng.integers(0, classes - 1, (rows, width)).astype(np.int32)
    labels[0, 1] = labels[0, 2]  # a repeated label needs a blank between: CTC's special case
    batch = {"ctc_labels": labels, "ctc_paddings": (np.arange(width)[None] >= lengths[:, None]).astype(np.float32),
             "weights": np.array([[1.0], [1.0], [0.0]], np.float32)}  # the last row is padding: not counted
    ours = float(ctc_loss(head, jnp.asarray(audio), jnp.asarray(n_tokens), batch))
    logp = torch.log_softmax(torch.tensor(audio @ head["kernel"] + head["bias"]), -1).transpose(0, 1)
    per_row = torch.nn.functional.ctc_loss(logp, torch.tensor(labels, dtype=torch.long), torch.tensor(n_tokens),
                                           torch.tensor(lengths), blank=classes - 1, reduction="none")
    want = float(per_row[:2].sum())
    assert abs(ours - want) <= 1e-5 * abs(want)


def test_collate_gives_the_transcript_tokens_as_ctc_labels(asr_dir, tok):
    cfg = qasr_jax.load(asr_dir).config
    b = batch_of(tok, cfg)
    for r, text in enumerate(TEXTS + TEXTS[:1]):  # the padding row repeats the first
        body = tok.encode(text.split("<asr_text>")[1])
        n = int((b.ctc_paddings[r] == 0).sum())
        assert b.ctc_labels[r, :n].tolist() == body and (b.ctc_paddings[r, n:] == 1).all()
    plain = batch_of(tok, cfg, augment=Augment(), rng=np.random.default_rng(0))  # everything off: no change
    assert all(np.array_equal(getattr(b, f), getattr(plain, f)) for f in ("ids", "feats", "targets"))


def test_augment_touches_only_features_and_transcript_inputs(asr_dir, tok):
    cfg = qasr_jax.load(asr_dir).config
    clean = batch_of(tok, cfg)
    aug = Augment(spec_augment=True, freq_width=30, time_fraction=0.2, token_noise=0.5)
    noisy = batch_of(tok, cfg, augment=aug, rng=np.random.default_rng(1))
    again = batch_of(tok, cfg, augment=aug, rng=np.random.default_rng(1))
    assert np.array_equal(noisy.ids, again.ids) and np.array_equal(noisy.feats, again.feats)  # seeded
    for f in ("targets", "positions", "weights", "ctc_labels", "token_mask", "n_frames"):
        assert np.array_equal(getattr(noisy, f), getattr(clean, f)), f  # labels never change
    changed = np.argwhere(noisy.ids != clean.ids)
    assert len(changed) > 3
    asr_text = tok.asr_text_id
    for r, c in changed:
        start = int(np.argmax(clean.ids[r] == asr_text)) + 1
        stop = int(clean.token_mask[r].sum()) - 1  # <|im_end|> is a label only
        assert start <= c < stop and noisy.ids[r, c] < tok.endoftext_id
    for r, n in enumerate(clean.n_frames):
        assert np.array_equal(noisy.feats[r, :, n:], clean.feats[r, :, n:])  # padding frames untouched
        assert not np.array_equal(noisy.feats[r, :, :n], clean.feats[r, :, :n])


def test_cosine_schedule_warms_up_then_ends_at_its_floor():
    config = TrainConfig(lr=1e-3, warmup_ratio=0.1, steps=100, decay="cosine", final_lr_ratio=0.05)
    lr = schedule(config)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-3) and float(lr(100)) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="decay"):
        TrainConfig(decay="step")
    with pytest.raises(ValueError, match="ctc_weight"):
        TrainConfig(ctc_weight=0.5, lora_rank=4)


def test_ctc_head_trains_the_encoder_and_is_never_exported(asr_dir, tok):
    from qasr_jax.training.data import stack

    encoder = {}
    for weight in (0.0, 0.5):
        model = qasr_jax.load(asr_dir)
        trainer = Trainer(model, TrainConfig(lr=1e-3, warmup_ratio=0.0, batch_size=4, steps=2, dtype="float32",
                                             ctc_weight=weight))
        state, metrics = trainer.step(trainer.init_state(), stack([batch_of(tok, model.config)]))
        encoder[weight] = np.asarray(state.params["audio_tower"]["layers_0"]["fc1"]["kernel"])
        params = trainer.params(state)
        assert CTC_HEAD not in params
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(qasr_jax.load(asr_dir).params)
    assert np.isfinite(float(metrics["ctc_loss"])) and float(metrics["ctc_loss"]) > 0
    assert CTC_HEAD in state.params
    assert not np.array_equal(encoder[0.0], encoder[0.5])  # the CTC loss reached the encoder


def test_a_non_finite_loss_stops_the_run_and_is_never_written(asr_dir, tok, tmp_path):
    """An absurd learning rate blows the weights up: the run stops at the first non-finite step, naming it and its
    manifest lines, and every checkpoint on disk holds finite weights."""
    import orbax.checkpoint as ocp

    model = qasr_jax.load(asr_dir)
    train = read_manifest(NEW_WORDS)
    config = TrainConfig(lr=1e12, warmup_ratio=0.0, batch_size=4, steps=6, dtype="float32")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .*newwords.jsonl line \d+") as err:
        finetune(model, tok, train, str(out), config, save_every=1, keep=10)
    failed = int(str(err.value).split("step ")[1].split(":")[0])
    saved = sorted(int(s) for s in os.listdir(out / "checkpoints"))
    assert saved == list(range(1, failed))
    for step in saved:
        restored = ocp.StandardCheckpointer().restore(str(out / "checkpoints" / str(step) / "state"))
        assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored))
