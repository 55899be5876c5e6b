"""`narvl serve`: a smoke-trained NARVL model on a local Ray Serve, over real HTTP on 127.0.0.1.

One Serve application for the module (shut down at the end): every task's endpoint answers as the in-process
predictor does, 64 concurrent requests all succeed and form batches, bad requests get their 4xx while the replica
keeps answering, and the MLflow pyfunc model (sqlite store) predicts what the server answers.
"""

from __future__ import annotations

import base64
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from pipeline.serving.predictor import TASKS, Predictor
from stages.data.schema import ENTAILMENT_LABELS

MAX_IMAGE_BYTES = 200_000


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import torch

    from pipeline.serving.smoke import train_smoke_models

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_smoke_models(tmp_path_factory.mktemp("serve-models"))
    finally:
        torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(models, ray_session) -> str:
    from ray import serve

    from pipeline.serving.app import ServeConfig, start

    cfg = ServeConfig(model=str(models["narvl"]), tokenizer=str(models["tokenizer"]), max_batch_size=8,
                      batch_wait_timeout_s=0.05, num_cpus=0.5, port=_free_port(), max_image_bytes=MAX_IMAGE_BYTES)
    url = start(cfg, name="narvl-test")
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def predictor(models) -> Predictor:
    return Predictor(models["narvl"], models["tokenizer"], device="cpu")


def _requests(n: int, image_size: int = 64) -> list[dict]:
    """n requests per task on built-in benchmark images (larger than the model's 32 px input)."""
    from stages.data.shapes import make_sample

    out = []
    for task in TASKS:
        for i in range(n):
            s, png = make_sample(task, "test", i, image_size, 7, 2)
            text = {"caption": None, "vqa": s.get("question"), "grounding": s.get("expression"),
                    "entailment": s.get("hypothesis")}[task]
            out.append({"task": task, "image": png, "text": text, "premise": s.get("premise")})
    return out


def _post(url: str, req: dict, multipart: bool = False) -> requests.Response:
    fields = {k: req[k] for k in ("text", "premise") if req.get(k) is not None}
    if multipart:
        return requests.post(f"{url}/v1/{req['task']}", files={"image": ("x.png", req["image"], "image/png")},
                             data=fields, timeout=60)
    return requests.post(f"{url}/v1/{req['task']}", json={"image": base64.b64encode(req["image"]).decode(), **fields},
                         timeout=60)


def _same(answer: dict, expected: dict) -> None:
    assert answer["text"] == expected["text"]
    if expected["box"] is None:
        assert answer["box"] is None
    else:
        assert answer["box"] == pytest.approx(expected["box"])


@pytest.mark.timeout(180)
def test_each_task_endpoint_answers_like_the_predictor(server, predictor):
    health = requests.get(f"{server}/healthz", timeout=10).json()
    assert health == {"status": "ok", "kind": "narvl", "decoding": "narvl"}
    reqs = _requests(2)
    for i, req in enumerate(reqs):
        r = _post(server, req, multipart=i % 2 == 1)  # JSON + base64 and multipart, for every task
        assert r.status_code == 200, r.text
        got = r.json()
        assert set(got) == {"task", "text", "box", "decoding", "batch_size", "model_ms", "server_ms"}
        assert got["task"] == req["task"] and got["decoding"] == "narvl" and got["batch_size"] >= 1
        assert 0 < got["model_ms"] <= got["server_ms"]
        _same(got, predictor.predict([req])[0])
        if req["task"] == "grounding" and got["box"] is not None:  # pixels of the 64 px request image
            x0, y0, x1, y1 = got["box"]
            assert all(0.0 <= v <= 64.0 for v in got["box"]) and got["text"].count("<bin_") == 4
        if req["task"] == "entailment":
            assert got["text"] in ENTAILMENT_LABELS
        if req["task"] == "caption":
            assert got["text"].strip()
    # the smoke model learned the output format well enough that grounding answers carry boxes
    boxes = [_post(server, r).json()["box"] for r in _requests(12) if r["task"] == "grounding"]
    assert sum(b is not None for b in boxes) >= 3, boxes


@pytest.mark.timeout(180)
def test_64_concurrent_requests_succeed_and_form_batches(server, predictor):
    reqs = [r for r in _requests(4) if r["task"] in ("vqa", "grounding")]  # 8 distinct requests
    expected = [predictor.predict([r])[0] for r in reqs]
    before = requests.get(f"{server}/stats", timeout=10).json()
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda i: _post(server, reqs[i % len(reqs)]), range(64)))
    assert [r.status_code for r in responses] == [200] * 64
    answers = [r.json() for r in responses]
    for i, a in enumerate(answers):  # batched with other requests (and other tasks), the answer is the same
        _same(a, expected[i % len(reqs)])
    assert max(a["batch_size"] for a in answers) > 1
    after = requests.get(f"{server}/stats", timeout=10).json()
    assert after["requests"] - before["requests"] == 64
    formed = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(k for k, v in formed.items() if v > 0) > 1 and max(formed) <= 8


def _png() -> bytes:
    from stages.data.shapes import make_sample

    return make_sample("vqa", "test", 0, 32, 7, 2)[1]


BAD = {
    "not an image": (dict(json={"image": base64.b64encode(b"hello, not a png").decode(), "text": "q"}), 400, "image"),
    "not base64": (dict(json={"image": "@@not base64@@", "text": "q"}), 400, "base64"),
    "image too large": (dict(json={"image": base64.b64encode(bytes(MAX_IMAGE_BYTES + 1)).decode(), "text": "q"}),
                        413, f"at most {MAX_IMAGE_BYTES}"),
    "body too large": (dict(json={"image": base64.b64encode(bytes(2 * MAX_IMAGE_BYTES)).decode(), "text": "q"}),
                       413, "exceeds"),
    "empty text": (dict(json={"image": "PNG", "text": "  "}), 400, "'text'"),
    "missing premise": (dict(json={"image": "PNG", "text": "there is a square"}, task="entailment"), 400,
                        "'premise'"),
    "unknown task": (dict(json={"image": "PNG", "text": "q"}, task="detection"), 404, "unknown task 'detection'"),
    "wrong content type": (dict(data=b"PNG bytes", headers={"content-type": "image/png"}), 415, "content type"),
    "bad json": (dict(data=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "json not an object": (dict(json=["image"]), 400, "JSON object"),
    "multipart without image": (dict(files={"text": (None, "q")}), 400, "'image'"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_its_4xx_and_the_server_keeps_answering(server, case):
    kwargs, status, message = BAD[case]
    kwargs = dict(kwargs)
    task = kwargs.pop("task", "vqa" if "premise" not in case else "entailment")
    if isinstance(kwargs.get("json"), dict) and kwargs["json"].get("image") == "PNG":
        kwargs["json"] = {**kwargs["json"], "image": base64.b64encode(_png()).decode()}
    r = requests.post(f"{server}/v1/{task}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["status"] == status and message in r.json()["error"], r.json()
    ok = requests.post(f"{server}/v1/vqa", json={"image": base64.b64encode(_png()).decode(), "text": "what?"},
                       timeout=30)
    assert ok.status_code == 200 and isinstance(ok.json()["text"], str)


@pytest.mark.timeout(60)
def test_get_on_a_task_and_unknown_paths_are_refused(server):
    assert requests.get(f"{server}/v1/vqa", timeout=10).status_code == 405
    r = requests.get(f"{server}/nothing", timeout=10)
    assert r.status_code == 404 and "/healthz" in r.json()["error"]


@pytest.mark.timeout(180)
def test_pyfunc_model_predicts_the_same_as_the_served_model(server, models, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from pipeline.serving.mlflow_model import download, log_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    model_uri = log_model(run_id, models["narvl"], models["tokenizer"], "narvl", tracking_uri=uri,
                          registered_model_name="narvl-smoke")
    assert model_uri == f"runs:/{run_id}/model"
    assert client.get_run(run_id).info.status == "RUNNING"  # the pipeline's run is left as it was
    assert client.get_model_version("narvl-smoke", "1").run_id == run_id
    with pytest.raises(ValueError, match="'narvl' model"):
        log_model(run_id, models["narvl"], models["tokenizer"], "ar", tracking_uri=uri)

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
        assert not list(local.rglob("*.pkl")) and (local / "artifacts" / "checkpoint" / "model.safetensors").exists()
        model = mlflow.pyfunc.load_model(model_uri)
        assert model.metadata.signature is not None
        assert {"task", "image", "text", "premise"} <= set(model.metadata.signature.inputs.input_names())
        reqs = _requests(2)
        frame = pd.DataFrame([{"task": r["task"], "image": base64.b64encode(r["image"]).decode(), "text": r["text"],
                               "premise": r["premise"]} for r in reqs])
        out = model.predict(frame)
        ckpt, tokenizer = download(model_uri)  # what `narvl serve runs:/<id>/model` loads
        from_uri = Predictor(ckpt, tokenizer, device="cpu").predict(reqs)
    finally:
        mlflow.set_tracking_uri(previous)
    assert len(out) == len(reqs)
    for req, (_, row) in zip(reqs, out.iterrows(), strict=True):
        served = _post(server, req).json()
        _same({"text": row["text"], "box": json.loads(row["box"])}, served)
    for answer, (_, row) in zip(from_uri, out.iterrows(), strict=True):
        _same(answer, {"text": row["text"], "box": json.loads(row["box"])})


def test_serve_config_refuses_batches_that_cannot_fill(tmp_path):
    from pydantic import ValidationError

    from pipeline.serving.app import ServeConfig

    with pytest.raises(ValidationError, match="must exceed max_batch_size"):
        ServeConfig(model=str(tmp_path), tokenizer=str(tmp_path), max_batch_size=8, max_ongoing_requests=8)
    with pytest.raises(ValidationError, match="pass tokenizer"):
        ServeConfig(model=str(tmp_path))
    cfg = ServeConfig(model="runs:/abc/model")
    assert cfg.host == "127.0.0.1" and cfg.ongoing == 2 * cfg.max_batch_size


def test_cli_serve_refuses_a_bad_option_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--tokenizer", str(tmp_path), "max_batch_size=8",
                                   "max_ongoing_requests=4"])
    assert res.exit_code == 2 and "must exceed max_batch_size" in res.output
    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--tokenizer", str(tmp_path), "batch_size"])
    assert res.exit_code == 2 and "expected key=value" in res.output


def test_ar_predictor_decodes_with_beam_or_greedy_search_as_configured(models):
    import torch

    from narvl_model.search import beam_search, greedy_search
    from stages.data.shards import _pad

    reqs = [r for r in _requests(2) if r["task"] in ("vqa", "grounding")]
    for decode, search in (("greedy", lambda m, i, s: greedy_search(m, i, s, 24)),
                           ("beam", lambda m, i, s: beam_search(m, i, s, 5, 24))):
        p = Predictor(models["ar"], models["tokenizer"], ar_decode=decode, device="cpu")
        assert p.kind == "ar" and p.decoding == ("ar-greedy" if decode == "greedy" else "ar-beam5")
        answers = p.predict(reqs)
        for req, answer in zip(reqs, answers, strict=True):
            item = p.prepare(req["task"], req["image"], req["text"])
            ids = search(p.model, torch.from_numpy(item.image)[None], _pad([item.src], p.tokenizer.pad_id))[0]
            assert answer["text"] == p.tokenizer.decode(ids).strip()


def test_predictor_refuses_a_folder_without_weights_and_a_foreign_tokenizer(models, tmp_path):
    from narvl_model.tokenizer import Tokenizer

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Predictor(tmp_path, models["tokenizer"])
    Tokenizer.train(["a b c"], vocab_size=40, num_bins=4).save(tmp_path / "tok")
    with pytest.raises(ValueError, match="tokenizer vocabulary"):
        Predictor(models["narvl"], tmp_path / "tok")
