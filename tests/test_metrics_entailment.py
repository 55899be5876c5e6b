"""Entailment accuracy on real SNLI-VE labels."""

from __future__ import annotations

import csv
import json
import math

import pytest

from stages.data.schema import snli_ve_label
from stages.metrics.entailment import entailment_metrics


def test_label_mapping():
    assert snli_ve_label("entailment") == "yes"
    assert snli_ve_label(" Neutral ") == "maybe"
    assert snli_ve_label("contradiction") == "no"
    with pytest.raises(ValueError, match="unknown SNLI-VE label"):
        snli_ve_label("-")


def test_unknown_and_missing_predictions_are_wrong():
    gold = {1: "yes", 2: "no", 3: "maybe", 4: "yes"}
    out = entailment_metrics({1: " Yes", 2: "nope", 3: "maybe"}, gold)
    assert out["accuracy"] == 0.5 and out["acc_yes"] == 0.5 and out["acc_no"] == 0.0 and out["acc_maybe"] == 1.0
    assert out["n"] == 4
    assert math.isnan(entailment_metrics({1: "yes"}, {1: "yes"})["acc_no"])


@pytest.mark.realdata
def test_snli_ve_real_labels(realdata):
    rows = list(csv.DictReader((realdata / "snli_ve" / "esnlive_gt_labels_350.csv").open()))
    gold = {r["pairID"]: r["label"] for r in rows}
    assert len(rows) == 350 and len(gold) == 349  # one pair id appears twice
    words = {k: snli_ve_label(v) for k, v in gold.items()}
    assert entailment_metrics(words, gold)["accuracy"] == 1.0
    # The pair id's last letter is the original SNLI label (e / n / c); e-SNLI-VE relabelled some pairs.
    from_suffix = {k: {"e": "yes", "n": "maybe", "c": "no"}[k[-1]] for k in gold}
    assert entailment_metrics(from_suffix, gold)["accuracy"] == pytest.approx(274 / 349)
    always_yes = entailment_metrics(dict.fromkeys(gold, "yes"), gold)
    share_yes = sum(w == "yes" for w in words.values()) / len(words)
    assert always_yes["accuracy"] == pytest.approx(share_yes) and always_yes["acc_yes"] == 1.0
    assert always_yes["acc_no"] == 0.0

    pairs = [json.loads(line) for line in (realdata / "snli_ve" / "sample_data.jsonl").read_text().splitlines()]
    gold5 = {p["pairID"]: p["gold_label"] for p in pairs}
    assert entailment_metrics({k: snli_ve_label(v) for k, v in gold5.items()}, gold5)["accuracy"] == 1.0
