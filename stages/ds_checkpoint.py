"""DeepSpeed training checkpoints without pickle: every file DeepSpeed writes or reads is a safetensors file.

DeepSpeed saves the model, the optimizer (each rank its own ZeRO partition), the scheduler and its counters as
nested Python structures through a "checkpoint engine". Its default engine writes them with `torch.save` and reads
them back with `torch.load(weights_only=False)`, i.e. by unpickling: a crafted file in a checkpoint folder would run
code on the next resume. `SafeCheckpointEngine` takes its place (`use_safe_checkpoints(engine)`): a structure is
stored as one safetensors file whose tensors are the structure's tensors and whose header metadata holds the rest
as JSON (`narvl.structure`): dicts (any key order and key type), lists, tuples, sets, numbers, strings, torch
sizes and dtypes, and the few DeepSpeed types found in its state (`ALLOWED`), rebuilt from their fields without
running their constructors. Reading parses the safetensors header and that JSON only: a file that is anything
else (a pickle, a `torch.save` archive) is refused with `CheckpointError` naming it, and nothing in it runs.

The file names are DeepSpeed's own (`mp_rank_00_model_states.pt`, `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`),
so `engine.save_checkpoint` / `engine.load_checkpoint` work unchanged for ZeRO stages 0-3 and every precision.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

STRUCTURE_KEY = "narvl.structure"
FORMAT = 1
_PRIMITIVES = (type(None), bool, int, float, str)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be stored or read safely; `path` names it, `reason` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def allowed_types() -> dict[str, type]:
    """The non-builtin types DeepSpeed puts in its checkpoint state, by qualified name: the only ones rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {_name(t): t for t in (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)}


def _name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


# ---- structure <-> (JSON, tensors) ----------------------------------------------------------------------------
def encode(obj: Any, tensors: dict[str, torch.Tensor], allowed: dict[str, type], where: str = "") -> Any:
    """The JSON form of `obj`; its tensors are added to `tensors` (copied to the CPU). Raises TypeError on a type
    that cannot be stored without pickle, naming where in the structure it is."""
    t = type(obj)
    if t in _PRIMITIVES:
        return obj
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        out: dict[str, Any] = {"tensor": name}
        if isinstance(obj, torch.nn.Parameter):
            out["parameter"] = bool(obj.requires_grad)
        return out
    if t is torch.Size:
        return {"size": list(obj)}
    if t is torch.dtype:
        return {"dtype": str(obj).removeprefix("torch.")}
    if t is torch.device:
        return {"device": str(obj)}
    if t in (dict, OrderedDict):
        items = [[encode(k, tensors, allowed, f"{where}/{k!r}"), encode(v, tensors, allowed, f"{where}/{k}")]
                 for k, v in obj.items()]
        return {"odict" if t is OrderedDict else "dict": items}
    if t in (list, tuple, set, frozenset):
        items = [encode(v, tensors, allowed, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {t.__name__: items}
    name = _name(t)
    if allowed.get(name) is not t:
        raise TypeError(f"{where or '/'}: a {name} cannot be stored without pickle (not in the allowed types)")
    if isinstance(obj, enum.Enum):
        return {"enum": name, "value": encode(obj.value, tensors, allowed, where)}
    if dataclasses.is_dataclass(obj):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {"dataclass": name, "fields": encode(fields, tensors, allowed, where)}
    return {"object": name, "state": encode(dict(vars(obj)), tensors, allowed, where)}


def decode(node: Any, tensors: dict[str, torch.Tensor], allowed: dict[str, type]) -> Any:
    """The structure `encode` stored. Raises ValueError on anything it did not write (unknown tags or types)."""
    if type(node) in _PRIMITIVES:
        return node
    if not (isinstance(node, dict) and node):
        raise ValueError(f"unexpected JSON value {node!r:.80}")
    tag = next(iter(node))
    value = node[tag]
    if tag == "tensor":
        if value not in tensors:
            raise ValueError(f"tensor {value!r} missing")
        tensor = tensors[value]
        return torch.nn.Parameter(tensor, requires_grad=bool(node["parameter"])) if "parameter" in node else tensor
    if tag == "size":
        return torch.Size(_ints(value))
    if tag == "dtype":
        dtype = getattr(torch, str(value), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {value!r}")
        return dtype
    if tag == "device":
        return torch.device(str(value))
    if tag in ("dict", "odict"):
        pairs = [(_key(decode(k, tensors, allowed)), decode(v, tensors, allowed)) for k, v in _pairs(value)]
        return OrderedDict(pairs) if tag == "odict" else dict(pairs)
    if tag in ("list", "tuple", "set", "frozenset"):
        if not isinstance(value, list):
            raise ValueError(f"{tag}: expected a list")
        items = [decode(v, tensors, allowed) for v in value]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag in ("enum", "dataclass", "object"):
        cls = allowed.get(str(value))
        if cls is None:
            raise ValueError(f"type {value!r} is not in the allowed types")
        if tag == "enum" and issubclass(cls, enum.Enum):
            return cls(decode(node.get("value"), tensors, allowed))
        if tag == "dataclass" and dataclasses.is_dataclass(cls):
            return cls(**_str_dict(decode(node.get("fields"), tensors, allowed)))
        if tag == "object" and not issubclass(cls, enum.Enum) and not dataclasses.is_dataclass(cls):
            obj = cls.__new__(cls)  # no constructor runs: the stored fields are set as they were
            obj.__dict__.update(_str_dict(decode(node.get("state"), tensors, allowed)))
            return obj
        raise ValueError(f"{tag} {value!r}: stored as the wrong kind")
    raise ValueError(f"unknown tag {tag!r}")


def _ints(value: Any) -> list[int]:
    if not (isinstance(value, list) and all(type(v) is int for v in value)):
        raise ValueError(f"expected a list of integers, got {value!r:.80}")
    return value


def _pairs(value: Any) -> list[list]:
    if not (isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value)):
        raise ValueError("dict: expected a list of [key, value] pairs")
    return value


def _key(k: Any) -> Any:
    hash(k)  # TypeError for an unhashable key -> caught as a bad file
    return k


def _str_dict(d: Any) -> dict[str, Any]:
    if not (isinstance(d, dict) and all(isinstance(k, str) for k in d)):
        raise ValueError("expected a dict of fields")
    return d


# ---- files ----------------------------------------------------------------------------------------------------
def save_structure(obj: Any, path: str | Path) -> None:
    """Write `obj` (a DeepSpeed state dict) as one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    try:
        skeleton = encode(obj, tensors, allowed_types())
    except TypeError as e:
        raise CheckpointError(path, str(e)) from None
    meta = json.dumps({"format": FORMAT, "structure": skeleton}, separators=(",", ":"))
    save_file(tensors, str(path), metadata={STRUCTURE_KEY: meta})


def load_structure(path: str | Path) -> Any:
    """Read a file `save_structure` wrote. Raises CheckpointError for anything else; never unpickles."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "missing from the checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"not a safetensors checkpoint file ({e}); refused: checkpoint files are "
                                    "never unpickled") from None
    if STRUCTURE_KEY not in meta:
        raise CheckpointError(path, f"a safetensors file without {STRUCTURE_KEY!r} metadata (not written by this "
                                    "pipeline's checkpoint engine)")
    try:
        doc = json.loads(meta[STRUCTURE_KEY])
        if not (isinstance(doc, dict) and doc.get("format") == FORMAT and "structure" in doc):
            raise ValueError(f"expected format {FORMAT}")
        return decode(doc["structure"], tensors, allowed_types())
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(path, f"bad {STRUCTURE_KEY} metadata: {e}") from None


class SafeCheckpointEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine interface over `save_structure` / `load_structure`."""

    def __init__(self) -> None:
        super().__init__(None)
        self.name = "NarvlSafetensorsCheckpointEngine"

    def create(self, info: Any) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        save_structure(state_dict, path)

    def load(self, path: str, map_location: Any = None) -> Any:  # tensors on the CPU: DeepSpeed moves them
        return load_structure(path)

    def commit(self, info: Any) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # every tensor is copied out on its own (DeepSpeed need not clone views first)


def use_safe_checkpoints(engine: Any) -> None:
    """Make a DeepSpeed engine save and load its checkpoints through SafeCheckpointEngine."""
    engine.checkpoint_engine = SafeCheckpointEngine()
