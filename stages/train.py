"""The one training loop of the AR teacher and the NARVL student: each worker drives DeepSpeed.

`train_worker(job, ctx)` is the loop one worker runs: tokenizer, model (NARVL: copied from the teacher), a torch
AdamW with a linear warm-up/decay schedule, a DeepSpeed engine (ZeRO stage and precision from the config), its own
disjoint part of the shards, `max_steps` optimizer steps, validation every `val_every` steps and a checkpoint every
`checkpoint_every` steps. It knows nothing of Ray: the worker's rank and world size come in `ctx`, the process group
is already set up (by Ray Train, torchrun or `local_process_group`), and everything it keeps goes through
`ctx.store`, a `WorkStore` (a local folder here; the pipeline passes one on its artifact root, so a worker on any
node resumes from the same checkpoints). The pipeline runs it on one Ray task (one worker) or a Ray Train
`TorchTrainer` (several); `run_local` runs it in this process.

The work store holds:
    ckpt/step_<n>/        every rank's DeepSpeed files (model, its ZeRO partition of the optimizer, scheduler; as
                          safetensors through stages.ds_checkpoint: a resume never unpickles) and RNG state (tensors,
                          read with weights_only=True); `train_state.json` (step, epoch, micro-batches
                          consumed in the epoch, best validation loss, the curve so far) written last by rank 0,
                          so a checkpoint without it is incomplete and never resumed from
    checkpoint/           the best model so far (lowest validation loss), `narvl_model.checkpoint.save_model`
    summary.json          written by rank 0 when the loop finished: a work store without it did not finish

A restarted worker (Ray's retries, a new run on the same key) loads the newest complete checkpoint and skips the
loader to the same position, so it ends where an uninterrupted run ends, on the same data order. Curves reach
the stage log (`ctx.log.metrics`, live) and `train_state.json`, so a resumed run never repeats a point.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from stages.common import StageLog, write_json_atomic

Kind = Literal["ar", "narvl"]
STATE_FILE = "train_state.json"
SUMMARY_FILE = "summary.json"
BEST_DIR = "checkpoint"
CKPT_DIR = "ckpt"
KEEP_CHECKPOINTS = 2


class TrainingIncomplete(RuntimeError):
    """The loop ended without finishing (its work store has no summary): never published as a result."""


class CheckpointRefused(RuntimeError):
    """A checkpoint in the work store that is not a safe, readable checkpoint of this loop (never unpickled)."""


# ---- where a worker keeps what must survive it ---------------------------------------------------------------
class WorkStore(Protocol):
    """Checkpoints and results of one training stage, shared by all its workers (and their restarts)."""

    def latest_checkpoint(self, dest: Path) -> int | None:
        """Copy the newest complete checkpoint into `dest`; its step, or None when there is none."""
        ...

    def save_checkpoint(self, step: int, src: Path, *, final_part: bool) -> None:
        """Add this rank's checkpoint files (`src`) to step `step`; `final_part` (rank 0, after every rank's
        files are in) marks it complete by its train_state.json, then older checkpoints are dropped."""
        ...

    def put_dir(self, name: str, src: Path) -> None:
        """Replace the folder `name` (e.g. the best model) with the files of `src`."""
        ...

    def put_json(self, name: str, data: Any) -> None: ...

    def get_json(self, name: str) -> Any | None: ...


class LocalWorkStore:
    """A WorkStore in a local (or shared-filesystem) folder."""

    def __init__(self, folder: Path) -> None:
        self.dir = Path(folder)

    def _steps(self) -> list[int]:
        ck = self.dir / CKPT_DIR
        if not ck.is_dir():
            return []
        return sorted(int(p.name.split("_")[1]) for p in ck.glob("step_*") if (p / STATE_FILE).exists())

    def latest_checkpoint(self, dest: Path) -> int | None:
        steps = self._steps()
        if not steps:
            return None
        shutil.copytree(self.dir / CKPT_DIR / f"step_{steps[-1]:08d}", dest, dirs_exist_ok=True)
        return steps[-1]

    def save_checkpoint(self, step: int, src: Path, *, final_part: bool) -> None:
        dest = self.dir / CKPT_DIR / f"step_{step:08d}"
        state = Path(src) / STATE_FILE
        for p in sorted(Path(src).rglob("*")):
            if p.is_file() and p != state:
                (dest / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dest / p.relative_to(src))
        if final_part:
            shutil.copyfile(state, dest / f".{STATE_FILE}.tmp")
            os.replace(dest / f".{STATE_FILE}.tmp", dest / STATE_FILE)  # complete from here on
            for old in self._steps()[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(self.dir / CKPT_DIR / f"step_{old:08d}", ignore_errors=True)

    def put_dir(self, name: str, src: Path) -> None:
        dest = self.dir / name
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)

    def put_json(self, name: str, data: Any) -> None:
        write_json_atomic(self.dir / name, data)

    def get_json(self, name: str) -> Any | None:
        try:
            return json.loads((self.dir / name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None


# ---- what a worker receives -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainInputs:
    """The folders a training stage reads (local on the worker's node)."""

    data: Path  # prepare_data: tokenizer/ and the split shards
    pretrain: Path | None = None  # AR: the shared pretrain (backbone.safetensors)
    teacher: Path | None = None  # NARVL: the teacher (checkpoint/) it starts from
    distill: Path | None = None  # NARVL with KD: distilled.parquet


@dataclass
class WorkerContext:
    """Who this worker is and where it reports; built by whoever launches the workers."""

    rank: int
    world_size: int
    store: WorkStore
    log: StageLog  # curves go through log.metrics on rank 0
    device: str = "cpu"


@dataclass(frozen=True)
class TrainJob:
    kind: Kind
    stage_cfg: dict  # TrainStage / TrainNARStage as JSON
    inputs: TrainInputs
    backbone_weights: str = "backbone.safetensors"


# ---- pieces shared with other stages --------------------------------------------------------------------------
def load_target_override(path: Path | None) -> dict[str, str] | None:
    """`distilled.parquet` (id, target, ...) -> {id: target}, or None without a path."""
    if path is None:
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "target"]).to_pydict()
    return dict(zip(table["id"], table["target"], strict=True))


def build_model_config(kind: Kind, stage_cfg, tokenizer):
    """The stage's ModelConfig with the tokenizer's ids (and, for NARVL, the task's query count)."""
    from narvl_model.config import ModelConfig

    update: dict[str, Any] = dict(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                  bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, blank_id=tokenizer.blank_id)
    if kind == "narvl":
        update.update(num_queries=stage_cfg.train.num_queries[stage_cfg.task],
                      decoder_input=stage_cfg.train.decoder_input, nar_loss=stage_cfg.train.loss)
    return ModelConfig(**{**stage_cfg.model.model_dump(), **update})


def label_smoothing_for(kind: Kind, stage_cfg) -> float:
    """The task's label smoothing (NARVL: per-task override, e.g. 0 for entailment)."""
    if kind == "narvl":
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


def _lr_lambda(max_steps: int, warmup_ratio: float):
    warmup = int(round(warmup_ratio * max_steps))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return f


def deepspeed_config(tc) -> dict:
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


def _save_best(engine, model_cfg, kind: Kind, store: WorkStore, zero_stage: int, rank: int) -> None:
    """Store the current weights as the best model (rank 0; every rank takes part in a ZeRO-3 gather)."""
    from narvl_model.checkpoint import save_model
    from narvl_model.model import ARModel, NARVLModel

    state = _state_dict_full(engine, zero_stage)
    if rank != 0:
        return
    model = (ARModel if kind == "ar" else NARVLModel)(model_cfg)
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory(prefix="narvl-best-") as d:
        save_model(model, Path(d))
        store.put_dir(BEST_DIR, Path(d))


# ---- the per-worker loop --------------------------------------------------------------------------------------
def stage_config(job: TrainJob):
    from stages.config import TrainNARStage, TrainStage

    return (TrainStage if job.kind == "ar" else TrainNARStage).model_validate(job.stage_cfg)


def build_model(job: TrainJob, stage_cfg, tokenizer):
    """The model a fresh run starts from: AR (backbone from the pretrain), NARVL (from the teacher)."""
    from narvl_model.checkpoint import load_model
    from narvl_model.model import ARModel, NARVLModel

    model_cfg = build_model_config(job.kind, stage_cfg, tokenizer)
    torch.manual_seed(stage_cfg.seed)
    if job.kind == "ar":
        if stage_cfg.init_from is not None:  # OFA's pretrained weights, as the paper fine-tunes from
            from narvl_model.ofa import init_model_from_ofa

            return init_model_from_ofa(model_cfg, stage_cfg.init_from.ofa)
        model = ARModel(model_cfg)
        if job.inputs.pretrain is not None:
            from safetensors.torch import load_file

            weights = load_file(str(Path(job.inputs.pretrain) / job.backbone_weights))
            model.encoder.backbone.load_state_dict(weights)  # strict: the same architecture
        return model
    if stage_cfg.train.init_from_teacher:
        if job.inputs.teacher is None:
            raise ValueError("train_nar with init_from_teacher=true needs the teacher (inputs.teacher)")
        teacher = load_model(Path(job.inputs.teacher) / BEST_DIR)
        model = NARVLModel.from_ar(teacher, num_queries=model_cfg.num_queries,
                                   decoder_input=model_cfg.decoder_input)
        model.cfg = model.cfg.model_copy(update={"nar_loss": model_cfg.nar_loss})
        return model
    return NARVLModel(model_cfg)


def use_ds_accelerator(device: str) -> None:
    """DeepSpeed's accelerator follows this worker's device, whatever the process inherited.

    A `DS_ACCELERATOR=cpu` left in the environment (a CPU test session, a shell) would otherwise put DeepSpeed on
    its CPU accelerator beside an NCCL process group, and its first broadcast fails.
    """
    want = "cuda" if device == "cuda" else "cpu"
    os.environ["DS_ACCELERATOR"] = want
    from deepspeed.accelerator import real_accelerator

    current = real_accelerator.ds_accelerator
    if current is not None and getattr(current, "_name", want) != want:  # resolved before, for the other device
        real_accelerator.ds_accelerator = None  # the next get_accelerator() reads DS_ACCELERATOR again


def train_worker(job: TrainJob, ctx: WorkerContext) -> dict | None:
    """One worker's loop; rank 0 returns (and stores as summary.json) the run's summary."""
    t_entry = time.perf_counter()
    use_ds_accelerator(ctx.device)
    import deepspeed

    from narvl_model.tokenizer import Tokenizer
    from stages.data.shards import make_loader
    from stages.ds_checkpoint import CheckpointError, use_safe_checkpoints

    kind = job.kind
    stage_cfg = stage_config(job)
    tc = stage_cfg.train
    data_dir = Path(job.inputs.data)
    rank, world = ctx.rank, ctx.world_size
    tokenizer = Tokenizer.load(data_dir / "tokenizer")
    model = build_model(job, stage_cfg, tokenizer)
    model_cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # OFA's image codes are frozen
    groups = []
    for in_backbone in (False, True):  # the (pretrained) backbone may learn at its own rate: train.backbone_lr_scale
        part = [(n, p) for n, p in trainable if n.startswith("encoder.backbone.") == in_backbone]
        lr = tc.lr * (tc.backbone_lr_scale if in_backbone else 1.0)
        groups += [{"params": [p for n, p in part if p.ndim >= 2 and "embed" not in n], "lr": lr,
                    "weight_decay": tc.weight_decay},
                   {"params": [p for n, p in part if not (p.ndim >= 2 and "embed" not in n)], "lr": lr,
                    "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=tuple(tc.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.max_steps, tc.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(tc))
    use_safe_checkpoints(engine)  # checkpoint files are safetensors + JSON: a resume never unpickles
    device = engine.device
    setup_s = time.perf_counter() - t_entry  # imports, model, DeepSpeed engine
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]

    # ---- resume -------------------------------------------------------------------------------------------
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_val_loss": None, "samples": 0,
                             "n_infeasible": 0, "elapsed_s": 0.0, "curves": []}
    with tempfile.TemporaryDirectory(prefix="narvl-resume-") as d:
        resumed = ctx.store.latest_checkpoint(Path(d))
        if resumed is not None:
            try:
                engine.load_checkpoint(d, tag="ds")
            except CheckpointError as e:
                raise _refused(e.path, e.reason, d, resumed) from None
            rng = Path(d) / f"rng_rank{rank}.pt"
            try:
                load_rng_state(rng)
            except pickle.UnpicklingError as e:  # weights_only=True refuses anything but tensors
                raise _refused(str(rng), f"not a file of tensors ({str(e).splitlines()[0]})", d, resumed) from None
            state.update(json.loads((Path(d) / STATE_FILE).read_text()))
            if rank == 0:
                ctx.log.info(f"resumed from the checkpoint at step {state['step']}")
    start_step = state["step"]

    override = load_target_override(Path(job.inputs.distill) / "distilled.parquet") if job.inputs.distill else None
    smoothing = label_smoothing_for(kind, stage_cfg)
    loss_name = model_cfg.nar_loss if kind == "narvl" else "ce"
    max_tgt = model_cfg.max_target_positions if kind == "ar" else None
    common = dict(shuffle_buffer=tc.shuffle_buffer, num_workers=tc.loader_workers, rank=rank, world_size=world,
                  on_bad_sample=stage_cfg.on_bad_sample, image_size=model_cfg.image_size,
                  max_source_len=model_cfg.max_source_positions)

    def batches(epoch: int, skip: int):
        loader = make_loader(data_dir / "train", tokenizer, stage_cfg.task, tc.batch_size, train=True,
                             seed=stage_cfg.seed, epoch=epoch, target_override=override, max_target_len=max_tgt,
                             aux_tasks=tc.aux_tasks if kind == "ar" else None, **common)
        for i, b in enumerate(loader):
            if i >= skip:
                yield b

    def validate() -> dict[str, float]:
        engine.eval()
        loss_sum = n = exact = n_exact = 0.0
        # a KD student is validated against the teacher's decodes of the validation split (distill writes them),
        # what it is trained to produce; the annotations' wording would pick an early checkpoint
        loader = make_loader(data_dir / "val", tokenizer, stage_cfg.task, tc.batch_size, train=False,
                             seed=stage_cfg.seed, epoch=0, target_override=override, max_target_len=max_tgt, **common)
        with torch.no_grad():
            for i, b in enumerate(loader):
                b = _move(b, device)
                loss, _ = compute_loss(kind, engine, b, blank_id=tokenizer.blank_id, pad_id=tokenizer.pad_id,
                                       label_smoothing=0.0, loss_name=loss_name, dtype=dtype)
                loss_sum += float(loss) * len(b.ids)
                n += len(b.ids)
                if i < tc.val_exact_batches:
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

    def checkpoint() -> None:
        with tempfile.TemporaryDirectory(prefix="narvl-ckpt-") as d:
            engine.save_checkpoint(d, tag="ds")  # every rank writes its own ZeRO partition
            save_rng_state(Path(d) / f"rng_rank{rank}.pt")
            if rank == 0:
                write_json_atomic(Path(d) / STATE_FILE, state)
            if rank != 0:
                ctx.store.save_checkpoint(state["step"], Path(d), final_part=False)
            _barrier(world)  # every rank's files are in before rank 0 marks the checkpoint complete
            if rank == 0:
                ctx.store.save_checkpoint(state["step"], Path(d), final_part=True)
            _barrier(world)

    # ---- the loop -----------------------------------------------------------------------------------------
    window = {"loss": 0.0, "micro": 0, "samples": 0, "tokens": 0, "infeasible": 0}
    t_window = time.perf_counter()
    t_start = time.perf_counter() - state["elapsed_s"]
    engine.train()
    step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
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
            window["loss"] += float(loss.detach())
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
            ckpt_now = step % tc.checkpoint_every == 0 or step == tc.max_steps
            metrics: dict[str, float] = {}
            if log_now:
                loss_sum, micro, samples, tokens, infeasible = _allreduce(
                    [window["loss"], window["micro"], window["samples"], window["tokens"], window["infeasible"]],
                    device, world)
                dt = time.perf_counter() - t_window
                state["samples"] += int(samples)
                state["n_infeasible"] += int(infeasible)
                metrics.update(loss=loss_sum / max(micro, 1), lr=scheduler.get_last_lr()[0],
                               samples_per_s=samples / dt, tokens_per_s=tokens / dt, epoch=epoch)
                if kind == "narvl":
                    metrics["n_infeasible"] = infeasible
                window = dict.fromkeys(window, 0)
                t_window = time.perf_counter()
            if val_now:
                metrics.update(validate())
                if state["best_val_loss"] is None or metrics["val_loss"] < state["best_val_loss"]:
                    state["best_val_loss"] = metrics["val_loss"]
                    state["best_step"] = step
                    _save_best(engine, model_cfg, kind, ctx.store, tc.zero_stage, rank)
                t_window = time.perf_counter()  # validation time is not training throughput
            state["elapsed_s"] = time.perf_counter() - t_start
            if metrics:
                state["curves"].append({"step": step, **metrics})
                if rank == 0:
                    ctx.log.metrics(metrics, step=step)
            if rank == 0:
                ctx.log.progress(step, tc.max_steps)
            if ckpt_now:
                checkpoint()
                t_window = time.perf_counter()  # nor is checkpointing
        epoch, skip = epoch + 1, 0

    if rank != 0:
        return None
    summary = {k: v for k, v in state.items() if k != "curves"}
    summary.update(start_step=start_step, n_params=n_params, world_size=world, worker_setup_s=setup_s,
                   model_config=model_cfg.model_dump(), curves=state["curves"])
    ctx.store.put_json(SUMMARY_FILE, summary)
    return summary


def _refused(path: str, reason: str, folder: str, step: int) -> CheckpointRefused:
    """The error of a checkpoint that could not be resumed from, naming its file in the work store."""
    where = f"{CKPT_DIR}/step_{step:08d}"
    if path.startswith(folder):
        where += path[len(folder):]
    return CheckpointRefused(f"resuming from {where} of the stage's work folder: {reason}. Training stopped "
                             f"without using it; delete {CKPT_DIR}/step_{step:08d} (or the whole work folder) to "
                             "resume from an earlier checkpoint or from the start")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def save_rng_state(path: Path) -> None:
    """Every random state the loop draws from: torch CPU and, on a GPU, CUDA (as tensors: loaded without pickle)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    torch.save(states, path)


def load_rng_state(path: Path) -> None:
    if not path.exists():
        return
    states = torch.load(path, weights_only=True)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


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


# ---- around the loop: in this process, and the stage's result -----------------------------------------------
def local_process_group(device: str = "cpu") -> None:
    """A one-process torch.distributed group (what DeepSpeed needs) for `run_local`.

    Made once per process and kept: DeepSpeed holds on to the first group it sees, so a process that trains
    several times (a reused Ray worker, a test session) must keep the same one.
    """
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("run_local needs a one-process group; this process is in a larger one")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    # an in-process store: the env:// rendezvous would serve a TCP store on every interface for a group of one
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def run_local(job: TrainJob, store: WorkStore, log: StageLog) -> dict:
    """Run the loop as the only worker, in this process (one CPU or GPU)."""
    device = "cuda" if stage_config(job).train.use_gpu else "cpu"
    local_process_group(device)
    summary = train_worker(job, WorkerContext(rank=0, world_size=1, store=store, log=log, device=device))
    assert summary is not None
    return summary


def finish(job: TrainJob, store: WorkStore, out_dir: Path, log: StageLog, wall_s: float,
           extra: dict | None = None) -> dict:
    """The stage's result from a finished work store: checkpoint/ (the best model), curves.parquet, metrics.json.

    Raises TrainingIncomplete when the loop did not finish (no summary): such a folder is never a result.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws = store.get_json(SUMMARY_FILE)
    if ws is None or ws.get("step") != stage_config(job).train.max_steps:
        raise TrainingIncomplete(f"{job.kind} training ended without finishing (no {SUMMARY_FILE} at max_steps)")
    out_dir = Path(out_dir)
    if not (out_dir / BEST_DIR / "model_config.json").exists():
        raise TrainingIncomplete(f"training ended without a best model in {out_dir / BEST_DIR}")
    tc = stage_config(job).train
    rows = ws.pop("curves")
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), out_dir / "curves.parquet")
    train_rows = [r for r in rows if "samples_per_s" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    # the first window of a fresh run carries warm-up (engine, loader start): report the median window
    sps = sorted(r["samples_per_s"] for r in train_rows)
    tps = sorted(r["tokens_per_s"] for r in train_rows)
    metrics = {
        "kind": job.kind,
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
        "tokens_per_s": tps[len(tps) // 2] if tps else None,
        "n_infeasible_total": ws["n_infeasible"],
        "n_params": ws["n_params"],
        "world_size": ws["world_size"],
        "zero_stage": tc.zero_stage,
        "precision": tc.precision,
        "train_loop_s": ws["elapsed_s"],
        "worker_setup_s": ws["worker_setup_s"],
        "wall_s": wall_s,
        **(extra or {}),
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info(f"{job.kind} training done: {metrics['steps']} steps, loss {metrics['first_loss']} -> "
             f"{metrics['final_loss']}, best val {metrics['best_val_loss']}, "
             f"{metrics['samples_per_s'] or math.nan:.1f} samples/s")
    return metrics


def train(job: TrainJob, out_dir: Path, log: StageLog, extra: dict | None = None) -> dict:
    """Train as one worker in this process, with the work store in `out_dir` (a rerun resumes there)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = LocalWorkStore(out_dir)
    run_local(job, store, log)
    metrics = finish(job, store, out_dir, log, time.perf_counter() - t0, extra)
    shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)  # the best model stays
    return metrics
