"""A smoke-trained AR + NARVL pair for serving tests and the load-test benchmark, in plain PyTorch (no Ray Train).

`train_smoke_models(out)` generates a small four-task split of the built-in benchmark (stages.data.shapes), trains a
BPE tokenizer on it, trains an AR model for a few dozen steps (teacher forcing) and a NARVL model initialised
from it (Q-CTC), and writes them as the pipeline does: `tokenizer/`, `ar/checkpoint/`, `narvl/checkpoint/`.
About 7 s on one CPU thread; the models learn the output formats (four location tokens for grounding, one word
for entailment) and a little more.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.serving.predictor import TASKS


def smoke_samples(n_per_task: int, image_size: int, seed: int = 0) -> list[tuple[dict, bytes]]:
    """n_per_task built-in benchmark samples of every task (sample json, PNG bytes)."""
    from stages.data.shapes import generate

    return [s for task in TASKS for s in generate(task, "train", n_per_task, image_size, seed, max_objects=2)]


def train_smoke_models(out: str | Path, *, preset: str = "cpu-nano", n_per_task: int = 24, ar_steps: int = 150,
                       nar_steps: int = 150, num_queries: int = 12, batch_size: int = 16, seed: int = 0
                       ) -> dict[str, Path]:
    """Train and save the pair; returns {"tokenizer", "ar", "narvl"} folders under `out`."""
    from narvl_model.checkpoint import save_model
    from narvl_model.config import ModelConfig
    from narvl_model.losses import ar_ce_loss, qctc_loss
    from narvl_model.model import ARModel, NARVLModel
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import _pad, decode_image
    from stages.data.tasks import eval_target, sample_texts

    out = Path(out)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = ModelConfig.from_name(preset)
    samples = smoke_samples(n_per_task, base.image_size, seed)
    tok = Tokenizer.train([t for s, _ in samples for t in sample_texts(s, 16)], vocab_size=400, num_bins=16)
    tok.save(out / "tokenizer")
    cfg = base.model_copy(update=dict(vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                      eos_id=tok.eos_id, blank_id=tok.blank_id,
                                      max_source_positions=128))
    images = torch.from_numpy(np.stack([decode_image(png, cfg.image_size, s["id"]) for s, png in samples]))
    src = _pad([[tok.bos_id, *tok.encode(s["prompt"]), tok.eos_id] for s, _ in samples], tok.pad_id)
    tgts = [[*tok.encode(eval_target(s, tok.num_bins)), tok.eos_id] for s, _ in samples]
    target = _pad(tgts, tok.pad_id)
    prev = _pad([[tok.bos_id, *t[:-1]] for t in tgts], tok.pad_id)
    lengths = torch.tensor([len(t) for t in tgts])

    def batches(steps: int):
        for _ in range(steps):
            i = torch.from_numpy(rng.choice(len(samples), size=batch_size, replace=False))
            yield i

    ar = ARModel(ModelConfig(**cfg.model_dump())).train()
    opt = torch.optim.AdamW(ar.parameters(), lr=5e-3)
    for i in batches(ar_steps):
        loss = ar_ce_loss(ar(images[i], src[i], prev[i]), target[i], tok.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(ar.eval(), out / "ar" / "checkpoint")

    nar = NARVLModel.from_ar(ar, num_queries).train()
    opt = torch.optim.AdamW(nar.parameters(), lr=5e-3)
    for i in batches(nar_steps):
        loss = qctc_loss(nar(images[i], src[i]), target[i], lengths[i], tok.blank_id).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(nar.eval(), out / "narvl" / "checkpoint")
    return {"tokenizer": out / "tokenizer", "ar": out / "ar", "narvl": out / "narvl"}
