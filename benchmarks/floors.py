"""What this machine allows: its CPU (lscpu), copy bandwidth, the best matmul rate XLA reaches per precision, and
the FLOPs and bytes of the model's stages, so every timing in bench_all.py can stand next to its floor.

floor(stage) = max(bytes it must read / copy bandwidth, FLOPs / best matmul rate of its precision)
"""

from __future__ import annotations

import subprocess
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.modeling.quant import matmul


def lscpu() -> dict[str, str]:
    """lscpu's fields (Model name, CPU family, Model, CPU(s), Flags...)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def cpu_line() -> str:
    info = lscpu()
    flags = info.get("Flags", "").split()
    isa = ", ".join(f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags)
    return (f"{info.get('Model name', '?')} (family {info.get('CPU family', '?')}, model {info.get('Model', '?')}), "
            f"{info.get('CPU(s)', '?')} CPUs, {isa}")


RATE_SHAPE = (1024, 6144)  # a decoder-sized kernel; 8 of them (201 MB in float32) are more than the L3 cache
RATE_ROWS = (1, 8, 160, 1280)


def _chain(x, ws, quantized):
    for w in ws:  # each product feeds the next, as the model's layers do
        if quantized:
            y = matmul(x, w, 0, jnp.ones(w.shape[1:], jnp.float32), jnp.float32)
        else:
            y = matmul(x, w, 0, out_dtype=jnp.float32)
        x = (x.astype(jnp.float32) + 1e-3 * y.reshape(x.shape[0], -1, x.shape[1]).sum(1)).astype(x.dtype)
    return x


def matmul_rates(repeats: int = 5) -> dict[str, dict[int, float]]:
    """GFLOP/s of ``qasr_jax.modeling.quant.matmul`` (the model's own matmul forms) per precision and row count: a chain of 8
    (1024 x 6144) products, best of ``repeats``."""
    rng = np.random.default_rng(0)
    base = [rng.standard_normal(RATE_SHAPE).astype(np.float32) * 0.03 for _ in range(8)]
    kernels = {"float32": [jnp.asarray(w) for w in base], "bfloat16": [jnp.asarray(w, jnp.bfloat16) for w in base],
               "int8": [jnp.asarray(np.clip(np.round(w * 1000), -127, 127), jnp.int8) for w in base]}
    out: dict[str, dict[int, float]] = {}
    for name, ws in kernels.items():
        fn = jax.jit(partial(_chain, quantized=name == "int8"))
        out[name] = {}
        for rows in RATE_ROWS:
            x = jnp.full((rows, RATE_SHAPE[0]), 0.1, jnp.bfloat16 if name == "bfloat16" else jnp.float32)
            jax.block_until_ready(fn(x, ws))
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(x, ws))
                best = min(best, time.perf_counter() - start)
            out[name][rows] = 2 * rows * RATE_SHAPE[0] * RATE_SHAPE[1] * len(ws) / best / 1e9
    return out


def decoder_matmul_params(cfg) -> int:
    """Weights one decoder token multiplies by, heads excluded: q|k|v, o, gate|up, down of every layer."""
    t = cfg.text
    qkv = t.hidden_size * (t.heads + 2 * t.kv_heads) * t.head_dim
    per_layer = qkv + t.heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    return per_layer * t.layers


def decoder_flops(cfg, tokens: int, context: int, logits_rows: int) -> float:
    """FLOPs of ``tokens`` decoder tokens attending over ``context`` positions, the head on ``logits_rows`` rows."""
    t = cfg.text
    attention = 4 * t.heads * t.head_dim * context * t.layers
    head = 2 * t.hidden_size * (cfg.num_labels if cfg.is_aligner else t.vocab_size)
    return tokens * (2 * decoder_matmul_params(cfg) + attention) + logits_rows * head


def encoder_flops(cfg, chunks: int) -> float:
    """FLOPs of the audio encoder + projector over ``chunks`` one-second chunks (convs, layers, windows)."""
    a = cfg.audio
    c = a.downsample_hidden_size
    f1, t1 = (a.num_mel_bins + 1) // 2, (a.chunk_frames + 1) // 2
    f2, t2 = (f1 + 1) // 2, (t1 + 1) // 2
    f3, t3 = (f2 + 1) // 2, (t2 + 1) // 2
    convs = 2 * 9 * c * (f1 * t1 + c * f2 * t2 + c * f3 * t3)
    tokens = t3 * chunks
    d = a.d_model
    layers = a.layers * (2 * (4 * d * d + 2 * d * a.ffn_dim) + 4 * d * min(tokens, a.window_tokens))
    return chunks * convs + tokens * (2 * c * f3 * d + layers + 2 * (d * d + d * a.output_dim))


def step_bytes(params, cfg, batch: int, context: int, kv_dtype) -> dict[str, int]:
    """Bytes one decode step must read: decoder layers, the head (the whole embedding when tied), and the keys and
    values of ``context`` positions in each of ``batch`` rows."""
    dec = params["decoder"]
    layers = sum(x.nbytes for k, v in dec.items() if k.startswith("layers") for x in jax.tree_util.tree_leaves(v))
    if cfg.is_aligner:
        head = sum(x.nbytes for x in jax.tree_util.tree_leaves(params["score"]))
    elif cfg.text.tie_word_embeddings:
        head = sum(x.nbytes for x in jax.tree_util.tree_leaves(dec["embed"]))
    else:
        head = sum(x.nbytes for x in jax.tree_util.tree_leaves(params["lm_head"]))
    t = cfg.text
    kv = 2 * t.layers * t.kv_heads * t.head_dim * jnp.dtype(kv_dtype).itemsize * batch * context
    return {"layers": layers, "head": head, "kv": kv}
