"""pretrain: the image backbone learns the built-in benchmark's objects before the AR teacher starts.

The paper never trains from scratch: NARVL starts from OFA, whose ResNet starts from ImageNet weights and whose
whole model is pretrained on many vision-language tasks. The built-in benchmark has no such model to start from,
so this stage stands in for the ImageNet-initialised backbone: the teacher's backbone (same architecture, built
from the same model config) is trained on a dense object task, every cell of its output grid predicting the
shape, colour and size of the object whose centre falls in it, plus whether there is one. The AR teacher then
starts from these backbone weights (the transformer and the rest still start fresh).

Why it exists: trained end to end from scratch, the small CPU models learn colours within a few hundred steps
but not shapes, and every question and caption of the benchmark binds to shapes (measured, see issue notes:
after 1,000 teacher steps VQA stayed at the language prior, shape accuracy at chance). Trained densely, the same
backbone tells the six shapes apart at about 95% within 500 steps.

Only the built-in benchmark has the object annotations (sample meta "objects"); real data starts from OFA
weights instead (`narvl_model.ofa.init_model_from_ofa`), and the pipeline config rejects pretrain there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from stages.common import StageLog, write_json_atomic
from stages.config import PretrainStage

VERSION = 2  # 2: one pretraining for all tasks, on whichever task's shards it is given
WEIGHTS = "backbone.safetensors"


@dataclass(frozen=True)
class Inputs:
    data: Path  # a prepare_data output (any task: every task's shards hold the same images and objects)
_HEADS = ("shape", "colour", "size")


def _vocab() -> dict[str, tuple[str, ...]]:
    from stages.data.shapes import COLOURS, SHAPES, SIZES

    return {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


def dense_targets(samples: list[dict], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell labels of a batch: classes (B, 3, h, w) (shape, colour, size; -100 where no object centre) and
    objectness (B, h, w). Object boxes are in pixels of the sample's own image_size.

    Raises:
        ValueError: a sample without the benchmark's object annotations, naming it.
    """
    vocab = _vocab()
    h, w = grid
    classes = torch.full((len(samples), 3, h, w), -100, dtype=torch.long)
    objectness = torch.zeros(len(samples), h, w)
    for i, s in enumerate(samples):
        objects = (s.get("meta") or {}).get("objects")
        if not objects:
            raise ValueError(f"sample {s.get('id')!r} has no meta.objects: pretrain needs the built-in benchmark's "
                             "object annotations (data.source=shapes)")
        width, height = s["image_size"]
        for size, colour, shape, x0, y0, x1, y1 in objects:
            cx = min(w - 1, int((x0 + x1) / 2 / width * w))
            cy = min(h - 1, int((y0 + y1) / 2 / height * h))
            labels = (vocab["shape"].index(shape), vocab["colour"].index(colour), vocab["size"].index(size))
            classes[i, :, cy, cx] = torch.tensor(labels)
            objectness[i, cy, cx] = 1.0
    return classes, objectness


class DenseObjectHead(nn.Module):
    """1x1 conv from the backbone's channels to shape / colour / size logits and an objectness logit per cell."""

    def __init__(self, channels: int):
        super().__init__()
        self.sizes = [len(v) for v in _vocab().values()]
        self.proj = nn.Conv2d(channels, sum(self.sizes) + 1, 1)

    def forward(self, feats: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.proj(feats)  # (B, K, h, w)
        logits = list(out[:, :-1].split(self.sizes, dim=1))
        return logits, out[:, -1]


def dense_loss(logits: list[torch.Tensor], objectness: torch.Tensor, classes: torch.Tensor,
               target_obj: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(objectness, target_obj)
    for j, lg in enumerate(logits):
        loss = loss + F.cross_entropy(lg, classes[:, j], ignore_index=-100)
    return loss


def run(cfg: PretrainStage, inputs: Inputs, out_dir: Path, log: StageLog) -> dict:
    """Train the teacher's backbone on dense object labels; writes backbone.safetensors and metrics.json.

    Args:
        cfg: the model (its backbone is what is trained) and the pretraining recipe.
        inputs: {"prepare_data": folder with tokenizer/, train/ and val/ shards of the built-in benchmark, of any
            task: every task's shards hold the same images and objects for a data config}.
        out_dir: the stage's output folder.
        log: the stage log (loss curve, validation accuracies).
    """
    from safetensors.torch import save_file

    from narvl_model.model import build_backbone
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader, read_split_manifest
    from stages.train import _lr_lambda

    t0 = time.perf_counter()
    pc, data_dir, out_dir = cfg.pretrain, Path(inputs.data), Path(out_dir)
    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    task = read_split_manifest(data_dir / "train")["task"]  # any task's shards: only images and objects are read
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model
    backbone = build_backbone(model_cfg)  # the teacher's encoder builds the same module and loads these weights
    head = DenseObjectHead(backbone.out_channels)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=pc.lr, weight_decay=pc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(pc.steps, pc.warmup_ratio))  # the trainers' schedule

    def batches(split: str, train: bool, epoch: int = 0):
        return make_loader(data_dir / split, tokenizer, task, pc.batch_size, train=train, seed=cfg.seed,
                           epoch=epoch, shuffle_buffer=pc.shuffle_buffer, rank=0, world_size=1,
                           on_bad_sample=cfg.data.on_bad_sample, image_size=model_cfg.image_size)

    def step_on(batch) -> torch.Tensor:
        feats = backbone(batch.image)
        classes, target_obj = dense_targets(batch.samples, tuple(feats.shape[-2:]))
        logits, objectness = head(feats)
        return dense_loss(logits, objectness, classes, target_obj)

    step, epoch, window, t_window = 0, 0, [], time.perf_counter()
    backbone.train()
    while step < pc.steps:
        n_before = step
        for batch in batches("train", True, epoch):
            loss = step_on(batch)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"pretrain loss is {loss.item()} at step {step}; lower pretrain.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            window.append((loss.item(), len(batch)))
            if step % pc.log_every == 0 or step == pc.steps:
                dt = time.perf_counter() - t_window
                log.metrics({"loss": sum(v for v, _ in window) / len(window),
                             "samples_per_s": sum(n for _, n in window) / dt}, step=step)
                log.progress(step, pc.steps)
                window, t_window = [], time.perf_counter()
            if step >= pc.steps:
                break
        if step == n_before:
            raise RuntimeError(f"{data_dir / 'train'} yielded no batch; pretrain needs training samples")
        epoch += 1

    metrics = evaluate(backbone, head, batches("val", False))
    metrics.update(steps=step, epochs=epoch, wall_s=time.perf_counter() - t0,
                   n_params=sum(p.numel() for p in backbone.parameters()))
    log.metrics({k: v for k, v in metrics.items() if k.startswith("val_")}, step=step)
    log.info("pretrain: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("val_")))
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(out_dir / WEIGHTS))
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def evaluate(backbone: nn.Module, head: DenseObjectHead, loader) -> dict[str, float]:
    """Validation accuracy of each attribute at the cells holding an object centre, and objectness accuracy."""
    backbone.eval()
    correct = dict.fromkeys(_HEADS, 0)
    n_obj = n_cells = obj_correct = 0
    loss_sum, n = 0.0, 0
    for batch in loader:
        feats = backbone(batch.image)
        classes, target_obj = dense_targets(batch.samples, tuple(feats.shape[-2:]))
        logits, objectness = head(feats)
        loss_sum += float(dense_loss(logits, objectness, classes, target_obj)) * len(batch)
        n += len(batch)
        has = classes[:, 0] >= 0
        n_obj += int(has.sum())
        for j, name in enumerate(_HEADS):
            correct[name] += int((logits[j].argmax(1) == classes[:, j])[has].sum())
        obj_correct += int(((objectness > 0) == (target_obj > 0.5)).sum())
        n_cells += target_obj.numel()
    backbone.train()
    if n == 0:
        raise RuntimeError("pretrain: the validation split yielded no batch")
    out = {f"val_{k}_acc": v / max(n_obj, 1) for k, v in correct.items()}
    out.update(val_objectness_acc=obj_correct / max(n_cells, 1), val_loss=loss_sum / n)
    return out
