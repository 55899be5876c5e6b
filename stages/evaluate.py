"""evaluate: decode the eval split with a trained model (AR beam search or NARVL one-pass CTC) and score it.

Writes `predictions.parquet` (id, prediction, references json, score) and `metrics.json`
`{"metric": <main metric>, "value": <paper scale>, "metrics": {...}}` (CIDEr x100, accuracies in %).
NARVL runs also get diagnostics: the share of eval targets its queries cannot emit under CTC, the mean collapsed
output length against the reference length, and how often outputs repeat tokens. VQA and entailment runs also get
the score of a text-only ("blind") baseline on the same samples (`blind_accuracy`): what can be answered from the
question or hypothesis alone, so that the part of a model's score that needs the image is visible.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from stages.common import StageLog, write_json_atomic
from stages.config import EvaluateStage

VERSION = 3  # 2: text-only baseline (blind_accuracy); 3: the NARVL decoding from the model's config
OUTPUTS = ("predictions.parquet", "metrics.json")


@dataclass(frozen=True)
class Inputs:
    data: Path  # prepare_data
    model: Path  # train_teacher or train_nar (checkpoint/)


MAIN_METRIC = {"caption": "CIDEr", "vqa": "accuracy", "grounding": "acc@0.5", "entailment": "accuracy"}


# ---- decoding (shared with distill and benchmark) --------------------------------------------------------------
@torch.no_grad()
def decode_batch(model, image: torch.Tensor, src_tokens: torch.Tensor, task: str, *, kind: Literal["ar", "narvl"],
                 beam_size: int = 5, max_len: int = 24, no_repeat_ngram: int = 0, greedy: bool = False,
                 nar_decode: str = "greedy", nar_beam_size: int = 5) -> list[list[int]]:
    """Token ids (no bos/eos/blank) per sample.

    AR: beam search (greedy with greedy=True); no_repeat_ngram applies to captions only.
    NARVL: one forward pass, then greedy CTC (or CTC prefix beam search); a CE-trained model (its config's
    `nar_loss`) is read position-wise.
    """
    from narvl_model.decoding import ctc_greedy, ctc_prefix_beam_search, nar_ce_greedy, strip_special
    from narvl_model.search import beam_search, greedy_search

    cfg = model.cfg
    if kind == "ar":
        if greedy:
            return greedy_search(model, image, src_tokens, max_len)
        return beam_search(model, image, src_tokens, beam_size, max_len,
                           no_repeat_ngram=no_repeat_ngram if task == "caption" else 0)
    logits = model(image, src_tokens).float()  # (B, N, V)
    if cfg.nar_loss == "ce":
        return nar_ce_greedy(logits, cfg.eos_id, cfg.blank_id, cfg.pad_id, cfg.bos_id)
    if nar_decode == "beam":
        lp = logits.log_softmax(-1)
        return [strip_special(ctc_prefix_beam_search(row, cfg.blank_id, nar_beam_size), cfg.eos_id,
                              (cfg.pad_id, cfg.bos_id, cfg.blank_id)) for row in lp]
    return ctc_greedy(logits, cfg.blank_id, cfg.eos_id, cfg.pad_id, cfg.bos_id)


def postprocess(task: str, ids: list[int], sample: dict, tokenizer) -> Any:
    """Decoded ids -> the task's answer: caption/VQA text, a pixel box (or None), the entailment word."""
    from narvl_model.decoding import bins_to_box

    if task == "grounding":
        w, h = sample["image_size"]
        box = bins_to_box(ids, tokenizer.first_bin_id, tokenizer.num_bins, w, h)
        return list(box) if box is not None else None
    text = tokenizer.decode(ids).strip()
    if task == "entailment":
        return text.split()[0] if text else ""
    return text


def pick_device(pref: str = "auto") -> torch.device:
    """cuda where available and allowed, else cpu."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda asked for, but torch sees no CUDA device")
    return torch.device("cuda" if pref != "cpu" and torch.cuda.is_available() else "cpu")


# ---- scoring ----------------------------------------------------------------------------------------------------
def score(task: str, preds: dict[str, Any], samples: dict[str, dict], log: StageLog | None = None
          ) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """(metrics, per-sample score, references) of the predictions, with stages.metrics."""
    from stages import metrics as M

    if task == "caption":
        refs = {k: s["references"] for k, s in samples.items()}
        ev = M.caption_evaluation(preds, refs, meteor=True, spice=False, log=log)
        out = dict(ev.metrics)
        per = {k: ev.per_sample[k]["CIDEr"] for k in preds}
        objects = {k: {tuple(o[:3]) for o in s["meta"]["objects"]} for k, s in samples.items()
                   if isinstance(s.get("meta"), dict) and "objects" in s["meta"]}
        if len(objects) == len(samples):
            from stages.data.shapes import parse_caption

            sem = M.caption_semantics(preds, objects, parse_caption)
            out.update({f"semantic_{k}": v for k, v in sem.items() if k != "n"})
        return out, per, refs
    if task == "vqa":
        refs = {k: s["answers"] for k, s in samples.items()}
        types = {k: s["meta"]["question_type"] for k, s in samples.items()
                 if isinstance(s.get("meta"), dict) and "question_type" in s["meta"]}
        res = M.vqa_accuracy(preds, refs, types if len(types) == len(samples) else None)
        out = {"accuracy": res["accuracy"], "n": res["n"]}
        out.update({f"accuracy_{t}": v for t, v in res.get("per_type", {}).items()})
        return out, dict(res["per_question"]), refs
    if task == "grounding":
        refs = {k: s["box"] for k, s in samples.items()}
        out = M.grounding_metrics(preds, refs)
        per = {k: (M.box_iou(preds[k], refs[k]) if preds.get(k) is not None else 0.0) for k in preds}
        return out, per, refs
    refs = {k: s["label"] for k, s in samples.items()}
    out = M.entailment_metrics(preds, refs)
    per = {k: float(str(preds[k]).strip().lower() == M.snli_ve_label(refs[k])) for k in preds}
    return out, per, refs


def narvl_diagnostics(task: str, outputs: dict[str, list[int]], samples: dict[str, dict], tokenizer,
                      num_queries: int) -> dict[str, float]:
    """Infeasible eval targets, collapsed output length vs reference length, repeated tokens in outputs."""
    from narvl_model.losses import is_ctc_feasible
    from stages.data.tasks import all_targets, eval_target

    n = len(outputs)
    infeasible_eval = infeasible_any = 0
    ref_len = out_len = repeat = dup = 0.0
    for k, ids in outputs.items():
        s = samples[k]
        ref = tokenizer.encode(eval_target(s, tokenizer.num_bins))
        infeasible_eval += not is_ctc_feasible(ref + [tokenizer.eos_id], num_queries)
        infeasible_any += any(not is_ctc_feasible(tokenizer.encode(t) + [tokenizer.eos_id], num_queries)
                              for t in all_targets(s, tokenizer.num_bins))
        ref_len += len(ref)
        out_len += len(ids)
        repeat += any(a == b for a, b in zip(ids, ids[1:], strict=False))
        dup += 1 - len(set(ids)) / len(ids) if ids else 0.0
    return {"infeasible_eval_target_rate": infeasible_eval / n, "infeasible_any_target_rate": infeasible_any / n,
            "mean_output_len": out_len / n, "mean_reference_len": ref_len / n, "adjacent_repeat_rate": repeat / n,
            "duplicate_token_share": dup / n, "num_queries": num_queries}


def blind_baseline(task: str, train_dir: Path, samples: dict[str, dict]) -> dict[str, Any] | None:
    """Text-only predictions for the eval samples (VQA and entailment; None for other tasks).

    VQA: the answer most often right for the same question in the training split (the majority of its ten
    answers); entailment: the label most often given to the same hypothesis, the premise caption left out. A text
    the training split never had gets the split's most frequent answer. The question-only prior of the VQA
    literature; on the built-in benchmark it tells what a model reads from the image (see docs/REPRODUCTION.md).
    """
    from collections import Counter, defaultdict

    from stages.data.shards import iter_split_json
    from stages.data.tasks import majority_answer

    if task == "vqa":
        key, answer = (lambda s: s["question"]), (lambda s: majority_answer(s["answers"]))
    elif task == "entailment":
        key, answer = (lambda s: s["hypothesis"]), (lambda s: s["label"])
    else:
        return None
    by_text: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for s in iter_split_json(train_dir, task):
        a = answer(s)
        by_text[key(s)][a] += 1
        overall[a] += 1
    if not overall:
        raise ValueError(f"evaluate: no training samples in {train_dir} for the text-only baseline")
    fallback = overall.most_common(1)[0][0]
    return {k: (by_text[key(s)].most_common(1)[0][0] if key(s) in by_text else fallback)
            for k, s in samples.items()}


# ---- the stage ------------------------------------------------------------------------------------------------
def run(cfg: EvaluateStage, inputs: Inputs, out_dir: Path, log: StageLog) -> dict:
    """Decode the eval split with the model and score it.

    Args:
        cfg: task, model kind ("ar" | "narvl") and decoding settings.
        inputs: the data and a train_teacher or train_nar output (checkpoint/ inside).
        out_dir: where predictions.parquet and metrics.json go.
        log: the stage log.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from narvl_model.checkpoint import load_model
    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ec = cfg.eval
    data_dir, model_dir = Path(inputs.data), Path(inputs.model)
    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    device = pick_device()
    model = load_model(model_dir / "checkpoint").to(device).eval()
    loader = make_loader(data_dir / ec.split, tokenizer, cfg.task, ec.batch_size, train=False, num_workers=0,
                         rank=0, world_size=1, image_size=model.cfg.image_size,
                         max_source_len=model.cfg.max_source_positions)
    outputs: dict[str, list[int]] = {}
    preds: dict[str, Any] = {}
    samples: dict[str, dict] = {}
    t_dec = time.perf_counter()
    for batch in loader:
        ids = decode_batch(model, batch.image.to(device), batch.src_tokens.to(device), cfg.task, kind=cfg.kind,
                           beam_size=ec.ar_beam_size, max_len=ec.ar_max_len, no_repeat_ngram=ec.no_repeat_ngram,
                           nar_decode=ec.nar_decode, nar_beam_size=ec.nar_beam_size)
        for key, sample, out in zip(batch.ids, batch.samples, ids, strict=True):
            outputs[key], samples[key] = out, sample
            preds[key] = postprocess(cfg.task, out, sample, tokenizer)
        if ec.max_samples and len(preds) >= ec.max_samples:
            break
    if ec.max_samples:
        keep = list(preds)[: ec.max_samples]
        preds, samples, outputs = ({k: d[k] for k in keep} for d in (preds, samples, outputs))
    decode_s = time.perf_counter() - t_dec
    if not preds:
        raise ValueError(f"evaluate: no samples in {data_dir / ec.split}")

    metrics, per, refs = score(cfg.task, preds, samples, log)
    blind = blind_baseline(cfg.task, data_dir / "train", samples) if ec.blind_baseline else None
    if blind is not None:
        metrics[f"blind_{MAIN_METRIC[cfg.task]}"] = score(cfg.task, blind, samples)[0][MAIN_METRIC[cfg.task]]
    if cfg.kind == "narvl":
        metrics.update(narvl_diagnostics(cfg.task, outputs, samples, tokenizer, model.cfg.num_queries))
    name = MAIN_METRIC[cfg.task]
    scale = 100.0  # CIDEr x100 as the paper reports it; accuracies in %
    value = float(metrics[name]) * scale
    pq.write_table(pa.Table.from_pylist([
        {"id": k, "prediction": json.dumps(preds[k]) if cfg.task == "grounding" else preds[k],
         "references": json.dumps(refs[k]), "score": float(per[k])} for k in preds]),
        out_dir / "predictions.parquet")
    result = {"metric": name, "value": value, "kind": cfg.kind, "task": cfg.task, "split": ec.split,
              "n": len(preds), "metrics": {k: float(v) for k, v in metrics.items()},
              "decode_s": decode_s, "wall_s": time.perf_counter() - t0, "device": str(device)}
    write_json_atomic(out_dir / "metrics.json", result)
    log.metrics({f"eval/{k}": float(v) for k, v in metrics.items()})
    log.info(f"evaluate {cfg.task} {cfg.kind}: {name} = {value:.2f} on {len(preds)} {ec.split} samples "
             f"({decode_s:.1f} s decoding)")
    return result
