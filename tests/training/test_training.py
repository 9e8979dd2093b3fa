"""Fine-tuning against the reference: the loss and every gradient equal transformers' native model (labels masked by
position within each row, built here from transformers' own tokenizer), the left-padding trap, one step on an
8-device mesh equal to one device, LoRA through qwix, frozen parts, and the grouped conv stack's gradient.

Runs, resume and export are in tests/training/test_finetune.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

import qasr_jax
from qasr_jax.modeling.encoder import _conv_stack
from qasr_jax.testing import ROOT, speech, synthetic
from qasr_jax.testing.tokenizer_files import with_tokenizer
from qasr_jax.training.data import examples_from_records, step_batch
from qasr_jax.training.parts import merge_trees
from qasr_jax.training.trainer import TrainConfig, Trainer, loss_and_grads
from qasr_jax.testing.parity import assert_grads_close, reference_loss_and_grads

TOL = 1e-4
# The encoder's key biases shift every score of a query by the same amount, which softmax ignores: their exact
# gradient is zero, and both sides return float32 rounding noise (~1e-8 of the other gradients) for them.

TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Qwen.", "Speech recognition in JAX."]
PROMPTS = ["", "fox, dog", "A much longer context: names like Qwen, JAX and Flax, and some terms.", "JAX"]


@pytest.fixture(scope="module")
def folder(checkpoints, tmp_path_factory):
    """The tiny random ASR checkpoint (-hf layout) with the real tokenizer."""
    return with_tokenizer(checkpoints("asr").hf, tmp_path_factory, "official")


@pytest.fixture(scope="module")
def model(folder):
    return qasr_jax.load(folder)


def rows(case: str) -> list[dict]:
    """Batches of four rows: the same clip (only the targets' lengths differ: right padding) or mixed audio
    lengths, with or without prompts of different lengths."""
    if case.startswith("same-audio"):
        waves = [speech("hello_en.wav")] * 4
    else:
        waves = [speech("hello_en.wav"), synthetic(2.7, 1), synthetic(0.7, 2), speech("zh.wav")]
    prompts = PROMPTS if case.endswith("prompts") else [""] * 4
    return [{"audio": w, "text": f"language English<asr_text>{t}", "prompt": p}
            for w, t, p in zip(waves, TEXTS, prompts)]



@pytest.mark.parametrize("case", ["same-audio", "same-audio-prompts", "mixed", "mixed-prompts"])
def test_loss_and_grads_match_reference(checkpoints, folder, model, case):
    """Loss and all 69 gradient tensors (checkpoint names and shapes) equal transformers' within 1e-4."""
    batch = rows(case)
    ref_loss, ref_grads = reference_loss_and_grads(checkpoints("asr"), folder, batch)
    loss, grads = loss_and_grads(model, batch)
    assert abs(loss - ref_loss) / abs(ref_loss) <= TOL
    assert_grads_close(grads, ref_grads, TOL)


def test_left_padding_trap(folder, model):
    """Long and short prompts in one batch: its loss (and gradient) is the token-weighted mean of its rows' own,
    so no row's labels moved with another's padding."""
    tok = AutoTokenizer.from_pretrained(folder)
    batch = rows("mixed-prompts")
    loss, grads = loss_and_grads(model, batch)
    counts, losses, row_grads = [], [], []
    for r in batch:
        counts.append(len(tok(r["text"] + "<|im_end|>", add_special_tokens=False).input_ids))
        one_loss, one_grads = loss_and_grads(model, [r])
        losses.append(one_loss)
        row_grads.append(one_grads)
    weights = np.array(counts, np.float64) / sum(counts)
    assert abs(loss - float(np.dot(weights, losses))) <= 1e-6 * abs(loss)
    mixed = {name: sum(w * g[name].astype(np.float64) for w, g in zip(weights, row_grads)) for name in grads}
    assert_grads_close(grads, mixed, 1e-5)


def test_loss_and_grads_needs_asr_text(model):
    with pytest.raises(ValueError, match=r"batch row 1: 'text' must hold exactly one <asr_text>"):
        loss_and_grads(model, [{"audio": synthetic(1.0), "text": "language English<asr_text>ok"},
                               {"audio": synthetic(1.0), "text": "no tag here"}])


def test_grouped_conv_stack_gradient_equals_one_pass(model):
    """The conv stack runs long inputs a group of chunks at a time; its custom gradient equals the one-pass one."""
    params = model.params["audio_tower"]
    convs = [(params[f"conv2d{i}"]["kernel"], params[f"conv2d{i}"]["bias"]) for i in (1, 2, 3)]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 128, 100, 1)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(np.shape(_conv_stack(x, convs, jnp.float32))))

    def grads(group):
        f = lambda x, convs: jnp.sum(_conv_stack(x, convs, jnp.float32, group=group) * cot)  # noqa: E731
        return jax.grad(f, argnums=(0, 1))(x, convs)

    whole, grouped = grads(7), grads(3)
    for a, b in zip(jax.tree_util.tree_leaves(grouped), jax.tree_util.tree_leaves(whole)):
        assert np.abs(np.asarray(a) - b).max() <= 1e-5 * np.abs(b).max()


# ----------------------------------------------------------------------------------------------------------------
# Steps: LoRA, freezing


def one_step_batch(folder, model):
    from qasr_jax.io.tokenizer import Tokenizer

    return step_batch(examples_from_records(rows("mixed-prompts")), Tokenizer.from_dir(folder), model.config, 4, 1)


def test_lora_starts_as_base_and_merges_exactly(folder, model):
    """Adapters start with B = 0 (the first step's loss is the base model's); after training, folding them into
    the weights (the export path) gives the adapted model's logits."""
    batch = one_step_batch(folder, model)
    base_loss, _ = loss_and_grads(model, rows("mixed-prompts"))
    config = TrainConfig(lr=1e-2, warmup_ratio=0.0, steps=10, dtype="float32", lora_rank=4,
                         lora_targets=("decoder", "encoder"))
    trainer = Trainer(model, config)
    state = trainer.init_state()
    for i in range(3):
        state, metrics = trainer.step(state, batch)
        if i == 0:
            assert abs(float(metrics["loss"]) - base_loss) <= 1e-5 * base_loss
    assert float(metrics["loss"]) < base_loss
    adapters = jax.tree_util.tree_leaves(state.params)
    assert adapters and all(np.isfinite(np.asarray(a)).all() for a in adapters)
    names = [k for k, _ in _flat(state.params)]
    assert any(n.startswith("audio_tower/layers_0/q/") for n in names)
    assert any(n.startswith("decoder/layers_1/gate_up/") for n in names)
    arrays = trainer.put_batch(batch)[0]
    forward = jax.jit(lambda p: trainer.engine.forward(p, arrays["ids"], arrays["feats"], arrays["n_frames"],
                                                       arrays["token_mask"], arrays["positions"]))
    adapted = np.asarray(forward(merge_trees(state.params, model.params)))
    merged = np.asarray(jax.jit(lambda p: model.engine.forward(
        p, arrays["ids"], arrays["feats"], arrays["n_frames"], arrays["token_mask"], arrays["positions"]))(
        trainer.params(state)))
    base = np.asarray(jax.jit(lambda p: model.engine.forward(
        p, arrays["ids"], arrays["feats"], arrays["n_frames"], arrays["token_mask"], arrays["positions"]))(
        model.params))
    assert np.abs(adapted - base).max() > 1e-2 * np.abs(base).max()  # the adapters changed the model
    assert np.abs(merged - adapted).max() <= 1e-5 * np.abs(adapted).max()


def test_lora_also_trains_the_embeddings_beside_the_adapters(folder):
    """``lora_also=("embeddings",)``: the token table (the tied head) trains whole beside the adapters and nothing
    else of the base moves; the export folds the adapters into the projections and takes the trained table."""
    model = qasr_jax.load(folder)  # its table is donated to the state: not the shared fixture
    loaded = {name: np.array(x) for name, x in _flat(model.params)}
    with pytest.raises(ValueError, match="lora_also"):
        TrainConfig(lora_also=("embeddings",))  # no adapters to train beside
    trainer = Trainer(model, TrainConfig(lr=1e-2, warmup_ratio=0.0, steps=4, dtype="float32", lora_rank=4,
                                         lora_also=("embeddings",)))
    batch = one_step_batch(folder, model)
    state = trainer.init_state()
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    base = [n for n, _ in _flat(state.params) if not n.endswith(("_lora_a", "_lora_b"))]
    assert base == ["decoder/embed/embedding"]
    out = dict(_flat(trainer.params(state)))
    assert out.keys() == loaded.keys()
    moved = {n for n in loaded if not np.array_equal(np.asarray(out[n]), loaded[n])}
    assert "decoder/embed/embedding" in moved and "decoder/layers_0/qkv/kernel" in moved
    assert all(n == "decoder/embed/embedding" or "/layers_" in n and n.endswith("kernel") for n in moved), moved


def _flat(tree):
    from qasr_jax.modeling.sharding import param_path

    return [(param_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("freeze", [("encoder",), ("decoder", "projector")])
def test_frozen_parts_stay_fixed(folder, freeze):
    """Frozen parameters come out bit for bit as loaded, the rest moves; gradient accumulation over two
    micro-batches, remat and bf16 compute on the way. The trained weights move into the state (donated)."""
    from qasr_jax.io.tokenizer import Tokenizer

    model = qasr_jax.load(folder)  # its trained weights are donated to the state: not the shared fixture
    loaded = {name: np.array(x) for name, x in _flat(model.params)}  # copies: a view would pin the buffers
    batch = step_batch(examples_from_records(rows("mixed")), Tokenizer.from_dir(folder), model.config, 2, 2)
    trainer = Trainer(model, TrainConfig(lr=1e-3, steps=4, freeze=freeze, grad_accum=2, batch_size=2,
                                         remat=True, dtype="bfloat16"))
    state = trainer.init_state()
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    prefixes = {"encoder": "audio_tower", "projector": "projector", "decoder": "decoder"}
    frozen = tuple(prefixes[f] for f in freeze)
    after = dict(_flat(trainer.params(state)))
    for name, before in loaded.items():
        assert np.array_equal(np.asarray(after[name]), before) == name.startswith(frozen), name
    trained = [x for name, x in _flat(model.params) if not name.startswith(frozen)]
    assert trained and all(x.is_deleted() for x in trained)
    with pytest.raises(ValueError, match="already called"):
        trainer.init_state()


# ----------------------------------------------------------------------------------------------------------------
# 8 forced CPU devices (subprocess)


def test_step_on_mesh_equals_one_device(folder, tmp_path):
    """One step (2 micro-batches of 4 rows) on data=4 x model=2 with FSDP equals one device: loss, gradient norm and
    every gradient within 1e-5, the optimizer's updates too; parameters and AdamW moments are sharded alike.
    The same for LoRA (adapters replicated)."""
    out = tmp_path / "report.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "train_multidevice_check.py"), folder,
                           str(out)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 8
    for kind in ("full", "lora"):
        r = report[kind]
        assert r["loss_rel"] <= 1e-5 and r["grad_norm_rel"] <= 1e-5, kind
        for name, err in r["grad_rel"].items():
            if "/k/bias" in name:  # exactly zero in exact arithmetic (see qasr_jax.testing.parity.ZERO_GRADIENT)
                assert r["grad_max"][name] <= 1e-6 * max(r["grad_max"].values()), name
            else:
                assert err <= 1e-5, (kind, name, err)
        # The key biases' gradients are noise, so AdamW's first step (~lr * sign) may point either way for them.
        assert max(v for name, v in r["update_rel"].items() if "/k/bias" not in name) <= 1e-5, kind
        assert r["specs"] == r["mu_specs"], kind  # AdamW's moments live where their parameters do
    specs = report["full"]["specs"]
    assert specs["decoder/embed/embedding"] == "P('model', 'data')"
    assert specs["decoder/layers_0/gate_up/kernel"] == "P('data', None, 'model')"
    assert all(s == "P()" for s in report["lora"]["specs"].values())
