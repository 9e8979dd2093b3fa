"""Pallas windowed-attention kernels against the pure-jnp reference, forward and gradients, plus dispatch.

One parametrized suite runs both kernels -- GPU (Triton) and TPU (Mosaic) -- compiled on their own platform and in
the Pallas interpreter elsewhere: ``interpret=True`` is the HLO interpreter for the GPU kernel and
``pltpu.InterpretParams`` for the TPU kernel. Lowering tests export both kernels for their real platforms ("cuda",
"tpu") from any machine, which runs the Pallas -> Triton and Pallas -> Mosaic lowerings at the released models'
shapes. Shapes are small (at most three windows) because interpretation is slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qasr_jax.kernels import gpu_attention, tpu_attention, windowed_attention, windowed_attention_reference

# The package exports the function under the submodule's name; fetch the module itself for its warning registry.
dispatch_module = importlib.import_module("qasr_jax.kernels.windowed_attention")

KERNELS = {"gpu": gpu_attention.windowed_attention_gpu, "tpu": tpu_attention.windowed_attention_tpu}
# Several blocks per window (and unequal forward/backward tiles): exercises the online softmax across key blocks,
# the skipped blocks past the length and, on TPU, the backward's statistics recompute.
SMALL_BLOCKS = {
    "gpu": gpu_attention.BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32),
    "tpu": tpu_attention.BlockSizes(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32),
}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # max|kernel - ref| / max|ref|

# (window, seq, lengths, heads, dtype, small_blocks): every item below has a partial last window or padding rows.
CASES = {
    "w104-f32-len0-and-window-past-end": (104, 250, (250, 100, 0), 2, jnp.float32, False),
    "w104-bf16-14heads": (104, 150, (150,), 14, jnp.bfloat16, False),
    "w13-f32-16heads": (13, 30, (27, 14), 16, jnp.float32, False),
    "w26-bf16-len0": (26, 60, (60, 0), 2, jnp.bfloat16, False),
    "w52-f32-batch4": (52, 100, (100, 52, 51, 1), 1, jnp.float32, False),
    "w37-bf16": (37, 80, (80, 40), 2, jnp.bfloat16, False),
    "w37-f32": (37, 80, (75,), 2, jnp.float32, False),
    "w104-f32-small-blocks": (104, 250, (250, 130), 1, jnp.float32, True),
}


def _inputs(seq, lengths, heads, dtype, head_dim=64, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    shape = (len(lengths), seq, heads, head_dim)
    # Padding rows hold random values, not zeros: the kernels must mask them out, not rely on them being zero.
    q, k, v, dout = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    return q, k, v, jnp.asarray(lengths, jnp.int32), dout


def _relative_error(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_matches_reference_forward_and_gradients(kernel, case):
    window, seq, lengths, heads, dtype, small_blocks = CASES[case]
    q, k, v, lengths, dout = _inputs(seq, lengths, heads, dtype)
    blocks = SMALL_BLOCKS[kernel] if small_blocks else None
    interpret = jax.default_backend() != kernel  # compiled on its own platform, interpreted elsewhere

    @jax.jit
    def forward_and_grads(q, k, v):
        kernel_fn = partial(KERNELS[kernel], lengths=lengths, window=window, block_sizes=blocks, interpret=interpret)
        reference_fn = lambda q, k, v: windowed_attention_reference(q, k, v, lengths, window)
        out, kernel_vjp = jax.vjp(kernel_fn, q, k, v)
        ref, reference_vjp = jax.vjp(reference_fn, q, k, v)
        return out, ref, kernel_vjp(dout), reference_vjp(dout)

    with jax.default_matmul_precision("highest"):  # float32 dots in full precision on GPU/TPU too (not TF32)
        out, ref, grads, ref_grads = forward_and_grads(q, k, v)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    for name, x in [("out", out), *zip(("dq", "dk", "dv"), grads)]:
        assert np.isfinite(np.asarray(x, np.float32)).all(), f"{name} has NaN/inf"
    assert _relative_error(out, ref) <= tol
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype
        assert _relative_error(g, g_ref) <= tol, name
    # Rows at or past an item's length are exact zeros, and so are the gradients of its padding tokens.
    pad = np.arange(seq)[None, :] >= np.asarray(lengths)[:, None]  # (batch, seq)
    for x in (out, *grads):
        assert not np.asarray(x, np.float32)[pad].any()


def test_kernels_agree_with_each_other_at_real_shape_14_heads():
    """0.6B encoder shape (14 x 64, window 104), two items, one ending mid-window: GPU and TPU forward agree."""
    q, k, v, lengths, _ = _inputs(208, (208, 117), 14, jnp.float32, seed=3)
    with jax.default_matmul_precision("highest"):  # the reference's dots in full float32 on a GPU too
        ref = windowed_attention_reference(q, k, v, lengths, 104)
        for kernel in KERNELS.values():
            assert _relative_error(kernel(q, k, v, lengths, 104, interpret=True), ref) <= 1e-5


def _lowering_target(platform):
    """Newer jax (0.11) lowers Triton only for a known GPU: with none present, name an abstract H100 as the target."""
    if platform != "cuda" or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100))


def _export(kernel, platform, shape, dtype, window=104, block_sizes=None):
    q = jax.ShapeDtypeStruct(shape, dtype)
    lengths = jax.ShapeDtypeStruct(shape[:1], jnp.int32)

    def train_step(q, k, v, lengths):
        out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, lengths, window, block_sizes=block_sizes), q, k, v)
        return out, vjp(out)

    with _lowering_target(platform):
        exported = jax.export.export(
            jax.jit(train_step),
            platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(q, q, q, lengths)
    return exported.mlir_module()


@pytest.mark.parametrize("heads", [14, 16])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_for_their_platforms_at_real_shapes(heads, dtype):
    """Both kernels, forward and backward, lower to Triton (cuda) and Mosaic (tpu) at the encoders' shapes."""
    shape = (2, 60 * 13, heads, 64)  # 60 s of audio, 8 windows of 104 (the last partial)
    triton = _export(gpu_attention.windowed_attention_gpu, "cuda", shape, dtype)
    assert triton.count("custom_call @__gpu$xla.gpu.triton") == 2  # forward, backward
    mosaic = _export(tpu_attention.windowed_attention_tpu, "tpu", shape, dtype)
    assert mosaic.count("custom_call @tpu_custom_call") == 2


def test_tpu_kernel_lowers_with_several_blocks_per_window():
    mosaic = _export(tpu_attention.windowed_attention_tpu, "tpu", (1, 520, 2, 128), jnp.bfloat16, window=256)
    assert mosaic.count("custom_call @tpu_custom_call") == 2


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_compiled_kernel_on_device(platform):
    """The compiled kernel (no interpreter) at the 1.7B shape, forward and gradients, bfloat16 and float32."""
    if jax.default_backend() != platform:
        pytest.skip(f"no {platform.upper()} present: the compiled {platform} kernel needs one")
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, lengths, dout = _inputs(3 * 104 + 50, (362, 200, 0), 16, dtype, seed=5)

        @jax.jit  # one program per side: op-by-op dispatch of the reference's VJP is slow on a GPU
        def forward_and_grads(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: KERNELS[platform](q, k, v, lengths, 104), q, k, v)
            ref, ref_vjp = jax.vjp(lambda q, k, v: windowed_attention_reference(q, k, v, lengths, 104), q, k, v)
            return out, ref, vjp(dout), ref_vjp(dout)

        with jax.default_matmul_precision("highest"):
            out, ref, grads, ref_grads = forward_and_grads(q, k, v)
        assert _relative_error(out, ref) <= TOLERANCE[dtype]
        for g, g_ref in zip(grads, ref_grads):
            assert np.isfinite(np.asarray(g, np.float32)).all()
            assert _relative_error(g, g_ref) <= TOLERANCE[dtype]


# --- dispatch -----------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_warnings():
    dispatch_module._warned_reasons.clear()
    yield
    dispatch_module._warned_reasons.clear()


def _uses_pallas(impl, x, backend=None, monkeypatch=None, **kwargs):
    if backend is not None:
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
    lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
    jaxpr = jax.make_jaxpr(lambda x: windowed_attention(x, x, x, lengths, 13, impl=impl, **kwargs))(x)
    return "pallas_call" in str(jaxpr)


def test_pallas_on_cpu_without_interpret_raises():
    x = jnp.zeros((1, 26, 2, 64))
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU error path")
    with pytest.raises(ValueError, match="no kernel for the 'cpu' backend.*interpret=True"):
        windowed_attention(x, x, x, jnp.array([26]), 13, impl="pallas")


def test_pallas_with_interpret_runs_the_gpu_kernel_on_cpu():
    # On the CPU device and at full float32 precision even on a GPU host, whose default float32 dots are TF32 (an
    # error of ~1e-4 in the reference alone).
    with jax.default_device(jax.devices("cpu")[0]), jax.default_matmul_precision("highest"):
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 26, 2, 64))
        assert _uses_pallas("pallas", x, interpret=True)
        lengths = jnp.array([26, 20])
        out = windowed_attention(x, x, x, lengths, 13, impl="pallas", interpret=True)
        assert out.devices() == {jax.devices("cpu")[0]}
        assert _relative_error(out, windowed_attention_reference(x, x, x, lengths, 13)) <= 1e-5


def test_auto_on_cpu_uses_xla_silently(monkeypatch, fresh_warnings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _uses_pallas("auto", jnp.zeros((1, 26, 2, 64)), "cpu", monkeypatch)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_picks_the_platform_kernel(backend, monkeypatch, fresh_warnings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _uses_pallas("auto", jnp.zeros((1, 26, 2, 64), jnp.bfloat16), backend, monkeypatch)
        assert _uses_pallas("pallas", jnp.zeros((1, 26, 2, 64)), backend, monkeypatch)


def test_auto_falls_back_to_xla_and_warns_once_per_reason(monkeypatch, fresh_warnings):
    odd_head_dim = jnp.zeros((1, 26, 2, 12))  # not a multiple of 8
    with pytest.warns(UserWarning, match="falls back to XLA.*head_dim a multiple of 8"):
        assert not _uses_pallas("auto", odd_head_dim, "gpu", monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same reason again: no second warning
        assert not _uses_pallas("auto", odd_head_dim, "gpu", monkeypatch)
    with pytest.warns(UserWarning, match="TPU kernel takes head_dim 64, 128 or 256"):
        assert not _uses_pallas("auto", jnp.zeros((1, 26, 2, 32)), "tpu", monkeypatch)
    with pytest.warns(UserWarning, match="float32, bfloat16 or float16, not int32"):
        assert not _uses_pallas("auto", jnp.zeros((1, 26, 2, 64), jnp.int32), "gpu", monkeypatch)


def test_pallas_with_unsupported_input_raises(monkeypatch):
    with pytest.raises(ValueError, match="head_dim a multiple of 8"):
        _uses_pallas("pallas", jnp.zeros((1, 26, 2, 12)), "gpu", monkeypatch)


def test_unknown_impl_raises():
    x = jnp.zeros((1, 13, 1, 8))
    with pytest.raises(ValueError, match="must be one of"):
        windowed_attention(x, x, x, jnp.array([13]), 13, impl="flash")


def test_block_sizes_are_frozen_with_per_backend_defaults():
    assert gpu_attention.BlockSizes.get_default().block_q == 64
    assert tpu_attention.BlockSizes.get_default().block_q == 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        gpu_attention.BlockSizes.get_default().block_q = 32
