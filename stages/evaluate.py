"""evaluate: decode the eval split with a trained model (AR beam search or NARVL one-pass CTC) and score it.

Writes `predictions.parquet` (id, prediction, references json, score) and `metrics.json`
`{"metric": <main metric>, "value": <paper scale>, "metrics": {...}, "gap": {...}}` (CIDEr x100, accuracies in %).
NARVL runs also get diagnostics: the share of eval targets its queries cannot emit under CTC, the mean collapsed
output length against the reference length, and how often outputs repeat tokens.

Every task also gets an image-blind baseline on the same samples (`blind_<metric>` for each metric; see
`blind_candidates`) and the share of the gap to a perfect score the model closes on the task's gap metric
(`GAP_METRIC`): `gap = {"metric", "score", "blind" (both in %), "gap_closed": (score - blind) / (100 - blind),
"blind_predictor"}`, also `metrics.gap_closed`. Captions of the built-in benchmark are scored on the objects they
name (`semantic_set_acc`, `semantic_object_f1`) beside CIDEr, with an oracle (`oracle_<metric>`: a reference
against the others). VQA accuracy is also given per official answer type (`accuracy_yes_no`, `accuracy_number`,
`accuracy_other`); entailment on the yes/no hypotheses (`accuracy_image_dependent`).
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

VERSION = 4  # 2: text-only baseline (blind_accuracy); 3: the NARVL decoding from the model's config;
# 4: blind baselines of every task, gap closed, caption oracle, VQA per answer type
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
def _meta(sample: dict, key: str) -> Any:
    meta = sample.get("meta")
    return meta.get(key) if isinstance(meta, dict) else None


def vqa_types(samples: dict[str, dict]) -> dict[str, str] | None:
    """The group of each VQA sample for per-type accuracy: the official `answer_type` (yes/no, number, other), as
    the VQA evaluator groups, when every sample carries one (converted VQA v2 and the built-in benchmark do); else
    the `question_type` when every sample carries that; else None (no per-type accuracy)."""
    for key in ("answer_type", "question_type"):
        types = {k: _meta(s, key) for k, s in samples.items()}
        if all(isinstance(t, str) and t for t in types.values()):
            return types
    return None


def type_key(name: str) -> str:
    """A metric-name-safe form of a type name ("yes/no" -> "yes_no", "what color is the" -> "what_color_is_the")."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def score(task: str, preds: dict[str, Any], samples: dict[str, dict], log: StageLog | None = None, *,
          meteor: bool = True) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """(metrics, per-sample score, references) of the predictions, with stages.metrics."""
    from stages import metrics as M

    if task == "caption":
        refs = {k: s["references"] for k, s in samples.items()}
        ev = M.caption_evaluation(preds, refs, meteor=meteor, spice=False, log=log)
        out = dict(ev.metrics)
        per = {k: ev.per_sample[k]["CIDEr"] for k in preds}
        objects = scene_objects(samples)
        if objects is not None:
            from stages.data.shapes import parse_caption

            sem = M.caption_semantics(preds, objects, parse_caption)
            out.update({f"semantic_{k}": v for k, v in sem.items() if k != "n"})
        return out, per, refs
    if task == "vqa":
        refs = {k: s["answers"] for k, s in samples.items()}
        res = M.vqa_accuracy(preds, refs, vqa_types(samples))
        out = {"accuracy": res["accuracy"], "n": res["n"]}
        out.update({f"accuracy_{type_key(t)}": v for t, v in res.get("per_type", {}).items()})
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


def scene_objects(samples: dict[str, dict]) -> dict[str, set[tuple]] | None:
    """The built-in benchmark's (size, colour, shape) objects of every sample; None when a sample lacks them."""
    objects = {k: _meta(s, "objects") for k, s in samples.items()}
    if not all(isinstance(o, list) for o in objects.values()):
        return None
    return {k: {tuple(o[:3]) for o in objs} for k, objs in objects.items()}


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


# ---- image-blind baselines ------------------------------------------------------------------------------------
# The metric each task's "gap closed" is measured on: (score - blind) / (1 - blind), 1 = perfect. Caption uses the
# object-set exact match of the parsed captions (the built-in benchmark only; real captions have no ceiling).
GAP_METRIC = {"caption": "semantic_set_acc", "vqa": "accuracy", "grounding": "acc@0.5",
              "entailment": "accuracy_image_dependent"}
BLIND_CONSTANTS = 3  # the most frequent training answers also tried as constant predictions


def _normalised(box: list[float], image_size: list[int]) -> list[float]:
    w, h = image_size
    return [box[0] / w, box[1] / h, box[2] / w, box[3] / h]


def best_fixed_box(boxes: list[list[float]], max_candidates: int = 256, max_targets: int = 4096) -> list[float]:
    """The box (one of `boxes`) that reaches IoU >= 0.5 with the most of them: the best fixed answer."""
    import numpy as np

    b = np.asarray(boxes[:max_targets], dtype=np.float64)  # (M, 4)
    c = b[:max_candidates]  # (C, 4)
    iw = np.clip(np.minimum(c[:, None, 2], b[None, :, 2]) - np.maximum(c[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(c[:, None, 3], b[None, :, 3]) - np.maximum(c[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih  # (C, M)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(c)[:, None] + area(b)[None, :] - inter
    hits = (inter >= 0.5 * np.where(union > 0, union, np.inf)).sum(1)
    return c[int(hits.argmax())].tolist()


def blind_candidates(task: str, train_dir: Path, samples: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Image-blind predictions for the eval samples, by predictor name; each reads the training split only.

    - caption: "fixed caption": one caption for every image: on the built-in benchmark a reference of the most
      frequent training object set, else the most frequent training reference.
    - vqa / entailment: "text prior": the answer most often right for the same question (the majority of its ten
      answers) / the label most often given to the same hypothesis (the premise left out), a text the split never
      had getting the split's most frequent answer; "prefix prior": the same by the first three words (the VQA
      question-type prior); "constant <answer>": one of the BLIND_CONSTANTS most frequent training answers.
    - grounding: "expression prior": the best fixed box (`best_fixed_box`, in image-relative coordinates) of the
      same expression in training, else "fixed box": the best fixed box of the whole split.
    """
    from collections import Counter, defaultdict

    from stages.data.shards import iter_split_json
    from stages.data.tasks import majority_answer

    train = iter_split_json(train_dir, task)  # streamed: a converted training split can be large
    empty = ValueError(f"evaluate: no training samples in {train_dir} for the blind baseline")
    if task == "caption":
        sets: Counter = Counter()
        first_caption: dict[frozenset, str] = {}
        texts: Counter = Counter()
        has_objects = True
        for s in train:
            texts.update(s["references"])
            objects = scene_objects({"s": s})
            has_objects = has_objects and objects is not None
            if has_objects:
                key = frozenset(objects["s"])
                sets[key] += 1
                first_caption.setdefault(key, s["references"][0])
        if not texts:
            raise empty
        caption = first_caption[sets.most_common(1)[0][0]] if has_objects else texts.most_common(1)[0][0]
        return {"fixed caption": dict.fromkeys(samples, caption)}
    if task == "grounding":
        by_text: dict[str, list] = defaultdict(list)
        for s in train:
            by_text[s["expression"]].append(_normalised(s["box"], s["image_size"]))
        if not by_text:
            raise empty
        fixed = best_fixed_box([b for boxes in by_text.values() for b in boxes])
        wanted = {s["expression"] for s in samples.values()} & set(by_text)
        per_text = {t: best_fixed_box(by_text[t]) for t in wanted}

        def scaled(box: list[float], s: dict) -> list[float]:
            w, h = s["image_size"]
            return [box[0] * w, box[1] * h, box[2] * w, box[3] * h]

        return {"expression prior": {k: scaled(per_text.get(s["expression"], fixed), s) for k, s in samples.items()},
                "fixed box": {k: scaled(fixed, s) for k, s in samples.items()}}
    if task == "vqa":
        text, answer = (lambda s: s["question"]), (lambda s: majority_answer(s["answers"]))
    else:
        text, answer = (lambda s: s["hypothesis"]), (lambda s: s["label"])
    keys = {"text prior": lambda t: t, "prefix prior": lambda t: " ".join(t.lower().split()[:3])}
    counts: dict[str, dict[str, Counter]] = {name: defaultdict(Counter) for name in keys}
    overall: Counter = Counter()
    for s in train:
        a = answer(s)
        overall[a] += 1
        for name, key in keys.items():
            counts[name][key(text(s))][a] += 1
    if not overall:
        raise empty
    fallback = overall.most_common(1)[0][0]
    out = {}
    for name, key in keys.items():
        by_key = counts[name]
        out[name] = {k: (by_key[key(text(s))].most_common(1)[0][0] if key(text(s)) in by_key else fallback)
                     for k, s in samples.items()}
    for a, _ in overall.most_common(BLIND_CONSTANTS):
        out[f"constant {a!r}"] = dict.fromkeys(samples, a)
    return out


def blind_baseline(task: str, train_dir: Path, samples: dict[str, dict]) -> tuple[str, dict[str, float]]:
    """The strongest image-blind predictor of `blind_candidates` on the task's gap metric (the main metric where
    the gap metric is not reported), chosen on the eval samples themselves so that the baseline errs high:
    (its name, its metrics without counts)."""
    best: tuple[str, dict[str, float]] | None = None
    for name, preds in blind_candidates(task, train_dir, samples).items():
        metrics = score(task, preds, samples, meteor=False)[0]
        metric = GAP_METRIC[task] if GAP_METRIC[task] in metrics else MAIN_METRIC[task]
        if best is None or metrics[metric] > best[1][metric]:
            best = (name, metrics)
    assert best is not None
    return best[0], {k: float(v) for k, v in best[1].items() if k not in ("n", "n_missing")}


def gap_closed(score_value: float, blind: float, ceiling: float = 1.0) -> float | None:
    """The share of the gap between the blind baseline and a perfect score that a model closes:
    (score - blind) / (ceiling - blind); None when the blind baseline is already perfect."""
    return (score_value - blind) / (ceiling - blind) if ceiling > blind else None


def caption_oracle(samples: dict[str, dict]) -> dict[str, float] | None:
    """A human-like caption scored like a model's: each image's first reference against the others (CIDEr etc.)
    and its parsed objects against the scene (object-set exact match 1.0 on the built-in benchmark); None when an
    image has a single reference."""
    if any(len(s["references"]) < 2 for s in samples.values()):
        return None
    preds = {k: s["references"][0] for k, s in samples.items()}
    rest = {k: {**s, "references": s["references"][1:]} for k, s in samples.items()}
    return {k: float(v) for k, v in score("caption", preds, rest, meteor=False)[0].items() if k != "n"}


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
    gap = None
    if cfg.task == "caption" and (oracle := caption_oracle(samples)) is not None:
        metrics.update({f"oracle_{k}": v for k, v in oracle.items()})
    if ec.blind_baseline:
        blind_name, blind = blind_baseline(cfg.task, data_dir / "train", samples)
        metrics.update({f"blind_{k}": v for k, v in blind.items()})
        gap_metric = GAP_METRIC[cfg.task]
        if gap_metric in metrics and gap_metric in blind:
            closed = gap_closed(float(metrics[gap_metric]), blind[gap_metric])
            gap = {"metric": gap_metric, "score": 100 * float(metrics[gap_metric]), "blind": 100 * blind[gap_metric],
                   "gap_closed": closed, "blind_predictor": blind_name}
            if closed is not None:
                metrics["gap_closed"] = closed
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
              "n": len(preds), "metrics": {k: float(v) for k, v in metrics.items()}, "gap": gap,
              "decode_s": decode_s, "wall_s": time.perf_counter() - t0, "device": str(device)}
    write_json_atomic(out_dir / "metrics.json", result)
    log.metrics({f"eval/{k}": float(v) for k, v in metrics.items()})
    closed = f"; {gap['metric']} {gap['score']:.2f} vs blind {gap['blind']:.2f} ({gap['blind_predictor']}), " \
        f"gap closed {gap['gap_closed']:.2f}" if gap and gap["gap_closed"] is not None else ""
    log.info(f"evaluate {cfg.task} {cfg.kind}: {name} = {value:.2f} on {len(preds)} {ec.split} samples "
             f"({decode_s:.1f} s decoding){closed}")
    return result
