"""Fine-tuning: the loss on the engine's forward pass, a jitted AdamW step, LoRA through qwix, meshes.

The loss is the mean cross-entropy over every target token of a batch (``language X<asr_text>`` + transcript +
``<|im_end|>``), read at each row's own target positions (``qasr_jax.training.data``), so padding never moves a label.
:func:`loss_and_grads` gives it with gradients keyed by the checkpoint's ``-hf`` tensor names (compare them with
PyTorch); :class:`Trainer` owns the compiled train step: gradients accumulated over micro-batches (an exact mean
over all their target tokens), clipped, then optax AdamW with the official schedule (linear warmup over 2% of the
steps, linear decay to 0). Weights and optimizer state stay float32; the forward pass runs in ``dtype`` (bfloat16
as in the official recipe, or float32). Parts can be frozen, or LoRA adapters trained instead of the weights
(``qasr_jax.training.parts``). With a mesh
(``qasr_jax.load(..., mesh=..., sharding="fsdp")``) parameters, gradients and optimizer state are sharded as the
parameters are and each batch is split over ``data``: one program on one device or a pod.

Checkpoints, resume, evaluation and export: ``qasr_jax.training.finetune``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qasr_jax.decoding.compiles import jit_with_encoder
from qasr_jax.decoding.engine import Engine
from qasr_jax.training.parts import (FREEZABLE, LORA_ALSO, LORA_MODULES, LORA_SUFFIXES, init_lora, lora_provider,
                                     lora_transform, merge_lora, merge_trees, split_params)
from qasr_jax.training.data import ARRAYS, Batch, collate, examples_from_records, read_waves

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a run (defaults: the official recipe's, lr 2e-5, 2% warmup, linear decay, clip 1.0)."""

    lr: float = 2e-5
    warmup_ratio: float = 0.02
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8  # rows per micro-batch, over all devices and hosts
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000  # optimizer steps of the whole run (the schedule's length)
    dtype: str = "bfloat16"  # forward/backward compute; weights and optimizer state stay float32
    remat: bool = False  # recompute each layer's activations in the backward pass
    freeze: tuple[str, ...] = ()  # of FREEZABLE
    lora_rank: int = 0  # > 0: train LoRA adapters only
    lora_alpha: float | None = None  # default 2 * rank
    lora_targets: tuple[str, ...] = ("decoder",)  # of LORA_MODULES
    lora_also: tuple[str, ...] = ()  # of LORA_ALSO: base weights trained whole beside the adapters
    seed: int = 0  # data order and LoRA initialisation
    decay: str = "linear"  # after warmup: "linear" to 0 (the official recipe) or "cosine" to final_lr_ratio * lr
    final_lr_ratio: float = 0.0  # the cosine schedule's last learning rate, as a fraction of lr
    adam_b2: float = 0.999
    ctc_weight: float = 0.0  # > 0: add a CTC loss of a linear head on the encoder's output (never exported)

    def __post_init__(self):
        unknown = [f for f in self.freeze if f not in FREEZABLE]
        if unknown:
            raise ValueError(f"cannot freeze {unknown}: choose from {sorted(FREEZABLE)}")
        bad = [t for t in self.lora_targets if t not in LORA_MODULES]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}: choose from {sorted(LORA_MODULES)}")
        if self.lora_rank and self.freeze:
            raise ValueError("LoRA trains adapters only (every base weight is frozen); drop --freeze")
        bad = [t for t in self.lora_also if t not in LORA_ALSO]
        if bad or (self.lora_also and not self.lora_rank):
            raise ValueError(f"lora_also names base parts trained beside LoRA adapters (needs lora_rank > 0): "
                             f"choose from {sorted(LORA_ALSO)}, got {list(self.lora_also)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("batch_size", "grad_accum", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if set(self.freeze) >= set(FREEZABLE):
            raise ValueError("every part is frozen: nothing would train")
        if self.decay not in ("linear", "cosine") or not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"decay must be 'linear' or 'cosine' and final_lr_ratio in [0, 1], got {self.decay!r} "
                             f"and {self.final_lr_ratio}")
        if self.ctc_weight < 0 or (self.ctc_weight and (self.lora_rank or "encoder" in self.freeze)):
            raise ValueError(f"ctc_weight must be >= 0 and trains the encoder (no LoRA, no frozen encoder), got "
                             f"{self.ctc_weight}")

    @property
    def warmup_steps(self) -> int:
        """Steps of linear warmup: ceil(warmup_ratio * steps), as transformers' Trainer counts them."""
        return math.ceil(self.warmup_ratio * self.steps)

    @property
    def alpha(self) -> float:
        """The LoRA scale numerator (the adapters' output is multiplied by alpha / rank)."""
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank)


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the step count, the trained parameters (float32) and the optimizer state.

    ``params`` holds only what trains: the whole tree, its unfrozen part, or the LoRA adapters. Nothing in a step
    is random, so there is no RNG to carry: the data order comes from the seed and the loader's saved position.
    """

    step: jax.Array  # () int32
    params: dict
    opt_state: optax.OptState


# ----------------------------------------------------------------------------------------------------------------
# The loss


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy over weighted targets, sum of weights): logits (..., V) float32, targets (...)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights), jnp.sum(weights)


CTC_HEAD = "ctc_head"  # the auxiliary head's key in a TrainState's params; never part of a checkpoint


def init_ctc_head(cfg, key: jax.Array) -> dict:
    """A linear head from the projector's output (the decoder's width) to the vocabulary plus a blank (the last
    class), for :func:`ctc_loss`."""
    hidden, classes = cfg.text.hidden_size, cfg.text.vocab_size + 1
    return {"kernel": jax.random.normal(key, (hidden, classes), jnp.float32) * hidden ** -0.5,
            "bias": jnp.zeros((classes,), jnp.float32)}


def ctc_loss(head: Mapping, audio: jax.Array, n_tokens: jax.Array, batch: Mapping) -> jax.Array:
    """Sum over a batch's real rows of the CTC loss of the head on the encoder's output (audio (rows, seq, hidden),
    ``n_tokens`` real per row) against each row's transcript tokens."""
    logits = audio.astype(jnp.float32) @ head["kernel"] + head["bias"]
    paddings = (jnp.arange(audio.shape[1])[None, :] >= n_tokens[:, None]).astype(jnp.float32)
    per_row = optax.ctc_loss(logits, paddings, batch["ctc_labels"], batch["ctc_paddings"],
                             blank_id=logits.shape[-1] - 1)
    real = (batch["weights"].sum(axis=1) > 0).astype(jnp.float32)
    return jnp.sum(per_row * real)


def _forward_loss(engine: Engine, params, batch: Mapping, ctc_head=None, ctc_weight: float = 0.0):
    """(total loss, target tokens, cross-entropy part): the total adds ``ctc_weight`` x the rows' CTC losses."""
    args = (batch["ids"], batch["feats"], batch["n_frames"], batch["token_mask"], batch["positions"])
    if ctc_head is None:
        logits = engine.forward(params, *args)  # (rows, targets, V) float32
        total, count = token_loss(logits, batch["targets"], batch["weights"])
        return total, count, total
    logits, audio, n_tokens = engine.forward(params, *args, with_audio=True)
    ce, count = token_loss(logits, batch["targets"], batch["weights"])
    return ce + ctc_weight * ctc_loss(ctc_head, audio, n_tokens, batch), count, ce


def loss_and_grads(model, batch: Sequence[Mapping], tokenizer=None) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy over the target tokens of ``batch`` (dicts: "audio" waveform or path, "text"
    "language X<asr_text>...", "prompt" optional) and its gradients as {-hf tensor name: array in the checkpoint's
    shape}, in the model's dtype; ``model`` as ``qasr_jax.load`` returns it (its folder's tokenizer by default)."""
    from qasr_jax.convert.checkpoint import params_to_hf, tree_to_numpy
    from qasr_jax.io.tokenizer import Tokenizer

    if tokenizer is None:
        if model.source is None:
            raise ValueError("this Model was not loaded from a folder; pass tokenizer=Tokenizer.from_dir(folder)")
        tokenizer = Tokenizer.from_dir(model.source)
    examples = examples_from_records(list(batch))
    batch = collate(read_waves(examples), examples, tokenizer, model.config)
    arrays = {name: getattr(batch, name) for name in ARRAYS}
    engine = model.engine

    def mean_loss(params, arrays):
        total, count, _ = _forward_loss(engine, params, arrays)
        return total / count

    loss, grads = jit_with_encoder(jax.value_and_grad(mean_loss))(model.params, arrays)
    return float(loss), params_to_hf(tree_to_numpy(grads), model.config)


# ----------------------------------------------------------------------------------------------------------------
# The trainer


def schedule(config: TrainConfig) -> optax.Schedule:
    """Learning rate by step: linear warmup from 0 to ``lr`` over ``warmup_steps``, then linear decay to 0 (or
    cosine decay to ``final_lr_ratio * lr``)."""
    warm = config.warmup_steps
    if config.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warm, config.steps,
                                                  config.lr * config.final_lr_ratio)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, warm), optax.linear_schedule(config.lr, 0.0, config.steps - warm)],
        [warm])


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (betas 0.9/``adam_b2``, eps 1e-8; weight decay on matrices only)."""
    decay = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(schedule(config), b1=0.9, b2=config.adam_b2, eps=1e-8,
                                   weight_decay=config.weight_decay, mask=decay))


class Trainer:
    """The compiled train step of one model and config, on the model's devices (one, or its mesh).

    ``model`` is ``qasr_jax.load(...)`` in float32 (the master weights; ``sharding="fsdp"`` on a mesh). The frozen
    part of the weights is also held in the compute dtype. The trained part moves into the TrainState, so a 0.6B
    model is not held twice: ``init_state`` donates those buffers (and ``release_base`` frees them when a checkpoint
    is restored instead); ``model.params`` is then unusable for them; read the weights with ``params(state)``.
    """

    def __init__(self, model, config: TrainConfig):
        if model.config.is_aligner:
            raise ValueError("fine-tuning trains ASR checkpoints; this one is a forced aligner")
        if any(np.dtype(x.dtype) != np.float32 for x in jax.tree_util.tree_leaves(model.params)):
            raise ValueError("load the model in float32 (the master weights): qasr_jax.load(path, dtype='float32')")
        self.model = model
        self.config = config
        self.layout = model.layout
        dt = jnp.dtype(config.dtype)
        self.provider = lora_provider(config) if config.lora_rank else None
        module = model.module
        self.engine = Engine(model.config, None, config.dtype, module.attention_impl, module.interpret, self.layout,
                             config.remat, lora_transform(self.provider) if self.provider else None)
        if self.provider:
            also = tuple(p for part in config.lora_also for p in LORA_ALSO[part])
            trained, frozen = split_params(model.params, lambda p: p.startswith(also))
        else:
            frozen_prefixes = tuple(p for part in config.freeze for p in FREEZABLE[part])
            frozen, trained = split_params(model.params, lambda p: p.startswith(frozen_prefixes))
        self._base = trained  # the float32 weights trained (with LoRA: lora_also's), until the state takes them
        self._base_shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trained)
        self._frozen_f32 = frozen
        self.frozen = jax.tree_util.tree_map(lambda x: x.astype(dt), frozen)
        self.optimizer = optimizer(config)
        self.schedule = schedule(config)
        self._step = self._compile()

    # -- state -------------------------------------------------------------------------------------------------
    def _param_shardings(self, tree):
        if self.layout is None:
            return None
        from qasr_jax.modeling.sharding import param_shardings

        # Adapters and the CTC head are small: every device holds them whole; base weights shard as loaded.
        small, base = split_params(tree, lambda p: p.endswith(LORA_SUFFIXES) or p.startswith(CTC_HEAD + "/"))
        rep = jax.sharding.NamedSharding(self.layout.mesh, jax.sharding.PartitionSpec())
        base = param_shardings(base, self.layout, self.model.config) if base else {}
        return merge_trees(jax.tree_util.tree_map(lambda _: rep, small), base)

    def state_shardings(self, state_shapes: TrainState):
        """The NamedSharding of every leaf of a TrainState (None without a mesh)."""
        if self.layout is None:
            return None
        rep = jax.sharding.NamedSharding(self.layout.mesh, jax.sharding.PartitionSpec())
        params = self._param_shardings(state_shapes.params)
        opt = optax.tree_map_params(self.optimizer, lambda _, sh: sh, state_shapes.opt_state, params,
                                    transform_non_params=lambda _: rep)
        return TrainState(step=rep, params=params, opt_state=opt)

    def init_state(self) -> TrainState:
        """Step 0: the trained weights (LoRA: fresh adapters from the seed, beside ``lora_also``'s weights) and a
        zeroed AdamW state; the model's trained buffers are donated to it (call once)."""
        if self._base is None:
            raise ValueError("init_state was already called (or the base released): the weights live in that state")
        params, self._base = self._base, None
        params = self._with_new(params, jax.random.PRNGKey(self.config.seed))
        shardings = self._param_shardings(params)
        params = params if shardings is None else jax.device_put(params, shardings)
        shapes = self.state_shapes()
        init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.optimizer.init(p)),
                       donate_argnums=0, out_shardings=self.state_shardings(shapes))
        return init(params)

    def _with_new(self, trained, key: jax.Array) -> dict:
        """The trained weights with what a run adds to them from ``key``: fresh LoRA adapters, or the CTC head."""
        if self.provider:
            return merge_trees(init_lora(self.engine, self.provider, key), trained)
        if self.config.ctc_weight:
            return {**trained, CTC_HEAD: init_ctc_head(self.model.config, key)}
        return trained

    def release_base(self) -> None:
        """Free the model's copies of the trained weights (after restoring a TrainState from a checkpoint)."""
        for x in jax.tree_util.tree_leaves(self._base or {}):
            x.delete()
        self._base = None

    def state_shapes(self) -> TrainState:
        """The TrainState's ShapeDtypeStructs (for restoring a checkpoint into place)."""
        params = jax.eval_shape(lambda p: self._with_new(p, jax.random.PRNGKey(0)), self._base_shapes)
        return jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.optimizer.init(p)), params)

    # -- the step ----------------------------------------------------------------------------------------------
    def _compile(self):
        """The step's programs. Micro-batches are not scanned inside one program: XLA:CPU runs the convolutions'
        gradients inside a loop body ~40x slower, so each micro-batch's gradients come from one call and are
        summed by the next (``accumulate``), and ``apply`` divides by the token count and updates."""
        engine, opt, lr, dt = self.engine, self.optimizer, self.schedule, jnp.dtype(self.config.dtype)
        weight = self.config.ctc_weight

        def micro(trained, frozen, arrays):
            trained = dict(trained)
            head = trained.pop(CTC_HEAD, None)
            params = jax.tree_util.tree_map(lambda p: p.astype(dt), merge_trees(trained, frozen))
            total, count, ce = _forward_loss(engine, params, arrays, head, weight)
            return total, (count, ce)

        def grads(params, frozen, arrays):
            (total, (count, ce)), g = jax.value_and_grad(micro, has_aux=True)(params, frozen, arrays)
            return g, total, count, ce

        def accumulate(params, frozen, arrays, acc):
            return jax.tree_util.tree_map(jnp.add, acc, grads(params, frozen, arrays))

        def apply(state: TrainState, acc):
            grads, total, count, ce = acc
            count = jnp.maximum(count, 1.0)
            grads = jax.tree_util.tree_map(lambda g: g / count, grads)  # the mean over all target tokens
            updates, opt_state = opt.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {"loss": ce / count, "tokens": count, "grad_norm": optax.tree.norm(grads),
                       "lr": lr(state.step)}
            if weight:  # the CTC loss per target token, unweighted
                metrics["ctc_loss"] = (total - ce) / count / weight
            return TrainState(state.step + 1, params, opt_state), metrics

        shardings = self.state_shardings(self.state_shapes())
        grad_sh = None if shardings is None else (shardings.params, None, None, None)
        out = None if shardings is None else (shardings, None)
        self._grads = jit_with_encoder(grads, out_shardings=grad_sh)
        self._accumulate = jit_with_encoder(accumulate, donate_argnums=3, out_shardings=grad_sh)
        self._apply = jax.jit(apply, donate_argnums=0, out_shardings=out)
        return jit_with_encoder(lambda state, frozen, arrays: apply(state, grads(state.params, frozen, arrays)),
                                donate_argnums=0, out_shardings=out)

    def put_batch(self, batch: Batch) -> list[dict[str, jax.Array]]:
        """Each micro-batch of a stacked step batch (accum, rows, ...) on the devices: rows split over the mesh's
        data axis (each host passes its own rows)."""
        micro = [{name: getattr(batch, name)[i] for name in ARRAYS} for i in range(batch.ids.shape[0])]
        if self.layout is None:
            return [{k: jnp.asarray(v) for k, v in m.items()} for m in micro]
        return [{k: jax.make_array_from_process_local_data(self.layout.batch_sharding(v.ndim), v)
                 for k, v in m.items()} for m in micro]

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a stacked batch (``qasr_jax.training.data.step_batch``); ``state`` is donated."""
        rows = batch.ids.shape[1]
        if self.layout is not None and rows % self.layout.data_size:
            raise ValueError(f"{rows} rows per micro-batch do not divide over the mesh's data axis "
                             f"({self.layout.data_size}); make batch_size a multiple of it")
        first, *rest = self.put_batch(batch)
        if not rest:
            return self._step(state, self.frozen, first)
        acc = self._grads(state.params, self.frozen, first)
        for arrays in rest:
            acc = self._accumulate(state.params, self.frozen, arrays, acc)
        return self._apply(state, acc)

    # -- the trained model ---------------------------------------------------------------------------------------
    def params(self, state: TrainState) -> dict:
        """The whole parameter tree after training, float32 (frozen parts as loaded, LoRA merged in)."""
        if self.provider:
            adapters, trained = split_params(state.params, lambda p: p.endswith(LORA_SUFFIXES))
            return merge_lora(merge_trees(trained, self._frozen_f32), adapters, self.config.lora_rank,
                              self.config.alpha)
        return merge_trees({k: v for k, v in state.params.items() if k != CTC_HEAD}, self._frozen_f32)
