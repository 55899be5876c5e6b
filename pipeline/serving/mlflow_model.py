"""A trained model as an MLflow `pyfunc` model: checkpoint + tokenizer as artifacts, decoding settings as config.

    log_model(run_id, model_dir, tokenizer_dir, kind)      # each training stage's child run -> runs:/<id>/model
    mlflow.pyfunc.load_model("runs:/<id>/model").predict(pd.DataFrame([{"task": "vqa", "image": b64, "text": q}]))

The model is logged as "models from code" (pyfunc_code.py, which builds `NarvlPyfunc`), so loading it unpickles
nothing: the weights are read from safetensors, the model config and tokenizer from JSON. The narvl package
itself must be importable where the model is loaded (it is a library dependency, like torch).

Input: a DataFrame with `task` and `image` (base64 PNG/JPEG) columns and optional `text` / `premise`.
Output: a DataFrame with `task`, `text`, `box` (JSON: [x0, y0, x1, y1] in pixels, or null), `decoding`,
`model_ms`, one row per input row (decoded together).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from pipeline.serving.predictor import Predictor, resolve_checkpoint

MODEL_NAME = "model"
CODE_FILE = Path(__file__).with_name("pyfunc_code.py")
INPUT_COLUMNS = ("task", "image", "text", "premise")


def _column(df: pd.DataFrame, name: str, i: int) -> Any:
    if name not in df.columns:
        return None
    v = df[name].iloc[i]
    return None if v is None or (isinstance(v, float) and v != v) else v


class NarvlPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper of a Predictor (artifacts "checkpoint" and "tokenizer"; model_config decoding)."""

    def load_context(self, context) -> None:
        conf = dict(context.model_config or {})
        self.predictor = Predictor(context.artifacts["checkpoint"], context.artifacts["tokenizer"],
                                   ar_decode=conf.get("ar_decode", "beam"), beam_size=int(conf.get("beam_size", 5)),
                                   max_len=int(conf.get("max_len", 24)), device=conf.get("device", "auto"))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("task", "image") if c not in df.columns]
        if missing:
            raise ValueError(f"input: missing column(s) {missing}; expected {list(INPUT_COLUMNS)}")
        requests = []
        for i in range(len(df)):
            try:
                image = base64.b64decode(str(_column(df, "image", i) or ""), validate=True)
            except ValueError as e:
                raise ValueError(f"input row {i}: column 'image' is not base64 ({e})") from e
            requests.append({"task": _column(df, "task", i), "image": image, "text": _column(df, "text", i),
                             "premise": _column(df, "premise", i)})
        answers = self.predictor.predict(requests)
        return pd.DataFrame([{"task": a["task"], "text": a["text"], "box": json.dumps(a["box"]),
                              "decoding": a["decoding"], "model_ms": float(a["model_ms"])} for a in answers])


def example_input(image_size: int) -> pd.DataFrame:
    """One request per task on a built-in benchmark image (the logged input example)."""
    from stages.data.shapes import make_sample

    rows = []
    for task, text, premise in (("caption", None, None), ("vqa", "what color is the circle?", None),
                                ("grounding", "the red square", None),
                                ("entailment", "there is a red square", "a red square and a blue circle")):
        _, png = make_sample(task, "val", 0, image_size, 0, 2)
        rows.append({"task": task, "image": base64.b64encode(png).decode(), "text": text, "premise": premise})
    return pd.DataFrame(rows)


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "safetensors", "tokenizers", "pillow", "numpy", "pydantic",
                                           "mlflow", "pandas")]


def log_model(run_id: str, model_dir: str | Path, tokenizer_dir: str | Path, kind: str, *,
              tracking_uri: str | None = None, registered_model_name: str | None = None,
              ar_decode: str = "beam", beam_size: int = 5, max_len: int = 24) -> str:
    """Log a trained model to an existing MLflow run as `<run>/model`; returns "runs:/<run_id>/model".

    Args:
        run_id: the run to log into (e.g. a training stage's child run); its status is left as it was.
        model_dir: a train_teacher / train_nar output (checkpoint/ inside) or the checkpoint folder.
        tokenizer_dir: the prepare_data output's tokenizer/ folder.
        kind: "ar" or "narvl"; must match the checkpoint.
        tracking_uri: the store to log to (default: MLflow's current tracking URI).
        registered_model_name: also register the model under this name in the model registry.
        ar_decode, beam_size, max_len: AR decoding of the packaged model (model_config; ignored for NARVL).
    """
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from narvl_model.checkpoint import CONFIG

    ckpt = resolve_checkpoint(model_dir)
    meta = json.loads((ckpt / CONFIG).read_text())
    if kind not in ("ar", "narvl") or meta["kind"] != kind:
        raise ValueError(f"log_model: kind={kind!r} but {ckpt / CONFIG} holds a {meta['kind']!r} model")
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer_meta.json").is_file():
        raise FileNotFoundError(f"log_model: {tokenizer_dir} has no tokenizer_meta.json (expected prepare_data's "
                                "tokenizer/ folder)")
    # the NARVL decoding (its loss) is in the checkpoint's model config
    model_config = {"kind": kind, "ar_decode": ar_decode, "beam_size": beam_size, "max_len": max_len}
    predictor = Predictor(ckpt, tokenizer_dir, ar_decode=ar_decode, beam_size=beam_size, max_len=max_len,
                          device="cpu")
    example = example_input(predictor.model.cfg.image_size)
    wrapper = NarvlPyfunc()
    wrapper.predictor = predictor
    signature = infer_signature(example, wrapper.predict(None, example))

    previous_uri = mlflow.get_tracking_uri()
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        client = MlflowClient()
        status = client.get_run(run_id).info.status
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            _log(ckpt, tokenizer_dir, model_config, signature, example, registered_model_name)
        else:
            with mlflow.start_run(run_id=run_id, nested=active is not None):
                _log(ckpt, tokenizer_dir, model_config, signature, example, registered_model_name)
            if client.get_run(run_id).info.status != status:  # leave the run as the pipeline had it
                if status in ("RUNNING", "SCHEDULED"):
                    client.update_run(run_id, status=status)
                else:
                    client.set_terminated(run_id, status=status)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    return f"runs:/{run_id}/{MODEL_NAME}"


def _log(ckpt: Path, tokenizer_dir: Path, model_config: dict, signature, example: pd.DataFrame,
         registered_model_name: str | None) -> None:
    mlflow.pyfunc.log_model(
        name=MODEL_NAME, python_model=str(CODE_FILE),
        artifacts={"checkpoint": str(ckpt), "tokenizer": str(tokenizer_dir)}, model_config=model_config,
        signature=signature, input_example=example, pip_requirements=_pip_requirements(),
        registered_model_name=registered_model_name)


def download(model_uri: str) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer dir) of a model logged by log_model, downloaded to a local folder."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    if "checkpoint" not in artifacts or "tokenizer" not in artifacts:
        raise ValueError(f"{model_uri}: not a narvl model (no checkpoint/tokenizer artifacts in its MLmodel)")
    return local / artifacts["checkpoint"]["path"], local / artifacts["tokenizer"]["path"]
