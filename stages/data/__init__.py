"""Data, not stages: what the stages read and write.

- `schema`: the sample schema of the shards (keys per task, the task prompts, label and box conventions).
- `tasks`: training and evaluation targets per task, the box -> location-token mapping.
- `shapes`: the built-in synthetic benchmark generator (and what its targets need, `SHAPES_MIN_QUERIES`).
- `shards`: WebDataset tar shards: `ShardWriter` + manifest, and the reader into padded batches.
- `converters`: the public datasets (COCO captions, VQA v2, RefCOCO, SNLI-VE, OFA TSV) into shards.
"""
