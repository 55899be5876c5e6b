"""prepare_data on a tiny config: shards whose sha256 verify, the tokenizer, the report; source=shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from narvl_model.tokenizer import Tokenizer
from stages import prepare_data
from stages.common import PrintLog
from stages.config import DataConfig, PrepareDataStage
from stages.data.shards import DataError, make_loader, read_split_manifest

TINY = dict(image_size=32, train_per_task=24, val_per_task=6, test_per_task=6, samples_per_shard=10,
            bpe_vocab_size=300, num_bins=16)
FIXTURES = Path(__file__).parent / "fixtures" / "ofa_bpe"


def test_shapes_source(tmp_path):
    cfg = PrepareDataStage(task="grounding", data=DataConfig(**TINY))
    log = PrintLog()
    report = prepare_data.run(cfg, prepare_data.Inputs(), tmp_path, log)
    assert {s: v["count"] for s, v in report["splits"].items()} == {"train": 24, "val": 6, "test": 6}
    for split in ("train", "val", "test"):
        m = read_split_manifest(tmp_path / split, verify=True)
        assert m["task"] == "grounding" and m["dataset"]["name"] == "shapes" and m["dataset"]["seed"] == 0
    assert report["splits"]["train"]["max_target_tokens"] == 4  # four location tokens
    tok = Tokenizer.load(tmp_path / "tokenizer")
    assert tok.num_bins == 16 and tok.blank_id == tok.vocab_size - 1 == report["tokenizer"]["blank_id"]
    batch = next(iter(make_loader(tmp_path / "val", tok, "grounding", 6)))
    assert len(batch) == 6 and (batch.target_lengths == 5).all()
    assert log.last("prepare_data/samples") == 36


def test_the_benchmark_has_one_vocabulary_for_every_task(tmp_path):
    """Built-in benchmark: every task's tokenizer is the same file (one teacher can serve all tasks), and it
    encodes the other tasks' texts in fewer pieces than a vocabulary of the task's own texts would."""
    from stages.data.shapes import sample_json
    from stages.data.tasks import sample_texts

    files = {}
    for task in ("caption", "entailment"):
        prepare_data.run(PrepareDataStage(task=task, data=DataConfig(**TINY)), prepare_data.Inputs(),
                         tmp_path / task, PrintLog())
        files[task] = {f.name: f.read_bytes() for f in (tmp_path / task / "tokenizer").iterdir()}
    assert files["caption"] == files["entailment"]
    tok = Tokenizer.load(tmp_path / "caption" / "tokenizer")
    own = Tokenizer.train((t for s in prepare_data.iter_split_samples(tmp_path / "caption" / "train", "caption")
                           for t in sample_texts(s, 16)), vocab_size=300, num_bins=16)  # caption texts only
    other = [t for task in ("vqa", "grounding") for i in range(6)  # tasks this run never prepared
             for t in sample_texts(sample_json(task, "train", i, 32, 0, 4), 16)]
    shared_len, own_len = (sum(len(k.encode(t)) for t in other) for k in (tok, own))
    assert shared_len < own_len, (shared_len, own_len)


def test_shards_source_via_synth_all(tmp_path):
    data = DataConfig(**TINY)
    synth = prepare_data.synth_all(data, ["caption", "vqa"], tmp_path / "synth", PrintLog())
    assert synth["vqa"]["test"]["count"] == 6
    cfg = PrepareDataStage(task="vqa",
                           data=DataConfig(**TINY, source="shards", shards_dir=str(tmp_path / "synth")))
    report = prepare_data.run(cfg, prepare_data.Inputs(), tmp_path / "out", PrintLog())
    assert report["splits"]["train"]["count"] == 24 and report["splits"]["train"]["max_target_tokens"] >= 1
    assert report["splits"]["train"]["dataset"]["name"] == "shapes"
    read_split_manifest(tmp_path / "out" / "train", verify=True)
    # a corrupted source shard is refused with the file's name
    shard = tmp_path / "synth" / "caption" / "val" / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    cfg = PrepareDataStage(task="caption",
                           data=DataConfig(**TINY, source="shards", shards_dir=str(tmp_path / "synth")))
    with pytest.raises(DataError, match="val-000000.tar: sha256"):
        prepare_data.run(cfg, prepare_data.Inputs(), tmp_path / "out2", PrintLog())


def test_ofa_tokenizer_option(tmp_path):
    data = DataConfig(**{**TINY, "train_per_task": 3, "val_per_task": 1, "test_per_task": 1},
                      tokenizer="ofa", ofa_bpe_dir=str(FIXTURES))
    cfg = PrepareDataStage(task="entailment", data=data)
    report = prepare_data.run(cfg, prepare_data.Inputs(), tmp_path, PrintLog())
    assert report["tokenizer"]["kind"] == "ofa"
    assert Tokenizer.load(tmp_path / "tokenizer").encode(" red circle") == [5, 4]
