"""Convert the public datasets the paper uses into the project's shards (`narvl data convert <format>`).

Every converter writes `out_dir/<task>/<split>/{split}-%06d.tar` + `manifest.json` through
`stages.data.shards.ShardWriter` (the sample schema of `stages/data/schema.py`; dataset name = the format, version =
`VERSION`). One sample per caption image (all references), per question, per referring expression, per
hypothesis. Images keep their original bytes (JPEG/PNG; any other format is re-encoded to PNG and counted);
resizing happens in the loader (`data.image_size`).

Formats and their inputs (`sources` maps a source split name to a file; `split_map` maps source split names to
output splits, default: identity plus the aliases in `DEFAULT_SPLIT_MAP`, e.g. restval -> train, val2014 -> val):

- `coco-caption`: official `captions_*.json` (`captions={split: file}`) or Karpathy's `dataset_coco.json`
  (`karpathy=file`, splits train/restval/val/test from the file), images searched under `images`.
- `vqa`: official VQA v2 `questions={split: file}` + `annotations={split: file}`; `answers` = the 10 annotator
  answers as strings (confidence weights = min(#matches / 3, 1) are derived from them); `meta` keeps answer_type,
  question_type, multiple_choice_answer and the annotators' answer_confidence. Images under `images`, named
  `COCO_{subtype}_{id:012d}.jpg` (2014) or `{id:012d}.jpg` (2017); the folder is searched recursively.
- `refcoco`: either one-expression-per-line JSONL (`jsonl={split: file}`, keys file_name, bbox_xywh, sentence,
  image_id, ann_id) or the official `refs(unc).p` + `instances.json` pair (`refs=file, instances=file`; the pickle
  is read with an unpickler that accepts only builtin containers). COCO xywh boxes become xyxy pixels.
- `snli-ve`: SNLI-VE JSONL (`jsonl={split: file}`; Flickr30K_ID / Flickr30k_ID / Flikr30kID, sentence1 = premise
  caption, sentence2 = hypothesis, gold_label entailment/neutral/contradiction -> yes/maybe/no), images under
  `images` (`<flickr id>.jpg`).
- `ofa-tsv`: OFA's TSV files (`task=...`, `tsv={split: file}`); the columns per task are in `ofa_tsv.py`.

One module per format (`coco_caption.py`, `vqa.py`, `refcoco.py`, `snli_ve.py`, `ofa_tsv.py`); `base.py` holds what
they share: the record, the image index, validation of every record (`on_bad="error"` raises `ConversionError`,
`"skip"` counts by reason) and resume (a split with a manifest is finished; one without is rebuilt).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.data.converters.base import FORMATS, ConversionError
from stages.data.converters.coco_caption import convert_coco_caption
from stages.data.converters.ofa_tsv import convert_ofa_tsv
from stages.data.converters.refcoco import convert_refcoco
from stages.data.converters.snli_ve import convert_snli_ve
from stages.data.converters.vqa import convert_vqa

CONVERTERS: dict[str, Callable[..., dict]] = {
    "coco-caption": convert_coco_caption,
    "vqa": convert_vqa,
    "refcoco": convert_refcoco,
    "snli-ve": convert_snli_ve,
    "ofa-tsv": convert_ofa_tsv,
}


def convert(fmt: str, args: dict[str, Any], out_dir: Path) -> dict:
    """Run the converter of `fmt` with keyword `args` (see each `convert_<format>`); return its report."""
    if fmt not in CONVERTERS:
        raise ConversionError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    return CONVERTERS[fmt](Path(out_dir), **args)


__all__ = ["CONVERTERS", "FORMATS", "ConversionError", "convert"]
