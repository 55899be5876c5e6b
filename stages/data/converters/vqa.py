"""VQA v2 -> `vqa` shards (`narvl data convert vqa`), one sample per question with its 10 annotator answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from stages.data.converters.base import (
    ConversionError,
    ImageIndex,
    Malformed,
    OnBad,
    Record,
    clean_id,
    get,
    get_list,
    group_splits,
    malformed,
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

    def record(q: dict, i: int, qpath: Path, apath: Path, anns: dict[int, dict], subtype: str, split: str
               ) -> Record:
        qid, image_id, question = get(q, "question_id", "int"), get(q, "image_id", "int"), get(q, "question", "str")
        ann = anns.get(qid)
        if ann is None:
            raise Malformed(f"question {qid} has no annotation in {apath}")
        answers = []
        try:
            for k, a in enumerate(get(ann, "answers", "list")):
                try:
                    answers.append(get(a, "answer", "str"))
                except Malformed as e:
                    raise Malformed(f"answers[{k}]: {e}") from None
        except Malformed as e:
            raise Malformed(f"the annotation of question {qid} in {apath}: {e}") from None
        name = f"COCO_{subtype}_{image_id:012d}.jpg" if subtype else None
        p = index.find(name, image_id)
        meta = {"question_id": qid, "image_id": image_id, "answer_type": ann.get("answer_type"),
                "question_type": ann.get("question_type"),
                "multiple_choice_answer": ann.get("multiple_choice_answer"),
                "answer_confidence": [a.get("answer_confidence") for a in ann["answers"]]}
        return Record(str(qpath), i, f"vqa_{clean_id(qid)}", split, "vqa",
                      {"question": question.strip(), "answers": answers}, meta,
                      image_path=p, missing=None if p else index.describe(name, image_id))

    def records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
        for src, qpath in files:
            qdata, apath = read_json(qpath), annotations[src]
            questions = get_list(qdata, "questions", qpath)
            anns: dict[int, dict] = {}
            for j, a in enumerate(get_list(read_json(apath), "annotations", apath)):
                try:
                    anns[get(a, "question_id", "int")] = a
                except Malformed as e:
                    yield malformed(apath, j, split, "vqa", e, where=f"annotations[{j}]")
            subtype = qdata.get("data_subtype") or ""
            if not isinstance(subtype, str):
                raise ConversionError(f"{qpath}: 'data_subtype' is {subtype!r}, expected a string such as val2014")
            for i, q in enumerate(questions):
                try:
                    yield record(q, i, qpath, apath, anns, subtype, split)
                except Malformed as e:
                    qid = q.get("question_id") if isinstance(q, dict) else None
                    yield malformed(qpath, i, split, "vqa", e, id=f"vqa_{clean_id(qid)}" if qid is not None else "",
                                    where=f"questions[{i}]")

    splits = {s: (lambda f=f, s=s: records(f, s)) for s, f in grouped.items()}
    return write_task("vqa", "vqa", splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad,
                      workers=workers, resume=resume, progress=progress,
                      sources=[str(p) for p in [*questions.values(), *annotations.values()]])

