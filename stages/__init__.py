"""Pipeline stages and what they read.

- Stage modules (prepare_data, pretrain, train_teacher, train_nar, distill, evaluate, benchmark): each exposes
  `run(cfg, inputs, out_dir, log)`; nothing runs at import.
- `stages.data`: what is not a stage but data: the sample schema, task targets, the built-in "shapes" benchmark
  generator, WebDataset shards (writer and reader) and the converters of the public datasets.
- `stages.metrics`: one pure function per task over predictions and references.
- Shared by the stages: `config` (the stage configs), `common` (the stage log, atomic JSON writes); `train`
  (the training loop train_teacher and train_nar share).
"""
