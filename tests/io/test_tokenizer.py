"""Tokenizer: both layouts load Qwen's real BPE, agree with tokenizer.json and transformers, and decode safely."""

import json
import unicodedata

import numpy as np
import pytest
from qasr_jax.testing.tokenizer_files import ASR_ADDED_TOKENS, build_hf_tokenizer_json, qwen_bpe_dir, write_tokenizer
from tokenizers import Tokenizer as HFTokenizers

from qasr_jax.io.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError

# NFC text in many scripts; several characters here span two or more BPE tokens.
TEXTS = [
    "Hello, world! It's 2026 and we'll transcribe   spaces,\ttabs\nand newlines.\r\n",
    "今天天气很好，我们去公园散步吧。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 텍스트를 토큰화합니다.",
    "مرحبا بالعالم، هذا نص عربي.",
    "Emoji: 🫠🫡 👩‍👩‍👧 👍🏽",
    "Accents: café naïve Ångström Dvořák ḁ",
    "Rare: 龘靐齉 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ཀྵ ঊ ꙮ ⿰ Ǆ",
    "Mixed 中文 English 日本語 123,456.78 %$#@!",
    "",
]


@pytest.fixture(scope="module")
def package_tokenizer_json():
    return HFTokenizers.from_file(str(qwen_bpe_dir() / "tokenizer.json"))


@pytest.mark.parametrize("layout", ["official", "hf"])
def test_control_token_ids(toks, layout):
    tok = toks[layout]
    assert tok.vocab_size == 151706
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert (tok.audio_start_id, tok.audio_end_id, tok.audio_pad_id) == (151669, 151670, 151676)
    assert (tok.non_speech_id, tok.asr_text_id, tok.timestamp_id) == (151675, 151704, 151705)
    assert tok.eos_ids == (151645, 151643)
    for token_id, content, _ in ASR_ADDED_TOKENS:
        assert tok.token_to_id(content) == token_id
        assert tok.id_to_token(token_id) == content
    assert tok.token_to_id("<blank1>") == 151677 and tok.token_to_id("<blank27>") == 151703
    assert tok.token_to_id("<think>") == 151667  # Qwen3's own added tokens are kept
    assert tok.token_to_id("no such token") is None
    assert tok.id_to_token(8948) == "system" and tok.id_to_token(220) == "Ġ"


def test_layouts_agree_and_round_trip(toks):
    for text in TEXTS:
        ids = toks["official"].encode(text)
        assert toks["hf"].encode(text) == ids, text
        assert all(i < 151643 for i in ids), "plain text must not produce control tokens"
        for tok in toks.values():
            assert tok.decode(ids) == text, text


def test_encodings_match_qwen_tokenizer_json(tok, package_tokenizer_json):
    # The official layout rebuilds pre-tokenizer, normaliser and decoder by hand; the shipped tokenizer.json is truth.
    for text in TEXTS + ["e\u0301 and A\u030a are not NFC", "  leading and trailing  ", "a\n\n\nb\r\n\r\nc"]:
        expect = package_tokenizer_json.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == expect, text


def test_matches_transformers_qwen2_tokenizer(folders, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folders["official"]))
    assert type(hf).__name__ == "Qwen2Tokenizer"
    with_controls = (
        "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Hi<|im_end|>\nlanguage English<asr_text>ok"
    )
    for text in TEXTS + [with_controls]:
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, parse_special=True) == ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_nfc_normalisation(tok):
    decomposed = "cafe\u0301 A\u030angstro\u0308m"
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))
    assert tok.decode(tok.encode(decomposed)) == "café Ångström"


def test_encode_does_not_parse_control_strings_unless_asked(tok):
    text = "<|im_end|><asr_text><|audio_pad|>"
    ids = tok.encode(text)
    assert all(i < 151643 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, parse_special=True) == [151645, 151704, 151676]


def test_decode_skips_special_tokens(tok):
    hello = tok.encode("Hello")
    ids = [151644, *hello, 151669, 151676, 151670, 151677, 151645, 151643]
    assert tok.decode(ids) == "Hello"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>Hello<|audio_start|><|audio_pad|><|audio_end|><blank1><|im_end|><|endoftext|>"
    )
    # <asr_text> is a plain added token, as in the released tokenizer: it stays so output parsing can find it.
    assert tok.decode([*tok.encode("language English"), 151704, *hello]) == "language English<asr_text>Hello"
    assert tok.is_special(151645) and tok.is_special(151676) and not tok.is_special(151704)
    assert tok.is_added(151704) and not tok.is_added(hello[0])


def test_decode_drops_ids_outside_the_vocabulary(tok):
    # The model's embedding has 151936 rows; ids past the tokenizer's 151706 have no text.
    hello = tok.encode("Hello world")
    assert tok.decode([hello[0], 151900, -1, *hello[1:]]) == "Hello world"


def test_decode_accepts_numpy_ids(tok):
    ids = tok.encode("数组")
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == "数组"


def test_truncated_decode_never_corrupts_earlier_text(tok):
    """Ids cut mid-character decode to the right text so far plus one U+FFFD for the incomplete bytes."""
    cut_mid_char = 0
    for text in TEXTS:
        ids = tok.encode(text)
        for k in range(len(ids) + 1):
            partial = tok.decode(ids[:k])
            stable = partial.rstrip("\ufffd")
            assert text.startswith(stable), (text, k, partial)
            # The byte prefix of ids[:k] covers at most one incomplete character, shown as a single U+FFFD.
            assert len(partial) - len(stable) <= 1, (text, k, partial)
            cut_mid_char += partial != stable
    assert cut_mid_char >= 5, "the texts must exercise cuts inside a character"


def test_incremental_decoder_emits_whole_characters(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        for step in (1, 2, 3):
            dec = IncrementalDecoder(tok)
            pieces = [dec.push(ids[i : i + step]) for i in range(0, len(ids), step)]
            pieces.append(dec.flush())
            assert "".join(pieces) == text, (text, step)
            assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_skips_special_and_flushes_incomplete_bytes(tok):
    dec = IncrementalDecoder(tok)
    ids = tok.encode("好🫠")
    assert dec.push([151644, ids[0]]) == "好"
    assert dec.push(ids[1:-1]) == ""  # emoji bytes incomplete: held back
    assert dec.flush() == "\ufffd"  # the stream ended mid-character
    assert dec.push(ids) == "好🫠"  # flushed decoder starts afresh


def test_tokenizer_json_with_extra_tokens_in_config(tmp_path):
    # A tokenizer.json lacking the ASR tokens still loads when tokenizer_config.json lists them (as transformers does).
    (tmp_path / "tokenizer.json").symlink_to(qwen_bpe_dir() / "tokenizer.json")
    write_tokenizer(tmp_path / "off", "official")
    (tmp_path / "tokenizer_config.json").write_bytes((tmp_path / "off" / "tokenizer_config.json").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.asr_text_id == 151704 and tok.encode("<blank27>", parse_special=True) == [151703]


def test_gap_in_added_token_ids_is_an_error(tmp_path):
    folder = write_tokenizer(tmp_path, "official")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"]["151800"] = cfg["added_tokens_decoder"].pop("151705")  # <timestamp> moved
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"<timestamp>.*151800.*151705"):
        Tokenizer.from_dir(folder)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "missing: vocab.json, merges.txt, tokenizer_config.json" in str(err.value)
    (tmp_path / "vocab.json").symlink_to(qwen_bpe_dir() / "vocab.json")
    with pytest.raises(TokenizerError, match="missing: merges.txt, tokenizer_config.json$"):
        Tokenizer.from_dir(tmp_path)


def test_config_without_asr_tokens_is_rejected(tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).symlink_to(qwen_bpe_dir() / name)  # Qwen3's own config: no audio tokens
    with pytest.raises(TokenizerError, match=r"<\|audio_start\|>.*added_tokens_decoder"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="layout"):
        write_tokenizer(tmp_path / "x", "gguf")


def test_written_folders_are_deterministic(tmp_path, folders):
    again = write_tokenizer(tmp_path / "official", "official")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (folders["official"] / name).read_bytes()
    # The hf file comes from a cache; building it afresh must give the same bytes.
    fresh = build_hf_tokenizer_json(tmp_path / "tokenizer.json")
    assert fresh.read_bytes() == (folders["hf"] / "tokenizer.json").read_bytes()
