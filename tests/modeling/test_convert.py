"""Checkpoint conversion: both layouts, shards and dtypes; Orbax round trip; errors that list every problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qasr_jax
from qasr_jax.modeling.config import ConfigError, config_from_hf_dict, load_config
from qasr_jax.convert.checkpoint import (
    CheckpointError, expected_tensors, load_hf_params, params_to_hf, read_safetensors, tree_to_numpy,
)
from qasr_jax.convert.orbax_io import restore_orbax, save_orbax
from qasr_jax.modeling.model import param_shapes
from qasr_jax.testing.reference import official_config, save_hf, save_official


def leaves_equal(a, b) -> bool:
    same_tree = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_tree and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def test_torch_weights_land_where_the_model_reads_them(checkpoints):
    """Spot checks of the transforms against the torch state dict (Linear transposed, Conv2d to HWIO, q|k|v grouped
    by kv head, gate|up), and the way back: params -> checkpoint tensors gives the state dict exactly."""
    ck = checkpoints("asr")
    state = {k: v.numpy() for k, v in ck.torch_model.state_dict().items()}
    params = load_hf_params(ck.official, ck.cfg)
    conv = state["model.audio_tower.conv2d2.weight"]  # (out, in, kh, kw)
    np.testing.assert_array_equal(params["audio_tower"]["conv2d2"]["kernel"][2, 1, 5, 7], conv[7, 5, 2, 1])
    t = ck.cfg.text
    groups = t.heads // t.kv_heads
    qkv = params["decoder"]["layers_1"]["qkv"]["kernel"]  # (hidden, kv_heads, groups + 2, head_dim)
    assert qkv.shape == (t.hidden_size, t.kv_heads, groups + 2, t.head_dim)
    q1 = state["model.language_model.layers.1.self_attn.q_proj.weight"]  # (heads * head_dim, hidden)
    k1 = state["model.language_model.layers.1.self_attn.k_proj.weight"]  # (kv_heads * head_dim, hidden)
    # Query head h uses kv head h // groups: its head_dim rows sit at [kv = h // groups, h % groups].
    h, kv, d = 3, 1, 5
    np.testing.assert_array_equal(qkv[:, h // groups, h % groups, d], q1[h * t.head_dim + d])
    np.testing.assert_array_equal(qkv[:, kv, groups, d], k1[kv * t.head_dim + d])
    up = state["model.language_model.layers.0.mlp.up_proj.weight"]  # (intermediate, hidden)
    np.testing.assert_array_equal(params["decoder"]["layers_0"]["gate_up"]["kernel"][:, 1], up.T)
    back = params_to_hf(params, ck.cfg)
    assert set(back) == set(expected_tensors(ck.cfg)) == set(state) - {"lm_head.weight"}  # tied head
    for name, tensor in back.items():
        np.testing.assert_array_equal(tensor, state[name], err_msg=name)
    np.testing.assert_array_equal(
        params["projector"]["proj2"]["bias"], state["model.multi_modal_projector.linear_2.bias"]
    )
    np.testing.assert_array_equal(
        params["audio_tower"]["layers_0"]["mlp_norm"]["scale"], state["model.audio_tower.layers.0.final_layer_norm.weight"]
    )


@pytest.mark.parametrize("kind", ["asr", "aligner"])
def test_bf16_sharded_layouts_load_identically(checkpoints, tmp_path, kind):
    """bf16 weights, sharded -hf (save_pretrained) and sharded official files give the same params."""
    ck = checkpoints(kind)
    hf = save_hf(ck.torch_model, str(tmp_path / "hf"), dtype=torch.bfloat16, max_shard_size="200KB")
    assert os.path.isfile(os.path.join(hf, "model.safetensors.index.json"))
    off = save_official(ck.torch_model, ck.cfg, str(tmp_path / "off"), dtype=torch.bfloat16, shards=3)
    for dtype in ("float32", "bfloat16"):
        a, b = load_hf_params(hf, ck.cfg, dtype), load_hf_params(off, ck.cfg, dtype)
        assert leaves_equal(a, b)
        assert all(x.dtype == np.dtype(jax.numpy.dtype(dtype)) for x in jax.tree_util.tree_leaves(a))
    # bf16 -> float32 is exact: the float32 params hold exactly the bf16 values.
    ref = ck.torch_model.state_dict()["model.language_model.norm.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(load_hf_params(off, ck.cfg)["decoder"]["norm"]["scale"], ref)


def test_orbax_round_trip_is_bit_identical(checkpoints, tmp_path):
    ck = checkpoints("asr")
    params = load_hf_params(ck.hf, ck.cfg)
    save_orbax(str(tmp_path / "exp"), params, ck.cfg, copy_from=ck.hf)
    restored, cfg = restore_orbax(str(tmp_path / "exp"))
    assert cfg == ck.cfg
    assert leaves_equal(params, restored)
    # qasr_jax.load sees the export and gives the same model, with the same tree as every other load.
    model = qasr_jax.load(str(tmp_path / "exp"))
    assert leaves_equal(params, tree_to_numpy(model.params))
    assert jax.tree_util.tree_structure(model.params) == jax.tree_util.tree_structure(param_shapes(ck.cfg))
    # Restored a layer at a time (convert/orbax_io.py), cast on the way: bf16 equals the params cast to bf16.
    half = qasr_jax.load(str(tmp_path / "exp"), dtype="bfloat16")
    assert leaves_equal(jax.tree_util.tree_map(lambda x: np.asarray(x, jnp.bfloat16), params),
                        tree_to_numpy(half.params))


def test_cli_convert_writes_a_loadable_export(checkpoints, tmp_path):
    ck = checkpoints("aligner")
    dst = tmp_path / "converted"
    proc = subprocess.run(
        [sys.executable, "-m", "qasr_jax.cli", "convert", ck.official, str(dst)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    model = qasr_jax.load(str(dst))
    assert model.config == ck.cfg
    assert leaves_equal(tree_to_numpy(model.params), load_hf_params(ck.hf, ck.cfg))


def _official_copy(ck, dst) -> tuple[str, dict]:
    shutil.copytree(ck.official, dst)
    merged = read_safetensors(str(dst))
    return str(dst), merged


def _rewrite(folder: str, tensors: dict) -> None:
    for f in os.listdir(folder):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(folder, f))
    save_file({k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()},
              os.path.join(folder, "model.safetensors"))


def test_bad_checkpoint_lists_every_problem(checkpoints, tmp_path):
    ck = checkpoints("asr")
    folder, tensors = _official_copy(ck, tmp_path / "bad")
    del tensors["thinker.model.layers.1.mlp.up_proj.weight"]  # removed
    tensors["thinker.audio_tower.extra_gate.weight"] = np.zeros((2, 2), np.float32)  # extra
    tensors["thinker.audio_tower.conv_out.weight"] = np.zeros((5, 7), np.float32)  # mis-shaped
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError) as err:
        qasr_jax.load(folder)
    msg = str(err.value)
    assert folder in msg
    assert "missing 1 tensor(s): thinker.model.layers.1.mlp.up_proj.weight\n" in msg
    assert "1 unexpected tensor(s): thinker.audio_tower.extra_gate.weight" in msg
    a = ck.cfg.audio
    want = (a.d_model, a.downsample_hidden_size * a.freq_bins)  # torch Linear (out, in)
    assert f"thinker.audio_tower.conv_out.weight: shape (5, 7), expected {want}" in msg


def test_errors_name_the_exact_tensor_and_its_shapes(checkpoints, tmp_path):
    """One layer's mis-shaped tensor: its name, its shape and the expected one (not a stacking error); a tensor
    deleted from layer 2 is named as layer 2's."""
    ck = checkpoints("asr")
    folder, tensors = _official_copy(ck, tmp_path / "layer")
    name = "thinker.model.layers.1.self_attn.k_proj.weight"
    good = tensors[name].shape
    tensors[name] = np.zeros((good[0] + 16, good[1]), np.float32)
    del tensors["thinker.audio_tower.layers.1.fc2.bias"]
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError) as err:
        qasr_jax.load(folder)
    msg = str(err.value)
    assert f"{name}: shape {(good[0] + 16, good[1])}, expected {good}" in msg
    assert "missing 1 tensor(s): thinker.audio_tower.layers.1.fc2.bias\n" in msg
    assert "layers.0" not in msg and "layers.2" not in msg


def test_truncated_file_names_the_file_and_the_fix(checkpoints, tmp_path):
    ck = checkpoints("asr")
    folder = str(tmp_path / "cut")
    shutil.copytree(ck.hf, folder)
    file = os.path.join(folder, "model.safetensors")
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt.*[Dd]ownload"):
        qasr_jax.load(folder)


def test_missing_whole_tensor_is_named(checkpoints, tmp_path):
    ck = checkpoints("asr-untied")
    folder, tensors = _official_copy(ck, tmp_path / "nohead")
    del tensors["thinker.lm_head.weight"]
    _rewrite(folder, tensors)
    with pytest.raises(CheckpointError, match="lm_head"):
        qasr_jax.load(folder)


def test_shard_listed_but_absent(checkpoints, tmp_path):
    ck = checkpoints("asr")
    folder = str(tmp_path / "shards")
    shutil.copytree(ck.official, folder)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(CheckpointError, match=shard):
        qasr_jax.load(folder)


def test_config_errors_name_the_field(checkpoints):
    ck = checkpoints("asr")
    good = official_config(ck.cfg)
    assert config_from_hf_dict(good) == load_config(ck.official)
    missing = json.loads(json.dumps(good))
    del missing["thinker_config"]["text_config"]["num_hidden_layers"]
    with pytest.raises(ConfigError, match="thinker_config.text_config.num_hidden_layers"):
        config_from_hf_dict(missing)
    contradictory = json.loads(json.dumps(good))
    contradictory["thinker_config"]["audio_config"]["output_dim"] += 1
    with pytest.raises(ConfigError, match="output_dim"):
        config_from_hf_dict(contradictory)
    theta = json.loads(json.dumps(good))
    theta["thinker_config"]["text_config"]["rope_parameters"] = {"rope_theta": 5.0, "rope_type": "default"}
    with pytest.raises(ConfigError, match="rope_theta"):
        config_from_hf_dict(theta)
    with pytest.raises(ConfigError, match="thinker_config"):
        config_from_hf_dict({"model_type": "qwen3_asr"})


def test_hf_config_parses_to_the_same_config(checkpoints):
    for kind in ("asr", "asr-untied", "aligner"):
        ck = checkpoints(kind)
        assert load_config(ck.hf) == load_config(ck.official) == ck.cfg


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qasr_jax.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        qasr_jax.load(str(tmp_path / "empty"))
