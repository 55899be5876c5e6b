"""`narvl serve`: a trained model behind an HTTP JSON API on Ray Serve, with dynamic batching.

Endpoints (one deployment, raw Starlette requests):

    POST /v1/{caption,vqa,grounding,entailment}
        application/json     {"image": "<base64 PNG/JPEG>", "text": "...", "premise": "..." (entailment)}
        multipart/form-data  image=<file>, text=..., premise=...
        -> {"task", "text", "box" (grounding: [x0, y0, x1, y1] in the image's pixels, or null), "decoding",
            "batch_size" (requests the server decoded together), "model_ms", "server_ms"}
    GET  /healthz  -> {"status": "ok", "kind", "decoding"}
    GET  /stats    -> this replica's batch-size histogram

`text` is the question (vqa), the referring expression (grounding) or the hypothesis (entailment, with `premise`);
caption needs none. Bad requests get a 4xx and a message naming the field: 400 (not an image, empty text, bad
JSON), 404 (unknown task or path), 405, 413 (too large), 415 (wrong content type). The replica keeps answering.

Requests are checked and decoded to tensors one by one, then a `@serve.batch` method decodes up to
`max_batch_size` of them together (waiting at most `batch_wait_timeout_s` for a batch to fill); the model runs in a
worker thread so the replica keeps accepting requests meanwhile. `max_ongoing_requests` must exceed the batch size,
else batches never fill. Ray Serve's own metrics (request counts, latencies, queue lengths) are exported as usual;
`narvl_serve_batch_size` adds the batches formed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from pipeline.serving.predictor import MAX_IMAGE_BYTES, TASKS, Predictor, Prepared, RequestError

APP_NAME = "narvl"


class ServeConfig(BaseModel):
    """Everything `narvl serve` needs; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="a train_teacher / train_nar output (or its checkpoint/), or an MLflow model URI "
                       "(runs:/<id>/model, models:/<name>/<version>)")
    tokenizer: str | None = Field(None, description="the prepare_data tokenizer/ folder (not for MLflow URIs)")
    ar_decode: Literal["beam", "greedy"] = "beam"
    beam_size: int = Field(5, ge=1)
    max_len: int = Field(24, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_ongoing_requests: int | None = Field(None, description="per replica; default 2 x max_batch_size")
    num_replicas: int = Field(1, ge=1)
    autoscaling: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config, passed through "
                                               "(min_replicas, max_replicas, target_ongoing_requests, ...)")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="default: max(1, int(num_cpus))")
    max_image_bytes: int = Field(MAX_IMAGE_BYTES, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests <= self.max_batch_size:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} must exceed max_batch_size="
                             f"{self.max_batch_size}, else batches never fill")
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("give either num_replicas or autoscaling, not both")
        if not is_mlflow_uri(self.model) and self.tokenizer is None:
            raise ValueError(f"model={self.model!r} is a folder: pass tokenizer (the prepare_data tokenizer/ folder)")
        return self

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(("runs:/", "models:/"))


def load_predictor(cfg: ServeConfig) -> Predictor:
    """The predictor of a model folder, or of an MLflow model logged by pipeline.serving.mlflow_model."""
    kwargs = dict(ar_decode=cfg.ar_decode, beam_size=cfg.beam_size, max_len=cfg.max_len, device=cfg.device,
                  max_image_bytes=cfg.max_image_bytes)
    if is_mlflow_uri(cfg.model):
        from pipeline.serving.mlflow_model import download

        model_dir, tokenizer_dir = download(cfg.model)
        return Predictor(model_dir, tokenizer_dir, **kwargs)
    return Predictor(cfg.model, cfg.tokenizer, **kwargs)


def _json(data: Any, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(data, status_code=status)


def _error(status: int, message: str):
    return _json({"error": message, "status": status}, status)


@serve.deployment(name="NarvlModel")
class NarvlModel:
    """One replica: the predictor, the HTTP routes and the batched model call."""

    def __init__(self, cfg: dict) -> None:
        import torch

        self.cfg = ServeConfig(**cfg)
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.num_cpus)))
        self.predictor = load_predictor(self.cfg)
        self.decode_batch.set_max_batch_size(self.cfg.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        from ray.serve.metrics import Histogram

        self.batch_metric = Histogram("narvl_serve_batch_size", description="requests decoded together",
                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def decode_batch(self, items: list[Prepared]) -> list[dict]:
        self.batch_sizes[len(items)] += 1
        self.batch_metric.observe(len(items))
        return await asyncio.to_thread(self.predictor.run, items)

    async def __call__(self, request) -> Any:
        t0 = time.perf_counter()
        path = request.url.path.rstrip("/")
        try:
            if path == "/healthz":
                return _json({"status": "ok", "kind": self.predictor.kind, "decoding": self.predictor.decoding})
            if path == "/stats":
                n = sum(self.batch_sizes.values())
                return _json({"batches": n, "requests": sum(k * v for k, v in self.batch_sizes.items()),
                              "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                              "max_batch_size": self.cfg.max_batch_size})
            if not path.startswith("/v1/"):
                raise RequestError(f"no route {path!r}; POST /v1/{{{','.join(TASKS)}}}, GET /healthz, GET /stats",
                                   status=404)
            task = path[len("/v1/"):]
            if task not in TASKS:
                raise RequestError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}", status=404)
            if request.method != "POST":
                raise RequestError(f"{request.method} {path}: use POST", status=405)
            fields = await self._read(request)
            item = self.predictor.prepare(task, fields["image"], fields.get("text"), fields.get("premise"))
        except RequestError as e:
            return _error(e.status, str(e))
        try:
            answer = await self.decode_batch(item)
        except Exception as e:  # a failing batch fails its requests, not the replica
            return _error(500, f"model error: {type(e).__name__}: {e}")
        return _json({**answer, "server_ms": (time.perf_counter() - t0) * 1e3})

    async def _read(self, request) -> dict[str, Any]:
        """{"image": bytes, "text", "premise"} of a JSON (base64 image) or multipart request."""
        limit = self.cfg.max_image_bytes * 4 // 3 + 64 * 1024  # base64 + the text fields
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {declared} bytes exceeds {limit}", status=413)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await request.body()
            if len(body) > limit:
                raise RequestError(f"request body of {len(body)} bytes exceeds {limit}", status=413)
            try:
                data = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"body is not valid JSON ({e})") from e
            if not isinstance(data, dict):
                raise RequestError("body: expected a JSON object {\"image\": <base64>, \"text\": ...}")
            image = data.get("image")
            if not isinstance(image, str) or not image:
                raise RequestError("field 'image': expected a base64-encoded PNG/JPEG string")
            try:
                raw = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"field 'image': not valid base64 ({e})") from e
            return {"image": raw, "text": data.get("text"), "premise": data.get("premise")}
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=4)
            except Exception as e:  # malformed multipart bodies raise several parser errors
                raise RequestError(f"multipart body does not parse ({e})") from e
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError("field 'image': expected a file part named 'image'")
            raw = await upload.read()
            text, premise = form.get("text"), form.get("premise")
            return {"image": raw, "text": text if isinstance(text, str) else None,
                    "premise": premise if isinstance(premise, str) else None}
        raise RequestError(f"content type {ctype or '(none)'!r}: send application/json (base64 image) or "
                           "multipart/form-data", status=415)


def build_app(cfg: ServeConfig):
    """The bound Ray Serve application for `cfg` (deployment options from it)."""
    options: dict[str, Any] = dict(max_ongoing_requests=cfg.ongoing,
                                   ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus})
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling
    else:
        options["num_replicas"] = cfg.num_replicas
    return NarvlModel.options(**options).bind(cfg.model_dump())


def start(cfg: ServeConfig, name: str = APP_NAME) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port (Ray must be initialised) and deploy; returns the base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"


def serve_forever(cfg: ServeConfig, ray_address: str | None = None) -> None:  # pragma: no cover - CLI loop
    """`narvl serve`: start Ray (or join ray_address), deploy, block until Ctrl-C, then shut Serve down."""
    from pipeline.ray_utils import init_ray

    init_ray(address=ray_address)
    url = start(cfg)
    print(f"serving {cfg.model} at {url} (POST /v1/{{{','.join(TASKS)}}}, GET /healthz); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def config_from_file(path: Path) -> dict[str, Any]:
    """ServeConfig fields from a YAML file (`narvl serve --config`)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of ServeConfig fields")
    return data
