"""Train-step throughput of qasr_jax against transformers' native Qwen3-ASR: forward, backward, gradient clipping
and AdamW on the same batch from the same random weights, float32, in the same run.

Both sides load one random-weight checkpoint (built once with tests/reference.py, saved in float32) and train on
the same rows: ``--rows`` clips of about ``--seconds`` s (noise and chirps; lengths spread by 10%), each with a
``--target-tokens``-token target and the loss on those tokens only. The reference is
``Qwen3ASRForConditionalGeneration`` with ``labels`` (-100 except the targets), ``loss.backward()``,
``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW``; ours is ``qasr_jax.training.trainer.Trainer.step`` (the same
clipping and AdamW, optax). The machine's memory decides what fits, so the two sides never live at once: each
round builds one side, runs ``--warmup`` steps then ``--steps`` timed steps, frees it, and builds the other
(alternating; the first round's order flips every round). Their first-step losses are compared (same weights,
same inputs: the same step). Peak resident memory is sampled per side.

Throughput is audio seconds trained per wall second; model FLOP utilisation (MFU) is the step's model FLOPs
(counted from the shapes: encoder convolutions, attention windows, decoder, the LM head at the target positions;
x3 for the trained parts, forward and backward) over the step time and this machine's best measured float32
matmul rate (jax and torch, square matrices).

    python benchmarks/bench_train.py [--preset asr-0.6b] [--train full|decoder] [--rows 2] [--seconds 8]
        [--rounds 2] [--steps 2] [--warmup 1] [--remat] [--checkpoint DIR]

``--train decoder`` freezes the encoder and projector on both sides (their weights get no gradient or AdamW
state): the 0.6B's full step needs ~13 GB for weights, gradients and moments before activations.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import tempfile
import threading
import time

import numpy as np


TARGET_WORDS = ("speech", "recognition", "in", "jax", "trains", "the", "whole", "model", "on", "a", "cpu")


def cpu_name() -> str:
    """lscpu's model name and CPU family."""
    info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                .splitlines() if ":" in line)
    return f"{info.get('Model name', '?').strip()} (family {info.get('CPU family', '?').strip()})"


class PeakRSS:
    """Samples this process's resident memory every 50 ms while active."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def matmul_rate(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best float32 GFLOP/s of an n x n matmul in jax and in torch."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    out = {}
    f = jax.jit(jnp.dot)
    x = jnp.asarray(a)
    f(x, x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, x).block_until_ready()
        times.append(time.perf_counter() - t)
    out["jax"] = 2 * n**3 / min(times) / 1e9
    t_a = torch.from_numpy(a)
    torch.mm(t_a, t_a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(t_a, t_a)
        times.append(time.perf_counter() - t)
    out["torch"] = 2 * n**3 / min(times) / 1e9
    return out


def model_flops(cfg, n_frames: list[int], prompt_lens: list[int], targets: int, train: str) -> float:
    """Model FLOPs of one train step: forward multiply-adds x 2, x 3 for trained parts (x 1 for a frozen encoder)."""
    from qasr_jax.modeling.config import audio_token_count

    a, t = cfg.audio, cfg.text
    c = a.downsample_hidden_size
    enc = proj = dec = 0.0
    for frames, length in zip(n_frames, prompt_lens):
        chunks = -(-frames // a.chunk_frames)
        enc += chunks * (64 * 50 * c * 9 + 32 * 25 * c * c * 9 + 16 * 13 * c * c * 9 + 13 * c * a.freq_bins * a.d_model)
        n = audio_token_count(frames, a)
        window = min(n, a.window_tokens)
        enc += a.layers * n * (4 * a.d_model**2 + 2 * a.d_model * a.ffn_dim + 2 * window * a.d_model)
        proj += n * (a.d_model**2 + a.d_model * a.output_dim)
        q, kv = t.heads * t.head_dim, t.kv_heads * t.head_dim
        per_token = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
        dec += t.layers * length * (per_token + 2 * (length / 2) * q)
    dec += len(n_frames) * targets * t.vocab_size * t.hidden_size
    frozen_encoder = 1 if train == "decoder" else 3
    return 2 * (frozen_encoder * (enc + proj) + 3 * dec)


def make_rows(rows: int, seconds: float, target_tokens: int, tok):
    from qasr_jax.testing import synthetic

    waves = [synthetic(seconds * (0.9 + 0.2 * i / max(rows - 1, 1)), i) for i in range(rows)]
    words = []
    while len(tok.encode(" ".join(words))) < target_tokens - 3:  # header tokens, <asr_text>, <|im_end|> besides
        words.append(TARGET_WORDS[len(words) % len(TARGET_WORDS)])
    return [{"audio": w, "text": "language English<asr_text>" + " ".join(words)} for w in waves]


def run_ours(folder: str, records, args) -> dict:
    import jax

    import qasr_jax
    from qasr_jax.training.data import examples_from_records, step_batch
    from qasr_jax.io.tokenizer import Tokenizer
    from qasr_jax.training.trainer import TrainConfig, Trainer

    with PeakRSS() as rss:
        model = qasr_jax.load(folder)
        freeze = ("encoder", "projector") if args.train == "decoder" else ()
        trainer = Trainer(model, TrainConfig(steps=1000, dtype="float32", remat=args.remat, freeze=freeze))
        state = trainer.init_state()
        batch = step_batch(examples_from_records(records), Tokenizer.from_dir(folder), model.config,
                           len(records), 1)
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            loss = float(metrics["loss"])  # waits for the step
            times.append(time.perf_counter() - t)
            losses.append(loss)
        del trainer, state, model
        gc.collect()
        jax.clear_caches()
    return {"times": times[args.warmup:], "first": times[0], "loss": losses[0], "rss": rss.peak,
            "batch": batch}


def run_reference(folder: str, batch, records, args) -> dict:
    import torch
    from transformers import Qwen3ASRForConditionalGeneration
    from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor

    fe = Qwen3ASRFeatureExtractor()
    alone = [fe([r["audio"]], sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
             for r in records]
    frames = max(x["input_features"].shape[2] for x in alone)
    feats = torch.zeros(len(records), 128, frames)
    feat_mask = torch.zeros(len(records), frames, dtype=torch.long)
    for i, x in enumerate(alone):
        feats[i, :, : x["input_features"].shape[2]] = x["input_features"][0]
        feat_mask[i, : x["input_features"].shape[2]] = x["attention_mask"][0]
    ids = torch.tensor(batch.ids[0], dtype=torch.long)
    labels = torch.full(ids.shape, -100, dtype=torch.long)
    for r in range(ids.shape[0]):
        real = batch.weights[0, r] > 0
        labels[r, torch.tensor(batch.positions[0, r][real] + 1)] = torch.tensor(batch.targets[0, r][real],
                                                                                 dtype=torch.long)
    mask = torch.tensor(batch.token_mask[0].astype(np.int64))
    with PeakRSS() as rss:
        model = Qwen3ASRForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        model.train()
        if args.train == "decoder":
            for p in model.model.audio_tower.parameters():
                p.requires_grad_(False)
            for p in model.model.multi_modal_projector.parameters():
                p.requires_grad_(False)
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=2e-5, weight_decay=0.0)
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask, input_features=feats, input_features_mask=feat_mask,
                        labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            times.append(time.perf_counter() - t)
            losses.append(float(out.loss))
        del model, opt, trained, out
        gc.collect()
    return {"times": times[args.warmup:], "first": times[0], "loss": losses[0], "rss": rss.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="asr-0.6b")
    parser.add_argument("--train", default="full", choices=["full", "decoder"])
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--target-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--checkpoint", default=None, help="reuse a random-weight -hf checkpoint folder")
    args = parser.parse_args()

    import torch

    from qasr_jax.modeling.config import preset
    from qasr_jax.io.tokenizer import Tokenizer
    from qasr_jax.testing.tokenizer_files import write_tokenizer

    cfg = preset(args.preset)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads); preset {args.preset}; train {args.train}; rows {args.rows} x ~{args.seconds} s; "
          f"{args.target_tokens} target tokens; remat {args.remat}", flush=True)
    rates = matmul_rate()
    best = max(rates.values())
    print(f"best float32 matmul (2048^2): jax {rates['jax']:.1f}, torch {rates['torch']:.1f} GFLOP/s", flush=True)
    folder = args.checkpoint
    if folder is None:
        from qasr_jax.testing.reference import build_reference, save_hf

        folder = os.path.join(tempfile.mkdtemp(prefix="bench_train_"), "ckpt")
        ref = build_reference(cfg, seed=0)
        save_hf(ref, folder)
        del ref
        gc.collect()
    if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        write_tokenizer(folder, "official")
    records = make_rows(args.rows, args.seconds, args.target_tokens, Tokenizer.from_dir(folder))
    audio = sum(len(r["audio"]) for r in records) / 16000

    results: dict[str, list] = {"ours": [], "reference": []}
    batch = None
    for rnd in range(args.rounds):
        for side in (("ours", "reference") if rnd % 2 == 0 else ("reference", "ours")):
            if side == "ours":  # round 0 runs ours first: the reference reads the batch our pipeline built
                out = run_ours(folder, records, args)
                batch = out.pop("batch")
            else:
                out = run_reference(folder, batch, records, args)
            results[side].append(out)
            print(f"round {rnd} {side:9s}: steps {['%.2f' % t for t in out['times']]} s (first {out['first']:.1f} s),"
                  f" loss {out['loss']:.5f}, peak RSS {out['rss'] / 2**30:.1f} GiB", flush=True)

    n_frames = [int(x) for x in batch.n_frames[0]]
    prompt_lens = [int(x) for x in batch.token_mask[0].sum(1)]
    flops = model_flops(cfg, n_frames, prompt_lens, args.target_tokens, args.train)
    print(f"\n{cpu_name()}; {audio:.1f} s of audio a step; model FLOPs a step {flops / 1e12:.2f} T; "
          f"best matmul {best:.1f} GFLOP/s")
    summary = {}
    for side, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        med = statistics.median(times)
        summary[side] = med
        print(f"{side:9s}: step median {med:.2f} s (min {min(times):.2f}, {len(times)} steps), "
              f"{audio / med:.2f} audio-s/s, MFU {100 * flops / med / (best * 1e9):.1f}%, "
              f"peak RSS {max(r['rss'] for r in runs) / 2**30:.1f} GiB")
    loss_ours, loss_ref = results["ours"][0]["loss"], results["reference"][0]["loss"]
    print(f"first-step loss: ours {loss_ours:.6f}, reference {loss_ref:.6f} "
          f"(rel diff {abs(loss_ours - loss_ref) / abs(loss_ref):.1e})")
    print(f"speed-up (reference median / ours median): {summary['reference'] / summary['ours']:.2f}x")


if __name__ == "__main__":
    main()
