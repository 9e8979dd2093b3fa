"""A fine-tuning run: Grain batches into the compiled train step, Orbax checkpoints with exact resume, evaluation
every N steps, metrics in a JSONL file, and the trained model exported in the released layouts.

An output folder holds ``run.json`` (the run's settings), ``metrics.jsonl`` (one line per step and per
evaluation), ``checkpoints/<step>/`` (the train state and the data iterator's position; the last ``keep``), and at
the end ``model-hf/`` and ``model/`` (the -hf and official layouts). A killed run resumed with ``resume=True``
restores the latest checkpoint and reads the same batches in the same order, so it ends with the same weights as
an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from qasr_jax.io.tokenizer import Tokenizer
from qasr_jax.training.data import Augment, Example, Loader
from qasr_jax.training.trainer import Trainer, TrainConfig, TrainState

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
EXPORTS = {"hf": "model-hf", "official": "model"}


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight became NaN or Inf: training stopped and nothing was written."""


def check_finite(tree, what: str) -> None:
    """Raise NonFiniteError naming ``what`` when any leaf of ``tree`` holds NaN or Inf."""
    finite = jax.tree_util.tree_map(lambda x: jax.numpy.isfinite(x).all(), tree)
    if not all(bool(f) for f in jax.tree_util.tree_leaves(finite)):
        raise NonFiniteError(f"{what} holds NaN or Inf; nothing was written. Lower the learning rate, check the "
                             "manifest's audio, or resume from the last checkpoint")


def steps_for_epochs(n_examples: int, epochs: float, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps that read ``epochs`` passes over ``n_examples`` (the last step of a pass may be short)."""
    per_epoch = -(-n_examples // (batch_size * grad_accum))
    return max(1, int(np.ceil(epochs * per_epoch)))


class _Metrics:
    """metrics.jsonl: one JSON object a line; on resume, lines past the restored step are dropped."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


class _Evaluator:
    """Transcribes an eval set with the current weights through one Transcriber whose params are swapped."""

    def __init__(self, trainer: Trainer, tokenizer: Tokenizer, examples: Sequence[Example], batch_size: int):
        self.trainer, self.tokenizer, self.examples, self.batch_size = trainer, tokenizer, examples, batch_size
        self.transcriber = None

    def __call__(self, state: TrainState) -> dict:
        from qasr_jax.training.evaluation import evaluate
        from qasr_jax.loading import Model
        from qasr_jax.transcribe import Transcriber

        dtype = self.trainer.config.dtype
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), self.trainer.params(state))
        if self.transcriber is None:
            module = self.trainer.model.module
            model = Model(self.trainer.model.config, params, dtype, module.attention_impl, module.interpret,
                          mesh=self.trainer.layout)
            self.transcriber = Transcriber(model, self.tokenizer)
        else:  # same shapes and placement: the compiled programs are reused
            model = self.transcriber.model
            model.params = model.engine.params = params
        report, _ = evaluate(self.transcriber, self.examples, self.batch_size)
        return report


def _run_record(config: TrainConfig, model, train: Sequence[Example]) -> dict:
    return {"train_config": dataclasses.asdict(config), "model_config": model.config.to_dict(),
            "model": model.source, "train_examples": len(train)}


def _check_resume(output: str, record: dict) -> None:
    path = os.path.join(output, RUN_FILE)
    if not os.path.exists(path):
        raise ValueError(f"--resume: {output} holds no {RUN_FILE}; start a new run there without --resume")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for key in ("train_config", "model_config", "train_examples"):
        if json.dumps(saved[key], sort_keys=True) != json.dumps(record[key], sort_keys=True):
            raise ValueError(f"--resume: this run's {key} differs from the one saved in {path}; resume with the "
                             "same model, manifest and options, or start a new output folder")


def finetune(model, tokenizer: Tokenizer, train: Sequence[Example], output: str, config: TrainConfig, *,
             eval_examples: Sequence[Example] | None = None, save_every: int = 500, keep: int = 3,
             eval_every: int = 0, eval_batch_size: int = 8, resume: bool = False, progress: bool = False,
             threads: int = 4, augment: Augment | None = None) -> tuple[Trainer, TrainState]:
    """Train ``model`` (``qasr_jax.load``, float32) on ``train`` for ``config.steps`` steps, writing checkpoints
    every ``save_every`` steps (the last ``keep``) and metrics to ``output``; evaluate on ``eval_examples`` every
    ``eval_every`` steps (0: only at the end). ``resume`` continues the latest checkpoint in ``output``;
    ``augment`` adds training noise (SpecAugment, teacher-forcing noise). A non-finite loss or gradient stops the
    run at once with NonFiniteError naming the step and its manifest lines; no checkpoint holds NaN or Inf."""
    import grain
    import orbax.checkpoint as ocp

    if save_every < 1 or keep < 1 or eval_every < 0:
        raise ValueError(f"save_every and keep must be >= 1 and eval_every >= 0, got {save_every}, {keep} and "
                         f"{eval_every}")
    os.makedirs(output, exist_ok=True)
    record = _run_record(config, model, train)
    if resume:
        _check_resume(output, record)
    else:
        if os.path.isdir(os.path.join(output, CHECKPOINTS)) and os.listdir(os.path.join(output, CHECKPOINTS)):
            raise ValueError(f"{output} already holds checkpoints; pass --resume to continue that run, or choose "
                             "a new output folder")
        with open(os.path.join(output, RUN_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    trainer = Trainer(model, config)
    loader = Loader(train, tokenizer, model.config, config.batch_size, config.grad_accum, config.steps,
                    config.seed, jax.process_index(), jax.process_count(), threads, augment=augment)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(output, CHECKPOINTS)),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    start = manager.latest_step() if resume else None
    if start is not None:
        shapes = trainer.state_shapes()
        shardings = trainer.state_shardings(shapes)
        target = shapes if shardings is None else jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        restored = manager.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(loader.iterator)))
        state = restored.state
        trainer.release_base()
    else:
        state = trainer.init_state()
    metrics = _Metrics(os.path.join(output, METRICS_FILE), start)
    evaluator = _Evaluator(trainer, tokenizer, eval_examples, eval_batch_size) if eval_examples else None
    first = int(state.step)
    bar = _bar(config.steps, first, progress)
    clock = time.perf_counter()
    for step in range(first + 1, config.steps + 1):
        batch = next(loader)
        state, values = trainer.step(state, batch)
        values = {k: float(v) for k, v in jax.device_get(values).items()}
        if not all(np.isfinite(v) for v in values.values()):
            shown = ", ".join(batch.lines[:8]) + (" ..." if len(batch.lines) > 8 else "")
            raise NonFiniteError(f"step {step}: non-finite training values {values} on the batch of {shown}; "
                                 "nothing was written for this step. Lower the learning rate or check these "
                                 f"examples, then resume from the last checkpoint in {output}")
        now = time.perf_counter()
        speed = batch.seconds / max(now - clock, 1e-9)
        clock = now
        if jax.process_index() == 0:
            metrics.write({"step": step, **values, "audio_seconds": round(batch.seconds, 3),
                           "audio_s_per_s": round(speed, 2), "lines": list(batch.lines)})
        bar.update(values["loss"], values["lr"], speed)
        if step % save_every == 0 or step == config.steps:
            check_finite(state.params, f"the weights at step {step}")
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=grain.checkpoint.CheckpointSave(loader.iterator)))
        if evaluator and ((eval_every and step % eval_every == 0) or step == config.steps):
            report = evaluator(state)
            if jax.process_index() == 0:
                metrics.write({"step": step, "eval": report})
            bar.note(f"eval WER {100 * report['wer']:.2f}%")
            clock = time.perf_counter()  # evaluation time is not training time
    manager.wait_until_finished()
    manager.close()
    bar.close()
    return trainer, state


def export(trainer: Trainer, state: TrainState, output: str, copy_from: str,
           layouts: Sequence[str] = ("hf", "official"), dtype: str = "float32") -> list[str]:
    """Write the trained model into ``output``/model-hf and ``output``/model (official) -> their paths."""
    from qasr_jax.convert.export import export_checkpoint

    params = trainer.params(state)
    check_finite(params, "the trained weights")
    return [export_checkpoint(params, trainer.model.config, os.path.join(output, EXPORTS[layout]), layout, dtype,
                              copy_from) for layout in layouts]


class _Bar:
    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", desc="fine-tuning", dynamic_ncols=True)

    def update(self, loss: float, lr: float, speed: float) -> None:
        self._bar.update(1)
        self._bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {speed:.1f} audio-s/s")

    def note(self, text: str) -> None:
        self._bar.write(text)

    def close(self) -> None:
        self._bar.close()


class _NoBar:
    def update(self, loss: float, lr: float, speed: float) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, initial: int, enabled: bool):
    return _Bar(total, initial) if enabled else _NoBar()
