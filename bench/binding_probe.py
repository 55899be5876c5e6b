"""How much of the image does a small AR model use? Quick teacher-training probes over a pipeline's cached data.

    P="python bench/binding_probe.py --root artifacts --set entangle_positions=false"   # the default profile's VQA
    $P --tasks vqa --steps 1000
    $P --tasks vqa --steps 1000 --set heads=8 --set dropout=0.0
    $P --tasks vqa,entailment --steps 2000          # one model and tokenizer for both tasks, batches alternate
    $P --tasks vqa --decoder-prompt                 # OFA's VQA prompt in the decoder

Reads the prepare_data and shared/pretrain folders of an earlier `narvl run --root ROOT` (the built-in
benchmark), trains an AR model the way train_teacher does (same loader, loss, AdamW, warm-up + linear decay, clip
1.0) in one process without Ray or DeepSpeed, and prints, every --eval-every steps, the validation exact match
per task (grounding: Acc@0.5) next to the text-only baseline (evaluate.blind_baseline; VQA and entailment).
Several tasks share one model and one tokenizer trained on all their texts, the tasks' batches taking turns.
--decoder-prompt feeds the prompt to the decoder as a prefix (OFA's VQA/SNLI-VE `prev_output` prompts; the loss
covers the answer only), which NARVL's decoder cannot use. Not a test: it prints figures (docs/REPRODUCTION.md
quotes them).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch


def _value(raw: str):
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw, raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("artifacts"), help="a `narvl run` artifact root")
    ap.add_argument("--tasks", default="vqa", help="comma-separated: one model learns them all")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="model config override")
    ap.add_argument("--freeze-backbone", action="store_true")
    ap.add_argument("--no-pretrain", action="store_true", help="start the backbone from scratch")
    ap.add_argument("--decoder-prompt", action="store_true")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from narvl_model.config import ModelConfig
    from narvl_model.losses import ar_ce_loss
    from narvl_model.model import ARModel
    from narvl_model.search import greedy_search
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader
    from stages.data.tasks import sample_texts
    from stages.evaluate import blind_baseline, postprocess, score
    from stages.prepare_data import iter_split_samples
    from stages.pretrain import WEIGHTS
    from stages.train import _lr_lambda

    tasks = args.tasks.split(",")
    data: dict[str, Path] = {}
    for t in tasks:
        found = sorted((args.root / t).glob("prepare_data-*/manifest.json"))
        if not found:
            raise SystemExit(f"{args.root / t}: no finished prepare_data folder; run `narvl run --root {args.root}`")
        data[t] = found[-1].parent
    tok = Tokenizer.load(data[tasks[0]] / "tokenizer") if len(tasks) == 1 else Tokenizer.train(
        (x for t in tasks for s in iter_split_samples(data[t] / "train", t) for x in sample_texts(s, 64)),
        vocab_size=1000, num_bins=Tokenizer.load(data[tasks[0]] / "tokenizer").num_bins)
    overrides = {k: _value(v) for k, v in (a.split("=", 1) for a in args.set)}
    cfg = ModelConfig.from_name(args.preset, **overrides, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                                bos_id=tok.bos_id, eos_id=tok.eos_id, blank_id=tok.blank_id)
    torch.manual_seed(args.seed)
    model = ARModel(cfg)
    if not args.no_pretrain:
        weights = sorted(args.root.glob(f"shared/pretrain-*/{WEIGHTS}"), key=lambda p: p.stat().st_mtime)
        if not weights:
            raise SystemExit(f"{args.root}/shared: no pretrain output; run the pipeline or pass --no-pretrain")
        model.encoder.backbone.load_state_dict(load_file(str(weights[-1])))
        print(f"backbone from {weights[-1]}", flush=True)
    if args.freeze_backbone:
        for p in model.encoder.backbone.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(args.steps, 0.06))

    def loader(task: str, split: str, train: bool, epoch: int = 0):
        return make_loader(data[task] / split, tok, task, args.batch_size, train=train, seed=args.seed, epoch=epoch,
                           image_size=cfg.image_size, rank=0, world_size=1, max_source_len=cfg.max_source_positions)

    def forever(task: str):
        for epoch in itertools.count():
            yield from loader(task, "train", True, epoch)

    def prompt_ids(batch, i: int) -> list[int]:
        return [x for x in batch.src_tokens[i].tolist() if x not in (tok.pad_id, tok.bos_id, tok.eos_id)]

    def loss_of(batch) -> torch.Tensor:
        if not args.decoder_prompt:
            logits = model(batch.image, batch.src_tokens, batch.prev_output_tokens)
            return ar_ce_loss(logits, batch.target, pad_id=tok.pad_id, label_smoothing=0.1, weights=batch.weights)
        prev, target = [], []
        for i in range(len(batch)):
            p, t = prompt_ids(batch, i), batch.target[i, : int(batch.target_lengths[i])].tolist()
            prev.append([tok.bos_id, *p, *t[:-1]])
            target.append([tok.pad_id] * len(p) + t)  # the prompt part is not scored
        width = max(map(len, prev))
        prev_t = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in prev])
        target_t = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in target])
        return ar_ce_loss(model(batch.image, batch.src_tokens, prev_t), target_t, pad_id=tok.pad_id,
                          label_smoothing=0.1, weights=batch.weights)

    @torch.no_grad()
    def decode(batch, max_len: int) -> list[list[int]]:
        if not args.decoder_prompt:
            return greedy_search(model, batch.image, batch.src_tokens, max_len)
        out = []
        for i in range(len(batch)):
            seq, gen = [tok.bos_id, *prompt_ids(batch, i)], []
            for _ in range(max_len):
                nxt = int(model(batch.image[i: i + 1], batch.src_tokens[i: i + 1], torch.tensor([seq]))[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                gen.append(nxt)
                seq.append(nxt)
            out.append(gen)
        return out

    def validate() -> dict[str, str]:
        model.eval()
        out = {}
        for t in tasks:
            ok = n = 0
            samples = {}
            for b in loader(t, "val", False):
                for ids, s in zip(decode(b, int(b.target.shape[1]) + 2), b.samples, strict=True):
                    if t == "grounding":
                        ok += score(t, {"x": postprocess(t, ids, s, tok)}, {"x": s})[0]["acc@0.5"]
                    else:
                        ok += tok.decode(ids).strip() == tok.decode(tok.encode(_canonical(t, s))).strip()
                    n += 1
                    samples[s["id"]] = s
            text = f"{ok / n:.3f}"
            blind = blind_baseline(t, data[t] / "train", samples)
            if blind is not None:
                text += f" (text only {sum(blind[k] == _canonical(t, s) for k, s in samples.items()) / n:.3f})"
            out[t] = text
        model.train()
        return out

    its = {t: forever(t) for t in tasks}
    model.train()
    t0, window = time.perf_counter(), []
    print(f"{args.tasks}: {sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps", flush=True)
    for step in range(1, args.steps + 1):
        batch = next(its[tasks[step % len(tasks)]])
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: train loss {sum(window) / len(window):.3f}, validation exact {validate()}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            window = []


def _canonical(task: str, sample: dict) -> str:
    """The answer a text-only or model prediction is compared with (exact match)."""
    from stages.data.tasks import majority_answer

    return majority_answer(sample["answers"]) if task == "vqa" else sample.get("label", "")


if __name__ == "__main__":
    main()
