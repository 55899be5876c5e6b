"""VQA v2 -> `vqa` shards (`narvl data convert vqa`), one sample per question with its 10 annotator answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from stages.data.converters.base import (
    ConversionError,
    ImageIndex,
    OnBad,
    Record,
    clean_id,
    group_splits,
    read_json,
    write_task,
)


def convert_vqa(out_dir: Path, *, images: Path, questions: dict[str, Path], annotations: dict[str, Path],
                split_map: dict[str, str] | None = None, samples_per_shard: int = 1000, on_bad: OnBad = "error",
                workers: int = 2, resume: bool = True, progress: bool = True) -> dict:
    """Official VQA v2 questions + annotations -> `vqa` shards, one sample per question.

    Args:
        out_dir: output root; shards go to `out_dir/vqa/<split>/`.
        images: COCO image folder (searched recursively; COCO_{subtype}_{id:012d}.jpg or {id:012d}.jpg).
        questions: source split -> `v2_OpenEnded_mscoco_*_questions.json`.
        annotations: source split -> `v2_mscoco_*_annotations.json` (same keys as `questions`).
        split_map: source split -> output split (defaults: `DEFAULT_SPLIT_MAP`).
    """
    if set(questions) != set(annotations):
        raise ConversionError(f"vqa: questions splits {sorted(questions)} differ from annotations splits "
                              f"{sorted(annotations)} (test-dev questions without answers are not supported)")
    index = ImageIndex(images)
    grouped = group_splits(questions, split_map)

    def records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
        for src, qpath in files:
            qdata, apath = read_json(qpath), annotations[src]
            anns = {a["question_id"]: a for a in read_json(apath).get("annotations", [])}
            subtype = qdata.get("data_subtype", "")
            for i, q in enumerate(qdata.get("questions", [])):
                qid, image_id = q["question_id"], q["image_id"]
                ann = anns.get(qid)
                if ann is None:
                    raise ConversionError(f"{apath}: no annotation for question {qid} (record {i} of {qpath})")
                name = f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else None
                p = index.find(name, image_id)
                answers = [str(a.get("answer", "")) for a in ann.get("answers", [])]
                meta = {"question_id": qid, "image_id": image_id, "answer_type": ann.get("answer_type"),
                        "question_type": ann.get("question_type"),
                        "multiple_choice_answer": ann.get("multiple_choice_answer"),
                        "answer_confidence": [a.get("answer_confidence") for a in ann.get("answers", [])]}
                yield Record(str(qpath), i, f"vqa_{clean_id(qid)}", split, "vqa",
                             {"question": str(q.get("question", "")).strip(), "answers": answers}, meta,
                             image_path=p, missing=None if p else index.describe(name, image_id))

    splits = {s: (lambda f=f, s=s: records(f, s)) for s, f in grouped.items()}
    return write_task("vqa", "vqa", splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad,
                      workers=workers, resume=resume, progress=progress,
                      sources=[str(p) for p in [*questions.values(), *annotations.values()]])

