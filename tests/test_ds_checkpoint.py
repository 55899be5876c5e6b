"""DeepSpeed checkpoints without pickle (stages/ds_checkpoint.py): exact resume for ZeRO stages 0-3 in fp32 and bf16,
the DeepSpeed types round-trip, and a pickle payload or an unknown type in a checkpoint file is refused without
running anything."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest
import torch

from stages.ds_checkpoint import STRUCTURE_KEY, CheckpointError, load_structure, save_structure

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _engine(stage: int, precision: str):
    import deepspeed

    from stages.ds_checkpoint import use_safe_checkpoints
    from stages.train import local_process_group

    local_process_group("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    use_safe_checkpoints(engine)
    return engine


def _step(engine, seed: int) -> float:
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
    loss = engine(x.to(next(engine.module.parameters()).dtype)).float().pow(2).sum()
    engine.backward(loss)
    engine.step()
    return float(loss)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_continues_exactly_for_every_zero_stage(stage, precision, tmp_path):
    a = _engine(stage, precision)
    for i in range(3):
        _step(a, i)
    a.save_checkpoint(str(tmp_path), tag="ds")
    want = [_step(a, i) for i in range(3, 6)]  # model, Adam moments, fp32 master weights, schedule all matter
    b = _engine(stage, precision)
    b.load_checkpoint(str(tmp_path), tag="ds")
    assert [_step(b, i) for i in range(3, 6)] == want
    files = sorted(p for p in (tmp_path / "ds").iterdir() if p.suffix == ".pt")
    assert len(files) == (1 if stage == 0 else 2)
    for f in files:  # DeepSpeed's file names, safetensors content: torch's unpickler cannot even open them
        assert f.read_bytes()[8:9] == b"{"  # a safetensors header, not a zip/pickle
        with pytest.raises(Exception):  # noqa: B017 - whatever torch raises, it is not a pickle
            torch.load(f, weights_only=True)


def test_deepspeed_types_round_trip(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                               consecutive_hysteresis=False, dtype=torch.float16)
    state = {
        "loss_scaler": scaler, "static": LossScaler(scale=1.0), "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": OrderedDict(w=fragment_address(numel=32, start=0)),
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2).t()}},  # int keys, a view
        "shapes": [OrderedDict(w=torch.Size([4, 2]))], "betas": (0.9, 0.999), "names": {"a", "b"},
        "master": torch.nn.Parameter(torch.randn(3)), "empty": torch.zeros(0),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "nothing": None, "inf": float("inf"), "version": "0.19.8",
    }
    save_structure(state, tmp_path / "s.pt")
    got = load_structure(tmp_path / "s.pt")
    assert type(got["loss_scaler"]) is DynamicLossScaler and vars(got["loss_scaler"]) == vars(scaler)
    assert type(got["static"]) is LossScaler and got["static"].cur_scale == 1.0
    assert got["zero_stage"] is ZeroStageEnum.gradients
    assert got["param_slice_mappings"] == state["param_slice_mappings"]
    assert type(got["param_slice_mappings"]) is OrderedDict and list(got["state"]) == [0]
    assert torch.equal(got["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert got["shapes"] == state["shapes"] and type(got["shapes"][0]["w"]) is torch.Size
    assert got["betas"] == (0.9, 0.999) and got["names"] == {"a", "b"}
    assert isinstance(got["master"], torch.nn.Parameter) and torch.equal(got["master"], state["master"])
    assert got["empty"].shape == (0,) and got["half"].dtype == torch.bfloat16
    assert got["nothing"] is None and got["inf"] == float("inf") and got["version"] == "0.19.8"


def test_a_type_outside_the_allow_list_is_refused_on_save_and_on_load(tmp_path):
    class Other:
        pass

    with pytest.raises(CheckpointError, match=r"s\.pt: /x: a .*Other cannot be stored without pickle"):
        save_structure({"x": Other()}, tmp_path / "s.pt")
    # a hand-made file naming a callable: never looked up, never called
    from safetensors.torch import save_file

    marker = tmp_path / "ran"
    crafted = {"format": 1, "structure": {"object": "posix.system", "state": {"dict": []}}}
    save_file({}, str(tmp_path / "c.pt"), metadata={STRUCTURE_KEY: json.dumps(crafted)})
    with pytest.raises(CheckpointError, match=r"c\.pt: bad narvl.structure metadata: type 'posix.system' is not in"):
        load_structure(tmp_path / "c.pt")
    save_file({}, str(tmp_path / "plain.pt"))
    with pytest.raises(CheckpointError, match="without 'narvl.structure' metadata"):
        load_structure(tmp_path / "plain.pt")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_pickle_payload_is_refused_and_never_runs(how, tmp_path):
    import pickle

    marker, path = tmp_path / "ran", tmp_path / "mp_rank_00_model_states.pt"
    if how == "torch.save":
        torch.save({"module": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: not a safetensors checkpoint file"):
        load_structure(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes()) if how == "pickle" else torch.load(path, weights_only=False)
    assert marker.exists()  # the payload is real: unpickled, it runs
