"""Caption metrics as COCOEvalCap computes them (pycocoevalcap 1.2): BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE.

Both hypotheses and references go through the Stanford PTB tokenizer (lower-cased, punctuation tokens removed)
before scoring, exactly as `pycocoevalcap.eval.COCOEvalCap.evaluate` does. Values are returned raw (CIDEr ~ 1.0,
BLEU in [0, 1]); the pipeline multiplies by 100 for reporting.

OFA additionally strips every `string.punctuation` character from the decoded hypothesis before tokenizing
(`strip_punctuation=True`, the default here). COCOEvalCap itself does not, so parity checks against the toolkit
pass `strip_punctuation=False`.

METEOR starts a Java process (~8 s, 2 GB heap): `meteor=False` skips it. SPICE runs only when its Stanford
CoreNLP jar is present (pycocoevalcap otherwise tries to download it); without the jar it is skipped with a
logged reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import string
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stages.common import StageLog

_LOGGER = logging.getLogger(__name__)
_PUNCT_TABLE = str.maketrans({c: None for c in string.punctuation})
# Characters Java may read as line breaks: one would shift every later caption in the tokenizer's line-aligned
# output.
_LINE_BREAKS = str.maketrans({c: " " for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")


@dataclass
class CaptionEval:
    """Corpus-level metrics plus per-sample CIDEr (and other per-sample scores that were computed)."""

    metrics: dict[str, float]
    per_sample: dict[Hashable, dict[str, float]] = field(default_factory=dict)


def strip_hypothesis_punctuation(text: str) -> str:
    """OFA's hypothesis clean-up: drop every ASCII punctuation character, then surrounding whitespace."""
    return text.translate(_PUNCT_TABLE).strip()


def spice_jar_path() -> Path:
    """Where pycocoevalcap expects the Stanford CoreNLP jar that SPICE needs."""
    import pycocoevalcap.spice.spice as spice_module

    return Path(spice_module.__file__).resolve().parent / "lib" / "stanford-corenlp-3.6.0.jar"


def _info(log: StageLog | logging.Logger | None, msg: str) -> None:
    (log or _LOGGER).info(msg)


def caption_evaluation(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    meteor: bool = True,
    spice: bool | None = None,
    strip_punctuation: bool = True,
    log: StageLog | logging.Logger | None = None,
) -> CaptionEval:
    """Score captions with the COCO caption toolkit.

    Args:
        predictions: id -> hypothesis caption (any hashable ids; empty strings are allowed and score ~0).
        references: id -> reference captions; every predicted id needs at least one reference. Reference ids
            without a prediction are ignored (as COCOEvalCap does with `params['image_id']` = result ids).
        meteor: compute METEOR (starts Java, ~8 s).
        spice: None or True: compute SPICE when its CoreNLP jar is installed, else skip with a logged reason;
            False: never.
        strip_punctuation: strip punctuation from hypotheses as OFA does (False for toolkit parity).
        log: where to report skipped metrics (a StageLog or logging.Logger; default the module logger).

    Returns:
        CaptionEval with metrics keys BLEU-1..BLEU-4, METEOR (if run), ROUGE-L, CIDEr, SPICE (if run) and
        per-sample CIDEr / BLEU-4 / ROUGE-L (/ METEOR) per id.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not predictions:
        raise ValueError("caption metrics: no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"caption metrics: {len(missing)} predictions have no references, e.g. id {missing[0]!r}")

    ids = list(predictions)
    # COCOEvalCap's tokenizer input: id -> list of {"caption": str}.
    hyps = {k: predictions[k].translate(_LINE_BREAKS) for k in ids}
    if strip_punctuation:
        hyps = {k: strip_hypothesis_punctuation(h) for k, h in hyps.items()}
    res_in = {k: [{"caption": hyps[k]}] for k in ids}
    gts_in = {k: [{"caption": c} for c in references[k]] for k in ids}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize(gts_in)
    res = tokenizer.tokenize(res_in)
    # The tokenizer drops an id whose caption tokenizes to nothing at the end of its output; restore it.
    res = {k: res.get(k, [""])[:1] or [""] for k in ids}
    gts = {k: gts[k] for k in ids}

    metrics: dict[str, float] = {}
    per_sample: dict[Hashable, dict[str, float]] = {k: {} for k in ids}

    def record(name: str, corpus: float, scores: Sequence[float]) -> None:
        metrics[name] = float(corpus)
        for k, s in zip(ids, scores, strict=True):
            per_sample[k][name] = float(s)

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratio
        bleu, bleu_per = Bleu(4).compute_score(gts, res)
    for n, key in enumerate(BLEU_KEYS):
        metrics[key] = float(bleu[n])
    for k, s in zip(ids, bleu_per[3], strict=True):
        per_sample[k]["BLEU-4"] = float(s)

    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            record("METEOR", *scorer.compute_score(gts, res))
        finally:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
    else:
        _info(log, "caption metrics: METEOR skipped (meteor=False)")

    record("ROUGE-L", *Rouge().compute_score(gts, res))
    record("CIDEr", *Cider().compute_score(gts, res))

    if spice is False:
        pass
    elif not spice_jar_path().is_file():
        _info(log, f"caption metrics: SPICE skipped: Stanford CoreNLP jar not found at {spice_jar_path()}")
    else:
        from pycocoevalcap.spice.spice import Spice

        try:
            score, scores = Spice().compute_score(gts, res)
            record("SPICE", score, [s["All"]["f"] for s in scores])
        except Exception as e:  # SPICE's Java side is fragile (Java version, cache); never fail the stage on it
            _info(log, f"caption metrics: SPICE failed and was skipped: {e!r}")

    return CaptionEval(metrics=metrics, per_sample=per_sample)


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool | None = None,
    log: StageLog | logging.Logger | None = None,
    *,
    meteor: bool = True,
    strip_punctuation: bool = True,
) -> dict[str, float]:
    """Corpus-level COCO caption metrics (raw values); see `caption_evaluation` for the arguments."""
    return caption_evaluation(
        predictions, references, meteor=meteor, spice=spice, strip_punctuation=strip_punctuation, log=log
    ).metrics
