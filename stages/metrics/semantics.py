"""Caption semantics on the synthetic shapes benchmark: do the objects a caption names match the image's objects?

The caption parser comes from the benchmark (`stages.data.shapes.parse_caption`); this module only compares the parsed
objects with the true ones, as multisets (so two red circles must be named twice).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Hashable, Mapping


def caption_semantics(
    predictions: Mapping[Hashable, str],
    objects_by_id: Mapping[Hashable, Collection[Hashable]],
    parse_fn: Callable[[str], Collection[Hashable]],
) -> dict[str, float]:
    """Exact-match rate and micro F1 of the objects named in predicted captions.

    Args:
        predictions: id -> predicted caption; ids absent here count as captions naming nothing.
        objects_by_id: id -> the image's true objects (hashable, e.g. (colour, shape) tuples).
        parse_fn: caption -> the objects it names, in the same form as `objects_by_id`.

    Returns:
        {"set_acc": share of images whose named objects equal the true ones, "object_f1": micro F1 over all
        objects, "precision", "recall", "n"}.
    """
    if not objects_by_id:
        raise ValueError("caption_semantics: no images")
    exact = tp = fp = fn = 0
    for key, objects in objects_by_id.items():
        true = Counter(objects)
        named = Counter(parse_fn(predictions[key])) if key in predictions else Counter()
        exact += named == true
        hit = sum((named & true).values())
        tp += hit
        fp += sum(named.values()) - hit
        fn += sum(true.values()) - hit
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "set_acc": exact / len(objects_by_id),
        "object_f1": f1,
        "precision": precision,
        "recall": recall,
        "n": len(objects_by_id),
    }
