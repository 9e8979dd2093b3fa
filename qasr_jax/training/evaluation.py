"""Word and character error rates of a model on a manifest (``qasr-jax evaluate``), through jiwer.

References are the manifests' targets (``language X<asr_text>transcript``), hypotheses what ``Transcriber`` writes
for the audio with the row's prompt as context (language detected, not forced). Both sides are normalised the
same way before scoring: Unicode NFKC, case folded, punctuation and symbols dropped, whitespace collapsed. WER is
computed for every language, CER too for Chinese, Japanese, Korean and Cantonese (spaces removed first); every
figure is corpus-level (errors summed over rows, divided by reference words or characters), a fraction.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence

from qasr_jax.training.data import Example

CER_LANGUAGES = ("Chinese", "Japanese", "Korean", "Cantonese")


def normalize(text: str) -> str:
    """NFKC, case folded, punctuation and symbols dropped (apostrophes inside words kept), spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        inner_apostrophe = ch in "'’" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
        kept.append(ch if inner_apostrophe or not (cat.startswith("P") or cat.startswith("S")) else " ")
    return " ".join("".join(kept).split())


@dataclasses.dataclass
class Scored:
    """One row: its language, the normalised reference and hypothesis."""

    language: str
    reference: str
    hypothesis: str


def _rates(rows: Sequence[Scored], chars: bool) -> float:
    import jiwer

    if chars:
        refs = [r.reference.replace(" ", "") for r in rows]
        hyps = [r.hypothesis.replace(" ", "") for r in rows]
        out = jiwer.process_characters(refs, hyps)
    else:
        out = jiwer.process_words([r.reference for r in rows], [r.hypothesis for r in rows])
    errors = out.substitutions + out.deletions + out.insertions
    return errors / max(out.substitutions + out.deletions + out.hits, 1)


def score(rows: Sequence[Scored]) -> dict:
    """{"wer", "cer", "n", "per_language": {name: {"n", "wer"[, "cer"]}}}: fractions; "cer" overall is over the
    Chinese, Japanese, Korean and Cantonese rows (None without any)."""
    if not rows:
        raise ValueError("nothing to score: no rows")
    per_language = {}
    for lang in sorted({r.language for r in rows}):
        mine = [r for r in rows if r.language == lang]
        entry = {"n": len(mine), "wer": _rates(mine, chars=False)}
        if lang in CER_LANGUAGES:
            entry["cer"] = _rates(mine, chars=True)
        per_language[lang] = entry
    cjk = [r for r in rows if r.language in CER_LANGUAGES]
    return {"wer": _rates(rows, chars=False), "cer": _rates(cjk, chars=True) if cjk else None, "n": len(rows),
            "per_language": per_language}


def evaluate(transcriber, examples: Sequence[Example], batch_size: int = 8, max_new_tokens: int = 256,
             progress: bool = False) -> tuple[dict, list[dict]]:
    """Transcribe ``examples`` and score them -> (the ``score`` report, one dict per row with its reference,
    hypothesis and detected language)."""
    results = transcriber.transcribe([ex.audio for ex in examples], context=[ex.prompt for ex in examples],
                                     batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    rows, details = [], []
    for ex, res in zip(examples, results):
        rows.append(Scored(ex.language, normalize(ex.transcript), normalize(res.text)))
        details.append({"where": ex.where, "language": ex.language, "detected": res.language,
                        "reference": ex.transcript, "hypothesis": res.text})
    return score(rows), details


def format_report(report: dict) -> str:
    """A plain-text table of a ``score`` report, percentages."""
    lines = [f"{'language':<12} {'n':>6} {'WER %':>8} {'CER %':>8}"]
    for lang, entry in report["per_language"].items():
        cer = f"{100 * entry['cer']:8.2f}" if "cer" in entry else f"{'':>8}"
        lines.append(f"{lang:<12} {entry['n']:>6} {100 * entry['wer']:8.2f} {cer}")
    cer = f"{100 * report['cer']:8.2f}" if report["cer"] is not None else f"{'':>8}"
    lines.append(f"{'overall':<12} {report['n']:>6} {100 * report['wer']:8.2f} {cer}")
    return "\n".join(lines)
