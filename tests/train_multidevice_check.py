"""One train step on 8 forced CPU devices (FSDP, ``data=4,model=2``) next to the same step on one device, written as a
JSON report for tests/training/test_training.py (the device count must be forced before jax is imported, so the test runs
this file in a subprocess):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_multidevice_check.py MODEL_DIR REPORT.json

Recorded: the step's loss and gradient norm, each parameter's update (after - before) on both, the mesh's
parameter and optimizer-state shardings, and the same for a LoRA step (adapters replicated, base sharded).
"""

from __future__ import annotations

import json
import os
import sys

if "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported)")

import jax  # noqa: E402
import numpy as np  # noqa: E402


import qasr_jax  # noqa: E402
from qasr_jax.io.tokenizer import Tokenizer  # noqa: E402
from qasr_jax.modeling.sharding import param_path  # noqa: E402
from qasr_jax.testing import speech, synthetic  # noqa: E402
from qasr_jax.training.data import examples_from_records, step_batch  # noqa: E402
from qasr_jax.training.trainer import TrainConfig, Trainer  # noqa: E402

TEXTS = ["Hello world.", "The quick brown fox.", "Jumps over the lazy dog.", "Qwen speaks JAX.",
         "One two three.", "A mesh of eight devices.", "Speech recognition.", "Fine-tuning on a pod."]


def batch(tok, cfg):
    """One step of 8 rows (2 micro-batches of 4: each divides data=4), mixed lengths, half with prompts."""
    waves = [speech("hello_en.wav"), speech("zh.wav")] + [synthetic(s, i) for i, s in
                                                          enumerate((0.8, 1.6, 2.3, 0.6, 3.1, 1.2))]
    records = [{"audio": w, "text": f"language English<asr_text>{t}", "prompt": "JAX, Qwen" if i % 2 else ""}
               for i, (w, t) in enumerate(zip(waves, TEXTS))]
    return step_batch(examples_from_records(records), tok, cfg, rows=4, accum=2)


def run(model, config: TrainConfig, b) -> dict:
    """One step: loss, grad norm, every trained leaf before and after (host numpy), and the state's shardings."""
    trainer = Trainer(model, config)
    state = trainer.init_state()
    before = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    specs = {param_path(p): str(getattr(x.sharding, "spec", None))
             for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    mu = state.opt_state[1][0].mu  # chain(clip, adamw): adamw's first state is scale_by_adam's
    mu_specs = {param_path(p): str(getattr(x.sharding, "spec", None))
                for p, x in jax.tree_util.tree_flatten_with_path(mu)[0]}
    state, metrics = trainer.step(state, b)
    after = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    # After one step AdamW's first moment is 0.1 x the clipped gradient: the gradients, compared leaf by leaf.
    grads = {param_path(p): np.asarray(x) for p, x in
             jax.tree_util.tree_flatten_with_path(state.opt_state[1][0].mu)[0]}
    return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]), "grads": grads,
            "after": after, "update": {k: after[k] - before[k] for k in before}, "specs": specs,
            "mu_specs": mu_specs}


def rel(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (the difference itself where want is all zeros)."""
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    return diff / scale if scale > 0 else diff


def clear_update_rel(single: dict, mesh: dict, name: str) -> float:
    """The update difference relative to the largest update, over elements whose gradient is at least 1e-3 of the
    leaf's largest (AdamW's first step is ~lr * sign(gradient), so where a gradient is float32 rounding noise the
    two runs may step in opposite directions), less one float32 spacing of the new weight: each run rounds
    weight + update to float32 on its own, so updates that differ by 1e-7 may land one weight ulp apart."""
    grad, want, got = single["grads"][name], single["update"][name], mesh["update"][name]
    clear = np.abs(grad) >= 1e-3 * np.abs(grad).max()
    if not clear.any() or not np.abs(want).max():
        return 0.0
    rounding = np.spacing(np.maximum(np.abs(single["after"][name]), np.abs(mesh["after"][name])))
    return float(np.maximum(np.abs(got - want) - rounding, 0.0)[clear].max() / np.abs(want).max())


def compare(single: dict, mesh: dict) -> dict:
    """Relative differences: loss, grad norm, and per leaf the gradient, the update, and their largest values."""
    return {"loss_rel": abs(mesh["loss"] - single["loss"]) / abs(single["loss"]),
            "grad_norm_rel": abs(mesh["grad_norm"] - single["grad_norm"]) / single["grad_norm"],
            "grad_rel": {k: rel(mesh["grads"][k], g) for k, g in single["grads"].items()},
            "grad_max": {k: float(np.abs(g).max()) for k, g in single["grads"].items()},
            "update_rel": {k: clear_update_rel(single, mesh, k) for k in single["update"]},
            "specs": mesh["specs"], "mu_specs": mesh["mu_specs"]}


def main(model_dir: str, report_path: str) -> None:
    tok = Tokenizer.from_dir(model_dir)
    report: dict = {"devices": jax.device_count()}
    for name, config in (("full", TrainConfig(lr=1e-3, warmup_ratio=0.0, steps=10, batch_size=4, grad_accum=2,
                                               dtype="float32")),
                         ("lora", TrainConfig(lr=1e-2, warmup_ratio=0.0, steps=10, batch_size=4, grad_accum=2,
                                              dtype="float32", lora_rank=4, lora_targets=("decoder", "encoder")))):
        one = qasr_jax.load(model_dir)
        b = batch(tok, one.config)
        single = run(one, config, b)
        del one
        mesh = run(qasr_jax.load(model_dir, mesh="data=4,model=2", sharding="fsdp"), config, b)
        report[name] = compare(single, mesh)
    with open(report_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
