"""Time the encoder's windowed attention: Pallas kernel vs XLA windowed (the reference) vs XLA dense-masked.

Shapes are the AuT encoders' (0.6B: 14 heads x 64, 1.7B: 16 heads x 64), window 104, one audio of 10 s, 60 s,
5 min or 20 min (13 tokens per second). Each row is timed forward and forward+backward (jax.vjp with a fixed
cotangent, forward included). FLOP/s and bytes/s use the useful work of block-diagonal attention (QK^T and PV
over each window's real tokens; backward 2.5x forward) and the minimum traffic (read q, k, v, write o; backward
also reads o, dO and writes dq, dk, dv), the same for every implementation, so the columns compare directly.

On GPU/TPU the kernel of that platform is timed. On CPU there is no kernel: the XLA forms are timed and both
kernels are checked against the reference in interpret mode at a small shape. Dense-masked attention builds the
full (T x T) mask and scores, so it is skipped where those would not fit in memory (20 min).

    python benchmarks/bench_attention.py [--quick] [--dtype float32|bfloat16] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from qasr_jax.kernels import windowed_attention, windowed_attention_gpu, windowed_attention_reference
from qasr_jax.kernels import windowed_attention_tpu

TOKENS_PER_SECOND = 13
WINDOW = 104
HEAD_DIM = 64
ENCODERS = {"0.6B": 14, "1.7B": 16}  # name -> heads
DURATIONS = {"10 s": 10, "60 s": 60, "5 min": 300, "20 min": 1200}
DENSE_SCORE_BYTES_LIMIT = 4 << 30  # (heads, T, T) float32 scores above this: skip dense (backward keeps several)


def dense_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, window: int) -> jax.Array:
    """The same attention with a materialised (T x T) block-diagonal mask: q, k, v (batch, seq, heads, head_dim)."""
    seq, head_dim = q.shape[1], q.shape[-1]
    pos = jnp.arange(seq)
    same_window = (pos[:, None] // window) == (pos[None, :] // window)  # (T, T)
    valid = pos[None, :] < lengths[:, None]  # (batch, T)
    mask = same_window[None] & valid[:, None, :] & valid[:, :, None]  # (batch, T, T)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(jnp.where(mask.any(-1)[:, None, :, None], scores, 0.0), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return jnp.where(valid[:, :, None, None], out, 0.0).astype(q.dtype)


def useful_flops_and_bytes(seq: int, heads: int, itemsize: int, backward: bool) -> tuple[float, float]:
    """FLOPs of block-diagonal attention over real tokens, and the minimum bytes moved."""
    full, last = divmod(seq, WINDOW)
    pairs = full * WINDOW**2 + last**2
    flops = 4.0 * pairs * heads * HEAD_DIM
    tile = seq * heads * HEAD_DIM * itemsize
    return (3.5 * flops, 12.0 * tile) if backward else (flops, 4.0 * tile)


def time_ms(fn, args, repeats: int, calls: int = 1) -> float:
    """Median wall time of a jitted call in ms, after one compile-and-run.

    Each timed round queues ``calls`` calls and waits once, so on a GPU the per-call dispatch (~0.1 ms from
    Python) overlaps the kernels instead of being counted in every sub-millisecond call.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def forward_and_train_step(attend, lengths):
    forward = jax.jit(lambda q, k, v: attend(q, k, v, lengths, WINDOW))

    @jax.jit
    def train_step(q, k, v, dout):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, lengths, WINDOW), q, k, v)
        return out, vjp(dout)

    return forward, train_step


def check_kernels_in_interpret_mode() -> str:
    """Both kernels vs the reference at a small shape (two items, one ending mid-window), forward and gradients."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, dout = (jax.random.normal(key, (2, 2 * WINDOW + 20, 2, HEAD_DIM)) for key in keys)
    lengths = jnp.array([2 * WINDOW + 20, 150])
    ref, ref_vjp = jax.vjp(lambda q, k, v: windowed_attention_reference(q, k, v, lengths, WINDOW), q, k, v)
    ref_grads = ref_vjp(dout)
    lines = []
    for name, kernel in (("GPU (Triton)", windowed_attention_gpu), ("TPU (Mosaic)", windowed_attention_tpu)):
        out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, lengths, WINDOW, interpret=True), q, k, v)
        errs = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip((out, *vjp(dout)),
                                                                                    (ref, *ref_grads))]
        lines.append(f"  {name} kernel, interpret mode, float32: max|diff|/max|ref| out {errs[0]:.1e}, "
                     f"dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s and 60 s only, fewer repeats")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--repeats", type=int, help="timed calls per row (median); default 10, 3 with --quick")
    args = parser.parse_args()

    platform = jax.default_backend()
    device = jax.devices()[0]
    has_kernel = platform in ("gpu", "tpu")
    dtype = jnp.dtype(args.dtype or ("bfloat16" if has_kernel else "float32"))
    repeats = args.repeats or (3 if args.quick else 10)
    durations = {k: v for k, v in DURATIONS.items() if not args.quick or v <= 60}
    per_round = " rounds of 20 queued calls" if has_kernel else ""
    print(f"device: {device.device_kind} ({platform}, {jax.device_count()} device(s)); jax {jax.__version__}; "
          f"dtype {dtype.name}; window {WINDOW}; batch 1; median of {repeats}{per_round}")

    impls = {"xla windowed": windowed_attention_reference, "xla dense-masked": dense_masked_attention}
    if has_kernel:
        impls = {f"pallas {platform}": lambda *a: windowed_attention(*a, impl="pallas"), **impls}

    notes = []
    header = f"{'encoder':>7} {'audio':>6} {'tokens':>6} {'impl':<17} {'pass':<8} {'ms':>10} {'GFLOP/s':>9} {'GB/s':>8}"
    print(header)
    print("-" * len(header))
    for encoder, heads in ENCODERS.items():
        for audio, seconds in durations.items():
            seq = seconds * TOKENS_PER_SECOND
            keys = jax.random.split(jax.random.PRNGKey(seconds), 4)
            q, k, v, dout = (jax.random.normal(key, (1, seq, heads, HEAD_DIM), dtype) for key in keys)
            lengths = jnp.array([seq], jnp.int32)
            for name, attend in impls.items():
                if name.endswith("dense-masked") and heads * seq * seq * 4 > DENSE_SCORE_BYTES_LIMIT:
                    notes.append(f"{encoder} {audio}: dense-masked skipped, its (heads, T, T) float32 scores alone "
                                 f"are {heads * seq * seq * 4 / 2**30:.1f} GiB")
                    continue
                forward, train_step = forward_and_train_step(attend, lengths)
                for label, fn, fn_args, backward in (("fwd", forward, (q, k, v), False),
                                                     ("fwd+bwd", train_step, (q, k, v, dout), True)):
                    ms = time_ms(fn, fn_args, repeats, calls=20 if has_kernel else 1)
                    flops, nbytes = useful_flops_and_bytes(seq, heads, dtype.itemsize, backward)
                    print(f"{encoder:>7} {audio:>6} {seq:>6} {name:<17} {label:<8} {ms:>10.3f} "
                          f"{flops / ms / 1e6:>9.2f} {nbytes / ms / 1e6:>8.2f}", flush=True)
    for note in notes:
        print("note:", note)
    if not has_kernel:
        print(f"note: no GPU/TPU on this machine ({platform}): the Pallas kernels were not timed; they were checked "
              "against the reference in interpret mode:")
        print(check_kernels_in_interpret_mode())


if __name__ == "__main__":
    main()
