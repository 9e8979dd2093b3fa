"""``qasr-jax finetune`` and ``qasr-jax evaluate``: their arguments and handlers (registered by
``qasr_jax.cli.core``)."""

from __future__ import annotations

import argparse
import json
import sys

from qasr_jax.cli.options import check_model_args, require_extra
from qasr_jax.modeling.config import DEFAULT_MODEL
from qasr_jax.training.parts import FREEZABLE, LORA_ALSO, LORA_MODULES


def _csv(choices):
    def parse(text: str) -> tuple[str, ...]:
        parts = tuple(p.strip() for p in text.split(",") if p.strip())
        bad = [p for p in parts if p not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{','.join(bad)}: choose from {','.join(sorted(choices))}")
        return parts

    return parse


def _mesh(spec: str | None):
    from qasr_jax.cli.options import mesh_arg

    return mesh_arg(spec)


TRAIN_MODULES = ("grain", "qwix", "jiwer")  # the train extra: input pipeline, LoRA, WER


def _finetune(args: argparse.Namespace) -> int:
    require_extra("train", TRAIN_MODULES, "finetune")  # before the manifests are read or the model loads
    import qasr_jax
    from qasr_jax.training.data import read_manifest
    from qasr_jax.training.finetune import export, finetune, steps_for_epochs
    from qasr_jax.io.hub import resolve_model_path
    from qasr_jax.io.tokenizer import Tokenizer
    from qasr_jax.training.trainer import TrainConfig

    train = read_manifest(args.train)  # every line checked before the model is even loaded
    dev = read_manifest(args.eval) if args.eval else None
    steps = args.steps or steps_for_epochs(len(train), args.epochs, args.batch_size, args.grad_accum)
    config = TrainConfig(lr=args.lr, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                         max_grad_norm=args.max_grad_norm, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         steps=steps, dtype=args.dtype, remat=args.remat, freeze=args.freeze,
                         lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                         lora_also=args.lora_also, seed=args.seed)
    path = resolve_model_path(args.model)
    mesh = _mesh(args.mesh)
    model = qasr_jax.load(path, dtype="float32", mesh=mesh, sharding=args.sharding if mesh else None)
    trainer, state = finetune(model, Tokenizer.from_dir(path), train, args.output, config, eval_examples=dev,
                              save_every=args.save_every, keep=args.keep, eval_every=args.eval_every,
                              eval_batch_size=args.batch_size, resume=args.resume, progress=sys.stderr.isatty(),
                              threads=args.threads)
    folders = export(trainer, state, args.output, path, dtype=args.export_dtype)
    print(f"trained {steps} steps on {len(train)} examples; model written to " + " and ".join(folders))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from qasr_jax.training.data import read_manifest
    from qasr_jax.training.evaluation import evaluate, format_report
    from qasr_jax.transcribe import Transcriber

    require_extra("train", ("jiwer",), "evaluate")  # WER and CER; checked before the model loads
    examples = read_manifest(args.manifest)
    asr = Transcriber.from_pretrained(check_model_args(args.model), dtype=args.dtype, mesh=_mesh(args.mesh))
    report, rows = evaluate(asr, examples, args.batch_size, args.max_new_tokens, progress=sys.stderr.isatty())
    if args.output_format == "json":
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_report(report))
    if args.details:
        with open(args.details, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return 0


def add_commands(sub) -> None:
    """Add ``finetune`` and ``evaluate`` to the ``qasr-jax`` subcommands."""
    ft = sub.add_parser("finetune", help="fine-tune a Qwen3-ASR checkpoint on a JSONL manifest (full or LoRA)",
                        description="Manifest lines: {\"audio\": \"a.wav\", \"text\": \"language English<asr_text>"
                        "...\", \"prompt\": \"optional context\"}; audio paths are relative to the manifest.")
    ft.add_argument("--train", required=True, help="training manifest (JSONL)")
    ft.add_argument("--eval", default=None, help="evaluation manifest (JSONL): WER every --eval-every steps")
    ft.add_argument("--model", default=DEFAULT_MODEL,
                    help="checkpoint folder, hub id, or tiny-en (the bundled model) to start from")
    ft.add_argument("--output", required=True, help="run folder: checkpoints, metrics.jsonl, model-hf/, model/")
    length = ft.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=1.0, help="passes over the training set (default 1)")
    ft.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch, over all devices")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ft.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (official recipe: 2e-5)")
    ft.add_argument("--warmup-ratio", type=float, default=0.02, help="share of steps of linear warmup")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="global gradient-norm clipping")
    ft.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="compute dtype (weights and optimizer state stay float32)")
    ft.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
    ft.add_argument("--freeze", type=_csv(FREEZABLE), default=(), help="parts to keep fixed: "
                    + ",".join(FREEZABLE) + " (comma-separated)")
    ft.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA adapters of this rank only")
    ft.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 x rank)")
    ft.add_argument("--lora-targets", type=_csv(LORA_MODULES), default=("decoder",),
                    help="where adapters go: " + ",".join(LORA_MODULES) + " (comma-separated; default decoder)")
    ft.add_argument("--lora-also", type=_csv(LORA_ALSO), default=(), help="base weights trained whole beside the "
                    "adapters: " + ",".join(LORA_ALSO) + " (embeddings: the token table, also the tied output head; "
                    "for words made of pieces the model never said)")
    ft.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2 (default: every local device "
                    "on data when there are several)")
    ft.add_argument("--sharding", default="fsdp", choices=["data", "tensor", "fsdp"], help="with a mesh")
    ft.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    ft.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    ft.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    ft.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation")
    ft.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    ft.add_argument("--export-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights of the exported checkpoints")
    ft.add_argument("--threads", type=int, default=4, help="audio reading threads")
    ft.set_defaults(func=_finetune)

    ev = sub.add_parser("evaluate", help="WER (and CER for zh/ja/ko/yue) of a model on a JSONL manifest")
    ev.add_argument("manifest", help="JSONL manifest: audio paths relative to it, text 'language X<asr_text>...'")
    ev.add_argument("--model", default=DEFAULT_MODEL,
                    help="checkpoint folder, hub id, or tiny-en (the bundled model)")
    ev.add_argument("--output-format", default="txt", choices=["txt", "json"],
                    help="json: one object with wer, cer, n, per_language (fractions)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--mesh", default=None, help="device mesh, e.g. data=8")
    ev.add_argument("--details", default=None, help="also write each row's reference and hypothesis (JSONL) here")
    ev.set_defaults(func=_evaluate)
