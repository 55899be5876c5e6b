"""Visual entailment (SNLI-VE) accuracy: the decoded label word against the gold label (yes / maybe / no)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from stages.data.schema import ENTAILMENT_LABELS as LABELS
from stages.data.schema import snli_ve_label


def entailment_metrics(
    pred_labels: Mapping[Hashable, str], gold_labels: Mapping[Hashable, str]
) -> dict[str, float]:
    """Accuracy overall and per gold class.

    Predictions are compared after strip() + lower(); any word other than yes / maybe / no, and any id without
    a prediction, counts as wrong. Gold labels may be SNLI names or the answer words.

    Returns:
        {"accuracy", "acc_yes", "acc_maybe", "acc_no", "accuracy_image_dependent", "n"}: a per-class accuracy,
        and `accuracy_image_dependent` (over the yes and no gold labels: on the built-in benchmark the hypotheses
        only the image decides, "maybe" ones being told by their wording), is NaN when it has no gold example.
    """
    if not gold_labels:
        raise ValueError("entailment_metrics: no gold labels")
    correct = dict.fromkeys(LABELS, 0)
    total = dict.fromkeys(LABELS, 0)
    for key, gold in gold_labels.items():
        gold_word = snli_ve_label(gold)
        pred = pred_labels.get(key)
        total[gold_word] += 1
        correct[gold_word] += pred is not None and pred.strip().lower() == gold_word
    n = sum(total.values())
    result: dict[str, float] = {"accuracy": sum(correct.values()) / n}
    for label in LABELS:
        result[f"acc_{label}"] = correct[label] / total[label] if total[label] else float("nan")
    decidable = total["yes"] + total["no"]
    result["accuracy_image_dependent"] = (correct["yes"] + correct["no"]) / decidable if decidable else float("nan")
    result["n"] = n
    return result
