"""Ship a run of benchmarks/train_tiny.py: the model into the package, its clips into the tests, its curve as a plot.

    python benchmarks/ship_tiny.py /tmp/tiny_run

- qasr_jax/data/tiny-en/: model-hf/ and model/ (bfloat16, with tokenizers), vocabulary.txt (the 200 words it
  knows), train_text_hashes.txt (SHA-256 prefixes of every training text), heldout_specs.jsonl (the held-out texts
  and the espeak-ng voice, speed and pitch that speak them);
- tests/data/tiny_en/: the held-out and new-word clips as Ogg Vorbis with their manifests, the first 360 training
  clips (replay.jsonl, at Vorbis's smallest size) and finetune.jsonl (the 40 new-word training clips then the
  replay clips: what the fine-tuning test trains on);
- benchmarks/tiny_training_curve.json and .png: loss, CTC loss and held-out WER against steps (matplotlib, the
  ``benchmarks`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "qasr_jax", "data", "tiny-en")
CLIPS = os.path.join(ROOT, "tests", "data", "tiny_en")
CURVE = os.path.join(ROOT, "benchmarks", "tiny_training_curve")
SETS = {"heldout": ("heldout", None), "novel_train": ("novel_train", None), "novel_eval": ("novel_eval", None),
        "replay": ("train", 360)}  # shipped name: (corpus set, clips kept)


def ship_model(run: str) -> None:
    shutil.rmtree(PACKAGE, ignore_errors=True)
    shutil.copytree(os.path.join(run, "tiny-en"), PACKAGE)
    with open(os.path.join(run, "corpus", "heldout.jsonl")) as f, \
            open(os.path.join(PACKAGE, "heldout_specs.jsonl"), "w") as out:
        for line in f:
            record = json.loads(line)
            record.pop("audio")
            out.write(json.dumps(record) + "\n")


def ship_clips(run: str) -> None:
    import soundfile as sf

    shutil.rmtree(CLIPS, ignore_errors=True)
    os.makedirs(os.path.join(CLIPS, "clips"))
    corpus = os.path.join(run, "corpus")
    for name, (source, keep) in SETS.items():
        with open(os.path.join(corpus, f"{source}.jsonl")) as f:
            records = [json.loads(line) for line in f][:keep]
        size = {"compression_level": 1.0} if name == "replay" else {}  # replay at 9.5 KB a clip, not 15
        with open(os.path.join(CLIPS, f"{name}.jsonl"), "w") as out:
            for record in records:
                wave, rate = sf.read(os.path.join(corpus, record["audio"]), dtype="float32")
                record["audio"] = os.path.splitext(record["audio"])[0] + ".ogg"
                sf.write(os.path.join(CLIPS, record["audio"]), wave, rate, format="OGG", subtype="VORBIS", **size)
                out.write(json.dumps({"audio": record["audio"], "text": record["text"]}) + "\n")
    with open(os.path.join(CLIPS, "finetune.jsonl"), "w") as out:
        for name in ("novel_train", "replay"):
            with open(os.path.join(CLIPS, f"{name}.jsonl")) as f:
                out.write(f.read())


def ship_curve(run: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(run, "run", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [{k: round(r[k], 6) for k in ("step", "loss", "ctc_loss", "lr")} for r in records if "loss" in r]
    evals = [{"step": r["step"], "wer": r["eval"]["wer"]} for r in records if "eval" in r]
    with open(CURVE + ".json", "w") as f:  # every step of the first 50 (the smoke test's reference), then every 10th
        json.dump({"steps": [s for s in steps if s["step"] <= 50 or s["step"] % 10 == 0], "eval": evals}, f,
                  separators=(",", ":"))
    fig, loss_ax = plt.subplots(figsize=(8, 4.5))
    x = [s["step"] for s in steps]
    loss_ax.plot(x, [s["loss"] for s in steps], lw=0.6, label="decoder cross-entropy (nats/token)")
    loss_ax.plot(x, [s["ctc_loss"] for s in steps], lw=0.6, label="encoder CTC loss (per target token)")
    loss_ax.set_xlabel("step (24 utterances each)")
    loss_ax.set_ylabel("loss")
    loss_ax.set_yscale("log")
    wer_ax = loss_ax.twinx()
    wer_ax.plot([e["step"] for e in evals], [100 * e["wer"] for e in evals], "o-", color="black",
                label="held-out greedy WER (%)")
    wer_ax.set_ylabel("held-out WER (%)")
    wer_ax.set_ylim(0, 100)
    lines = loss_ax.get_legend_handles_labels()[0] + wer_ax.get_legend_handles_labels()[0]
    loss_ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    loss_ax.set_title("qasr-jax tiny-en: training from scratch (benchmarks/train_tiny.py)")
    fig.tight_layout()
    fig.savefig(CURVE + ".png", dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="the --out folder of benchmarks/train_tiny.py")
    args = ap.parse_args()
    ship_model(args.run)
    ship_clips(args.run)
    ship_curve(args.run)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(PACKAGE) for f in fs)
    print(f"shipped {size / 2**20:.2f} MB of model into {PACKAGE}, clips into {CLIPS}, curve {CURVE}.png")


if __name__ == "__main__":
    main()
