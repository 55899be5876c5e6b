"""OFA's TSV files -> `<task>` shards (`narvl data convert ofa-tsv`).

Inputs: `task=...`, `tsv={split: file}`; tab-separated, no header, one sample per line:

| task       | columns                                                                        |
|------------|--------------------------------------------------------------------------------|
| caption    | uniq-id, image-id, caption (references joined by "&&"), object labels, image b64 |
| vqa        | uniq-id, image-id, question, answers ("conf|!+answer" joined by "&&"), object labels, |
|            | image b64                                                                      |
| grounding  | uniq-id, image-id, text, box "x0,y0,x1,y1" (pixels), image b64                 |
| entailment | uniq-id, image-id, image b64, hypothesis, premise caption, label               |

OFA's VQA files carry confidences, not the 10 raw answers: each answer is repeated max(1, round(3 * conf))
times in `answers` (exact for confidences 1/3, 2/3, 1) and the exact confidences are kept in
`meta.answer_confidence`. Entailment labels may be entailment/neutral/contradiction or yes/maybe/no.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.data.converters.base import (
    ConversionError,
    Malformed,
    OnBad,
    Record,
    clean_id,
    entailment_word,
    group_splits,
    read_lines,
    write_task,
)

TSV_COLUMNS = {"caption": 5, "vqa": 6, "grounding": 5, "entailment": 6}


def _parse_ofa_answers(raw: str) -> tuple[list[str], dict[str, float]]:
    answers: list[str] = []
    conf: dict[str, float] = {}
    for item in raw.split("&&"):
        if not item.strip():
            continue
        c, sep, ans = item.partition("|!+")
        if not sep:
            raise ValueError(f"answer {item!r} is not 'confidence|!+answer'")
        value = float(c)
        if not 0 <= value <= 1:  # also refuses nan
            raise ValueError(f"answer {item!r}: confidence {c!r} is not a number in [0, 1]")
        conf[ans] = value
        answers += [ans] * max(1, round(3 * value))
    return answers, conf


def _tsv_record(task: str, cols: list[str], src: str, i: int, split: str) -> Record:
    uid, image_id = cols[0], cols[1]
    meta: dict[str, Any] = {"uniq_id": uid, "image_id": image_id}
    if task == "caption":
        fields: dict[str, Any] = {"references": [c.strip() for c in cols[2].split("&&")]}
        b64 = cols[4]
    elif task == "vqa":
        answers, conf = _parse_ofa_answers(cols[3])
        fields = {"question": cols[2].strip(), "answers": answers}
        meta["answer_confidence"] = conf
        b64 = cols[5]
    elif task == "grounding":
        box = [float(v) for v in cols[3].split(",")]
        if len(box) != 4:
            raise ValueError(f"box {cols[3]!r} does not have four numbers")
        fields = {"expression": cols[2].strip(), "box": box}
        b64 = cols[4]
    else:
        raw = cols[5].strip()
        fields = {"premise": cols[4].strip(), "hypothesis": cols[3].strip(),
                  "label": entailment_word(raw)}
        b64 = cols[2]
    return Record(src, i, f"ofa_{clean_id(uid)}", split, task, fields, meta, image_b64=b64.strip())


def convert_ofa_tsv(out_dir: Path, *, task: str, tsv: dict[str, Path], split_map: dict[str, str] | None = None,
                    samples_per_shard: int = 1000, on_bad: OnBad = "error", workers: int = 2, resume: bool = True,
                    progress: bool = True) -> dict:
    """OFA's TSV files (see the module docstring for the columns) -> `<task>` shards.

    Args:
        out_dir: output root; shards go to `out_dir/<task>/<split>/`.
        task: caption | vqa | grounding | entailment (the TSV layout).
        tsv: source split -> TSV file (e.g. {"train": caption_stage1_train.tsv, "test": caption_test.tsv}).
        split_map: source split -> output split (defaults: `DEFAULT_SPLIT_MAP`).
    """
    if task not in TSV_COLUMNS:
        raise ConversionError(f"ofa-tsv: unknown task {task!r}; one of {sorted(TSV_COLUMNS)}")
    ncols = TSV_COLUMNS[task]

    def records(files: list[tuple[str, Path]], split: str) -> Iterator[Record]:
        for _, path in files:
            for i, line in read_lines(path):
                if isinstance(line, Malformed):
                    yield Record(str(path), i, f"{Path(path).stem}_line{i}", split, task, {},
                                 bad=("malformed", str(line)))
                    continue
                cols = line.split("\t")
                if len(cols) != ncols:
                    yield Record(str(path), i, f"{Path(path).stem}_line{i}", split, task, {}, bad=(
                        "malformed", f"{len(cols)} tab-separated columns, a {task} TSV line has {ncols}"))
                    continue
                try:
                    yield _tsv_record(task, cols, str(path), i, split)
                except ValueError as e:
                    yield Record(str(path), i, f"ofa_{clean_id(cols[0])}", split, task, {},
                                 bad=("malformed", str(e)))

    splits = {s: (lambda f=f, s=s: records(f, s)) for s, f in group_splits(tsv, split_map).items()}
    return write_task("ofa-tsv", task, splits, out_dir, samples_per_shard=samples_per_shard, on_bad=on_bad,
                      workers=workers, resume=resume, progress=progress, sources=[str(p) for p in tsv.values()])

