"""The one training loop of the AR teacher and the NARVL student: Ray Train workers, each driving DeepSpeed.

The driver (`fit`) builds a `TorchTrainer` around `train_loop_per_worker`; every worker builds the tokenizer, the
model (NARVL: copied from the teacher), a torch AdamW with a linear warm-up/decay schedule, and a DeepSpeed engine
(ZeRO stage and precision from the config, gloo on CPU). It streams its own disjoint part of the shards, takes
`max_steps` optimizer steps, validates every `val_every` steps and checkpoints every `checkpoint_every` steps.

Checkpoints are DeepSpeed checkpoints reported through `ray.train.report`, plus `train_state.json` (step, epoch,
micro-batches consumed in the epoch, best validation loss) and each rank's RNG state. A restarted run (Ray's
`FailureConfig`, or a new `fit` on the same `out_dir`) loads the newest one and skips the loader to the same
position, so it ends where an uninterrupted run ends, on the same data order.

Curves: rank 0 appends one JSON line per log step to `out_dir/curves.jsonl` (Ray's `Result.metrics` only keeps
reports that carry a checkpoint); the driver forwards them to the StageLog and writes `curves.parquet`.
The best model (lowest validation loss) is written with `narvl_model.checkpoint.save_model` to
`out_dir/checkpoint`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch

from stages.common import StageLog, write_json_atomic

Kind = Literal["ar", "nar"]
CURVES = "curves.jsonl"
RAY_DIR = "ray_train"
STATE_FILE = "train_state.json"


# ---- pieces shared with other stages --------------------------------------------------------------------------
def load_target_override(path: Path | None) -> dict[str, str] | None:
    """`distilled.parquet` (id, target, ...) -> {id: target}, or None without a path."""
    if path is None:
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "target"]).to_pydict()
    return dict(zip(table["id"], table["target"], strict=True))


def qctc_extra_slots(tokens: list[int]) -> int:
    """Number of equal adjacent tokens: CTC needs a blank between each such pair."""
    return sum(1 for a, b in zip(tokens, tokens[1:], strict=False) if a == b)


def is_ctc_infeasible(tokens: list[int], num_queries: int) -> bool:
    """True when `num_queries` outputs cannot emit `tokens` under CTC (N < length + repeats)."""
    return num_queries < len(tokens) + qctc_extra_slots(tokens)


def build_model_config(kind: Kind, stage_cfg, tokenizer):
    """The stage's ModelConfig with the tokenizer's ids (and, for NARVL, the task's query count)."""
    from narvl_model.config import ModelConfig

    update: dict[str, Any] = dict(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, blank_id=tokenizer.blank_id)
    if kind == "nar":
        update.update(num_queries=stage_cfg.train.num_queries[stage_cfg.task],
                      decoder_input=stage_cfg.train.decoder_input)
    return ModelConfig(**{**stage_cfg.model.model_dump(), **update})


def label_smoothing_for(kind: Kind, stage_cfg) -> float:
    """The task's label smoothing (NARVL: per-task override, e.g. 0 for entailment)."""
    if kind == "nar":
        return stage_cfg.train.label_smoothing_by_task.get(stage_cfg.task, stage_cfg.train.label_smoothing)
    return stage_cfg.train.label_smoothing


def compute_loss(kind: Kind, model, batch, *, blank_id: int, pad_id: int, label_smoothing: float,
                 loss_name: str = "ce", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Forward + loss for one batch. Returns (loss, number of Q-CTC-infeasible targets)."""
    from narvl_model import losses

    image = batch.image.to(dtype)
    if kind == "ar":
        logits = model(image, batch.src_tokens, batch.prev_output_tokens)  # (B, T, V)
        loss = losses.ar_ce_loss(logits.float(), batch.target, pad_id=pad_id, label_smoothing=label_smoothing,
                                 weights=batch.weights)
        return loss, 0
    logits = model(image, batch.src_tokens)  # (B, N, V)
    if loss_name == "qctc":
        res = losses.qctc_loss(logits.float(), batch.target, batch.target_lengths, blank_id,
                               label_smoothing=label_smoothing, weights=batch.weights)
        return res.loss, int(res.n_infeasible)
    loss = losses.nar_ce_loss(logits.float(), batch.target, batch.target_lengths, pad_id=pad_id,
                              label_smoothing=label_smoothing)
    return loss, 0


def _move(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    for name in ("image", "src_tokens", "target", "target_lengths", "prev_output_tokens", "weights"):
        setattr(batch, name, getattr(batch, name).to(device, non_blocking=True))
    return batch


# ---- the per-worker loop (runs inside Ray Train workers; must live in the installed package) ------------------
def _lr_lambda(max_steps: int, warmup_ratio: float):
    warmup = int(round(warmup_ratio * max_steps))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return f


def _deepspeed_config(tc) -> dict:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.clip_grad,
        "zero_optimization": {"stage": tc.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tc.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg


def _allreduce(values: list[float], device: torch.device, world_size: int) -> list[float]:
    if world_size == 1:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _state_dict_full(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The full fp32 model state on every rank (ZeRO-3 gathers the partitions)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def _save_best(engine, model_cfg, kind: Kind, out: Path, zero_stage: int, rank: int) -> None:
    """Write the current weights as the best model (rank 0), through a temporary folder and a rename."""
    from narvl_model.checkpoint import save_model
    from narvl_model.model import ARModel, NARVLModel

    state = _state_dict_full(engine, zero_stage)
    if rank != 0:
        return
    model = (ARModel if kind == "ar" else NARVLModel)(model_cfg)
    model.load_state_dict(state)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:6]}")
    save_model(model, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _latest_checkpoint_dir(storage: Path) -> Path | None:
    """The checkpoint with the highest step among all runs stored under `storage`."""
    best: tuple[int, float, Path] | None = None
    for state in storage.glob(f"*/checkpoint_*/{STATE_FILE}"):
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue  # a partial upload: ignore it
        key = (step, state.stat().st_mtime, state.parent)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: tokenizer, model, DeepSpeed engine, the loader's share of the shards, the loop."""
    t_entry, group_start_s = time.perf_counter(), time.time() - config["t_driver"]
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from narvl_model.checkpoint import load_model
    from narvl_model.model import ARModel, NARVLModel
    from narvl_model.tokenizer import Tokenizer
    from stages.config import TrainNARStage, TrainStage
    from stages.data.shards import make_loader

    kind: Kind = config["kind"]
    stage_cfg = (TrainStage if kind == "ar" else TrainNARStage).model_validate(config["stage_cfg"])
    tc = stage_cfg.train
    data_dir, out_dir = Path(config["data_dir"]), Path(config["out_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    model_cfg = build_model_config(kind, stage_cfg, tokenizer)
    torch.manual_seed(stage_cfg.seed)
    if kind == "ar":
        model = ARModel(model_cfg)
        if config.get("backbone_init"):
            from safetensors.torch import load_file

            model.encoder.backbone.load_state_dict(load_file(config["backbone_init"]))  # strict: same architecture
    elif tc.init_from_teacher:
        teacher = load_model(Path(config["teacher_dir"]) / "checkpoint")
        model = NARVLModel.from_ar(teacher, num_queries=model_cfg.num_queries,
                                   decoder_input=model_cfg.decoder_input)
        model_cfg = model.cfg
    else:
        model = NARVLModel(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tuple(tc.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.max_steps, tc.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=_deepspeed_config(tc))
    device = engine.device
    setup_s = time.perf_counter() - t_entry  # imports, model, DeepSpeed engine (and the gloo group it joins)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]

    # ---- resume -------------------------------------------------------------------------------------------
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_val_loss": None, "samples": 0,
             "n_infeasible": 0, "elapsed_s": 0.0}
    ckpt = ray.train.get_checkpoint()
    resume_dir = config.get("resume_from")
    if ckpt is not None or resume_dir:
        with (ckpt.as_directory() if ckpt is not None else _nullpath(resume_dir)) as d:
            engine.load_checkpoint(d, tag="ds")
            state.update(json.loads((Path(d) / STATE_FILE).read_text()))
            rng = Path(d) / f"rng_rank{rank}.pt"
            if rng.exists():
                torch.set_rng_state(torch.load(rng, weights_only=True))
    start_step = state["step"]

    override = load_target_override(Path(config["target_override"])) if config.get("target_override") else None
    smoothing = label_smoothing_for(kind, stage_cfg)
    loss_name = tc.loss if kind == "nar" else "ce"
    max_tgt = model_cfg.max_target_positions if kind == "ar" else None
    common = dict(shuffle_buffer=tc.shuffle_buffer, num_workers=tc.loader_workers, rank=rank, world_size=world,
                  on_bad_sample=stage_cfg.on_bad_sample, image_size=model_cfg.image_size,
                  max_source_len=model_cfg.max_source_positions)

    def batches(epoch: int, skip: int):
        loader = make_loader(data_dir / "train", tokenizer, stage_cfg.task, tc.batch_size, train=True,
                             seed=stage_cfg.seed, epoch=epoch, target_override=override, max_target_len=max_tgt,
                             **common)
        for i, b in enumerate(loader):
            if i >= skip:
                yield b

    def validate() -> dict[str, float]:
        engine.eval()
        loss_sum = n = exact = n_exact = 0.0
        loader = make_loader(data_dir / "val", tokenizer, stage_cfg.task, tc.batch_size, train=False,
                             seed=stage_cfg.seed, epoch=0, target_override=None, max_target_len=max_tgt, **common)
        with torch.no_grad():
            for i, b in enumerate(loader):
                b = _move(b, device)
                loss, _ = compute_loss(kind, engine, b, blank_id=tokenizer.blank_id, pad_id=tokenizer.pad_id,
                                       label_smoothing=0.0, loss_name=loss_name, dtype=dtype)
                loss_sum += float(loss) * len(b.ids)
                n += len(b.ids)
                if i < config.get("val_exact_batches", 2):
                    hyp = _decode_quick(kind, engine.module, b, tokenizer, tc.zero_stage, dtype, loss_name)
                    if hyp is not None:
                        for h, t, tl in zip(hyp, b.target.tolist(), b.target_lengths.tolist(), strict=True):
                            exact += float(h == t[: tl - 1])
                            n_exact += 1
        loss_sum, n, exact, n_exact = _allreduce([loss_sum, n, exact, n_exact], device, world)
        engine.train()
        out = {"val_loss": loss_sum / max(n, 1)}
        if n_exact:
            out["val_exact"] = exact / n_exact
        return out

    def checkpoint(metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="narvl-ckpt-") as d:
            engine.save_checkpoint(d, tag="ds")
            torch.save(torch.get_rng_state(), Path(d) / f"rng_rank{rank}.pt")
            if rank == 0:
                write_json_atomic(Path(d) / STATE_FILE, state)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    # ---- the loop -----------------------------------------------------------------------------------------
    curves = out_dir / CURVES
    stop_after = config.get("stop_after_steps")
    window = {"loss": 0.0, "micro": 0, "samples": 0, "tokens": 0, "infeasible": 0}
    t_window = time.perf_counter()
    t_start = time.perf_counter() - state["elapsed_s"]
    engine.train()
    step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
    last_metrics: dict[str, float] = {}
    while step < tc.max_steps:
        it = batches(epoch, skip)
        consumed = skip
        while step < tc.max_steps:
            b = next(it, None)
            # every rank must take the same number of steps: stop the epoch when any rank runs dry
            if _allreduce([0.0 if b is None else 1.0], device, world)[0] < world:
                break
            b = _move(b, device)
            loss, n_inf = compute_loss(kind, engine, b, blank_id=tokenizer.blank_id, pad_id=tokenizer.pad_id,
                                       label_smoothing=smoothing, loss_name=loss_name, dtype=dtype)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            consumed += 1
            window["loss"] += float(loss)
            window["micro"] += 1
            window["samples"] += len(b.ids)
            window["tokens"] += int(b.target_lengths.sum())
            window["infeasible"] += n_inf
            if not boundary:
                continue
            step += 1
            state.update(step=step, epoch=epoch, batches_in_epoch=consumed)
            log_now = step % tc.log_every == 0 or step == tc.max_steps
            val_now = step % tc.val_every == 0 or step == tc.max_steps
            ckpt_now = step % tc.checkpoint_every == 0 or step == tc.max_steps or step == stop_after
            metrics: dict[str, float] = {"step": step, "epoch": epoch}
            if log_now:
                loss_sum, micro, samples, tokens, infeasible = _allreduce(
                    [window["loss"], window["micro"], window["samples"], window["tokens"], window["infeasible"]],
                    device, world)
                dt = time.perf_counter() - t_window
                state["samples"] += int(samples)
                state["n_infeasible"] += int(infeasible)
                metrics.update(loss=loss_sum / max(micro, 1), lr=scheduler.get_last_lr()[0],
                               samples_per_s=samples / dt, tokens_per_s=tokens / dt)
                if kind == "nar":
                    metrics["n_infeasible"] = infeasible
                window = dict.fromkeys(window, 0)
                t_window = time.perf_counter()
            if val_now:
                metrics.update(validate())
                if state["best_val_loss"] is None or metrics["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"] = metrics["val_loss"]
                    state["best_step"] = step
                    _save_best(engine, model_cfg, kind, out_dir / "checkpoint", tc.zero_stage, rank)
                t_window = time.perf_counter()  # validation time is not training throughput
            state["elapsed_s"] = time.perf_counter() - t_start
            if rank == 0 and (log_now or val_now):
                with curves.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if ckpt_now:
                checkpoint(metrics)
                t_window = time.perf_counter()  # nor is checkpointing
            elif log_now:
                ray.train.report(metrics)
            last_metrics = metrics
            if stop_after is not None and step >= stop_after:
                return  # testing hook: the run "dies" right after this checkpoint
        epoch, skip = epoch + 1, 0

    if rank == 0:
        write_json_atomic(out_dir / ".worker_summary.json", {
            **state, "start_step": start_step, "n_params": n_params, "world_size": world,
            "worker_group_start_s": group_start_s, "worker_setup_s": setup_s,
            "last": last_metrics, "model_config": model_cfg.model_dump()})


class _nullpath:
    """`with _nullpath(p) as d` -> p (mirrors Checkpoint.as_directory for a plain path)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        return None


def _decode_quick(kind: Kind, model, batch, tokenizer, zero_stage: int, dtype, loss_name: str):
    """Greedy decodes of one batch for a quick exact-match check (None where it cannot run in lockstep)."""
    from narvl_model.decoding import ctc_greedy, nar_ce_greedy
    from narvl_model.search import greedy_search

    if kind == "ar":
        if zero_stage == 3:  # ranks would run different numbers of forwards over partitioned weights
            return None
        max_len = int(batch.target.shape[1]) + 2
        return greedy_search(model, batch.image.to(dtype), batch.src_tokens, max_len)
    logits = model(batch.image.to(dtype), batch.src_tokens).float()
    if loss_name == "ce":
        return nar_ce_greedy(logits, tokenizer.eos_id, tokenizer.blank_id)
    return ctc_greedy(logits, tokenizer.blank_id, tokenizer.eos_id)


# ---- the driver ------------------------------------------------------------------------------------------------
def _ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024,
             runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"],
                                       "TOKENIZERS_PARALLELISM": "false"}})


def read_curves(path: Path) -> list[dict]:
    """The curve lines of `curves.jsonl`, one per step (a resumed run's rows replace the dead run's)."""
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def fit(kind: Kind, stage_cfg, data_dir: Path, out_dir: Path, log: StageLog, teacher_dir: Path | None = None,
        target_override_path: Path | None = None, *, backbone_init: Path | None = None,
        stop_after_steps: int | None = None, keep_checkpoints: bool = False) -> dict:
    """Train the AR teacher (`kind="ar"`) or the NARVL student (`kind="nar"`) with Ray Train + DeepSpeed.

    Args:
        kind: "ar" or "nar".
        stage_cfg: TrainStage or TrainNARStage.
        data_dir: a prepare_data output (tokenizer/, train/, val/).
        out_dir: where checkpoint/, curves.parquet, metrics.json go; also holds the Ray Train checkpoints
            (`ray_train/`) that a rerun on the same folder resumes from.
        log: the stage log (curves go through `log.metrics`).
        teacher_dir: train_teacher output (NARVL with init_from_teacher).
        target_override_path: distilled.parquet (id -> target) for knowledge distillation.
        backbone_init: AR only: image-backbone weights (stages/pretrain.py) the encoder starts from.
        stop_after_steps: testing hook: stop (as if killed) right after the checkpoint at this step.
        keep_checkpoints: keep `ray_train/` after a finished run (default: delete it, the best model stays).

    Returns:
        The summary also written to metrics.json (steps, losses, throughput, wall time, Ray overhead).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if kind == "nar" and stage_cfg.train.init_from_teacher and teacher_dir is None:
        raise ValueError("train_nar with init_from_teacher=true needs the teacher's folder (teacher_dir)")
    t0 = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = out_dir / RAY_DIR
    resume = _latest_checkpoint_dir(storage) if storage.exists() else None
    if resume is not None:
        log.info(f"resuming from {resume} (step {json.loads((resume / STATE_FILE).read_text())['step']})")
    (out_dir / ".worker_summary.json").unlink(missing_ok=True)
    tc = stage_cfg.train
    loop_config = {
        "kind": kind, "stage_cfg": stage_cfg.model_dump(mode="json"), "data_dir": str(Path(data_dir).resolve()),
        "out_dir": str(out_dir), "teacher_dir": str(Path(teacher_dir).resolve()) if teacher_dir else None,
        "target_override": str(Path(target_override_path).resolve()) if target_override_path else None,
        "resume_from": str(resume) if resume else None, "stop_after_steps": stop_after_steps,
        "backbone_init": str(Path(backbone_init).resolve()) if backbone_init else None,
        "t_driver": time.time(),
    }
    _ensure_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu),
        run_config=RunConfig(
            name=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    log.info(f"{kind} training: {tc.num_workers} worker(s), ZeRO-{tc.zero_stage}, {tc.precision}, "
             f"{tc.max_steps} steps of {tc.batch_size}x{tc.grad_accum} per worker")
    t_fit = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t_fit
    if result.error is not None:
        raise RuntimeError(f"{kind} training failed") from result.error

    rows = read_curves(out_dir / CURVES)
    for row in rows:
        log.metrics({k: float(v) for k, v in row.items() if k != "step"}, step=int(row["step"]))
    if rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out_dir / "curves.parquet")
    summary_path = out_dir / ".worker_summary.json"
    if not summary_path.exists():  # stopped by the testing hook (or a run that ended without finishing)
        last = read_curves(out_dir / CURVES)
        return {"stopped": True, "step": int(last[-1]["step"]) if last else 0}
    ws = json.loads(summary_path.read_text())
    summary_path.unlink()
    train_rows = [r for r in rows if "samples_per_s" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    # the first window of a fresh run carries warm-up (engine, loader start): report the median window
    sps = sorted(r["samples_per_s"] for r in train_rows)
    metrics = {
        "kind": kind,
        "steps": ws["step"],
        "resumed_from_step": ws["start_step"],
        "epochs": ws["epoch"] + 1,
        "samples_seen": ws["samples"],
        "final_loss": train_rows[-1]["loss"] if train_rows else None,
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
        "best_val_loss": ws["best_val_loss"],
        "best_step": ws.get("best_step"),
        "final_val_exact": val_rows[-1].get("val_exact") if val_rows else None,
        "samples_per_s": sps[len(sps) // 2] if sps else None,
        "tokens_per_s": sorted(r["tokens_per_s"] for r in train_rows)[len(sps) // 2] if sps else None,
        "n_infeasible_total": ws["n_infeasible"],
        "n_params": ws["n_params"],
        "world_size": ws["world_size"],
        "zero_stage": tc.zero_stage,
        "precision": tc.precision,
        "train_loop_s": ws["elapsed_s"],
        "fit_s": fit_s,
        "ray_overhead_s": max(0.0, fit_s - ws["elapsed_s"]) if not ws["start_step"] else None,
        "worker_group_start_s": ws["worker_group_start_s"],
        "worker_setup_s": ws["worker_setup_s"],
        "wall_s": time.perf_counter() - t0,
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    if not keep_checkpoints:
        shutil.rmtree(storage, ignore_errors=True)
    if not (out_dir / "checkpoint").exists():
        raise RuntimeError(f"training ended without a best model in {out_dir / 'checkpoint'}")
    log.info(f"{kind} training done: {metrics['steps']} steps, loss {metrics['first_loss']} -> "
             f"{metrics['final_loss']}, best val {metrics['best_val_loss']}, "
             f"{metrics['samples_per_s'] or math.nan:.1f} samples/s, Ray overhead {metrics['ray_overhead_s']}")
    return metrics
