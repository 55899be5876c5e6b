"""Where a training step's time goes on the CPU: loading a batch (shard read, PNG decode, tokenising, collate)
versus the model's forward and backward, split into the image backbone and the rest, plus the optimizer step.

    python -m bench.train_step_profile --data <a prepare_data output folder> [--task caption] [--steps 20] \
        [--batch-size 32] [--threads 1] [--profile default] [model overrides as model.overrides.x=y ...]

The data folder is any prepare_data output of the built-in benchmark (e.g. one that bench/learning_probe.py wrote
under its --root). Prints mean ms per step of each part and samples/s; the model is built from the profile's model
section (its preset and overrides), randomly initialised: the figures are of compute, not of learning.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from narvl_model.model import ARModel
from narvl_model.tokenizer import Tokenizer
from pipeline.config import load_config
from stages.data.shards import make_loader
from stages.train import compute_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--task", default="caption")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", default="default")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(profile=args.profile, overrides=args.overrides)
    tok = Tokenizer.load(args.data / "tokenizer")
    mcfg = cfg.model.build(args.task, vocab_size=tok.vocab_size, blank_id=tok.blank_id, pad_id=tok.pad_id,
                           bos_id=tok.bos_id, eos_id=tok.eos_id)
    model = ARModel(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = iter(make_loader(args.data / "train", tok, args.task, args.batch_size, train=True, seed=0,
                              image_size=mcfg.image_size, max_source_len=mcfg.max_source_positions))
    times: dict[str, list[float]] = {k: [] for k in ("load", "backbone fwd+bwd", "model fwd+bwd", "optimizer")}
    for step in range(args.steps + 2):  # the first two steps warm up
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        feats = model.encoder.backbone(batch.image)  # the backbone alone, forward and backward
        feats.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss, _ = compute_loss("ar", model, batch, blank_id=tok.blank_id, pad_id=tok.pad_id, label_smoothing=0.1)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step >= 2:
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[k].append(1000 * dt)
    n_params = sum(p.numel() for p in model.parameters())
    grid = mcfg.image_size // (16 if mcfg.backbone == "resnet" else mcfg.image_stride)
    step_ms = sum(statistics.fmean(v) for k, v in times.items() if k != "backbone fwd+bwd")
    print(f"{args.task}: {n_params / 1e6:.2f}M parameters, d_model {mcfg.d_model}, {grid}x{grid} image tokens, "
          f"batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps")
    for k, v in times.items():
        note = " (inside the model's fwd+bwd; timed apart)" if k == "backbone fwd+bwd" else ""
        print(f"  {k:18s} {statistics.fmean(v):8.1f} ms{note}")
    print(f"  step (load + model + optimizer) {step_ms:.1f} ms = {1000 * args.batch_size / step_ms:.0f} samples/s")


if __name__ == "__main__":
    main()
