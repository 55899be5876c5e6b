"""Tokenizer: round trip, atomic location tokens, blank last, save/load, OFA's index layout on fixture files."""

from __future__ import annotations

from pathlib import Path

import pytest

from narvl_model.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "ofa_bpe"
TEXTS = ["there is a small red circle and a large blue square", "what color is the star?",
         " which region does the text \" the red cross \" describe?", "we see 2 large green diamonds"] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=320, num_bins=16)


def test_specials_bins_and_blank_layout(tok):
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.blank_id == tok.vocab_size - 1
    assert [tok.bin_id(k) for k in (0, 15)] == [tok.first_bin_id, tok.blank_id - 1]
    assert tok.bin_index(tok.bin_id(7)) == 7 and tok.bin_index(tok.blank_id) is None and tok.bin_index(5) is None
    with pytest.raises(ValueError):
        tok.bin_id(16)


def test_round_trip_lowercases_and_skips_specials(tok):
    ids = tok.encode("There is a small RED circle")
    assert all(4 <= i < tok.first_bin_id for i in ids)
    assert tok.decode(ids) == "there is a small red circle"
    assert tok.decode([tok.bos_id, *ids, tok.blank_id, tok.eos_id, tok.pad_id]) == "there is a small red circle"
    assert len(tok.encode(" red")) == 1  # merges were learned


def test_location_tokens_are_atomic(tok):
    assert tok.encode("<bin_12>") == [tok.bin_id(12)]
    ids = tok.encode("<bin_1> <bin_2><bin_3>  <bin_15>")
    assert ids == [tok.bin_id(k) for k in (1, 2, 3, 15)]
    assert tok.decode(ids) == "<bin_1> <bin_2> <bin_3> <bin_15>"
    mixed = tok.encode("the red circle <bin_4> star")
    assert tok.bin_id(4) in mixed and tok.decode(mixed) == "the red circle <bin_4> star"
    with pytest.raises(ValueError, match="16 bins"):
        tok.encode("<bin_16>")


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_meta.json").is_file()
    back = Tokenizer.load(tmp_path)
    text = "is there a blue square? <bin_3> <bin_0>"
    assert back.encode(text) == tok.encode(text)
    assert (back.vocab_size, back.blank_id, back.num_bins) == (tok.vocab_size, tok.blank_id, tok.num_bins)
    with pytest.raises(FileNotFoundError, match="Tokenizer.save"):
        Tokenizer.load(tmp_path / "nowhere")


def test_ofa_layout_from_fixture_files():
    tok = Tokenizer.from_ofa_files(FIXTURES / "encoder.json", FIXTURES / "vocab.bpe", FIXTURES / "dict.txt",
                                   num_bins=10, num_codes=8)
    n_dict = len((FIXTURES / "dict.txt").read_text().splitlines())  # 264 lines
    # fairseq: specials 0-3, dict.txt line i -> 4 + i; then <mask>, image codes, bins, blank
    assert tok.mask_id == 4 + n_dict
    assert tok.first_bin_id == 4 + n_dict + 1 + 8
    assert tok.bin_id(9) == tok.first_bin_id + 9 and tok.blank_id == tok.first_bin_id + 10 == tok.vocab_size - 1
    # " circle" is GPT-2 id 264 = dict line 0, " red" is 258 = line 1; "z" is not in dict.txt -> <unk>
    assert tok.encode(" red circle") == [5, 4]
    assert tok.encode(" circle z")[-1] == tok.unk_id
    assert tok.encode(" red <bin_3>") == [5, tok.bin_id(3)]
    assert tok.decode([0, 5, 4, tok.mask_id, tok.first_bin_id + 2, tok.blank_id, 2]) == "red circle <bin_2>"


def test_ofa_save_load(tmp_path):
    tok = Tokenizer.from_ofa_files(FIXTURES / "encoder.json", FIXTURES / "vocab.bpe", FIXTURES / "dict.txt",
                                   num_bins=10, num_codes=8)
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.encode(" red circle z <bin_1>") == tok.encode(" red circle z <bin_1>")
    assert back.vocab_size == tok.vocab_size and back.mask_id == tok.mask_id


def ofa_sized_bpe_dir(tmp_path: Path) -> Path:
    """The fixture's BPE files with dict.txt grown to OFA's 50,260 lines: the fixture's 264 lines, GPT-2 ids the
    fixture's encoder.json lacks, and fairseq's three madeupword padding lines (one with a fairseq flag)."""
    d = tmp_path / "BPE"
    d.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (d / name).write_bytes((FIXTURES / name).read_bytes())
    lines = (FIXTURES / "dict.txt").read_text().splitlines()
    lines += [f"{1000 + i} 1" for i in range(50257 - len(lines))]
    lines += ["madeupword0000 0", "madeupword0001 0", "madeupword0002 0 #fairseq:overwrite"]
    (d / "dict.txt").write_text("\n".join(lines) + "\n")
    return d


def test_ofa_bpe_dir_gives_ofa_ids(tmp_path):
    tok = Tokenizer.from_ofa_bpe_dir(ofa_sized_bpe_dir(tmp_path))
    # OFA's rows: 4 specials + 50,260 dict lines, <mask>, 8,192 codes, 1,000 bins (59,457); the CTC blank is extra
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 50264)
    assert (tok.first_code_id, tok.first_code_id + tok.num_codes - 1, tok.first_bin_id) == (50265, 58456, 58457)
    assert (tok.bin_id(0), tok.bin_id(999), tok.blank_id, tok.vocab_size) == (58457, 59456, 59457, 59458)
    assert tok.encode(" red circle <bin_999>") == [5, 4, 59456]
    for text in ("a red circle at <bin_12> <bin_999>", "two red circles", "<bin_0> <bin_1> <bin_2> <bin_3>"):
        assert tok.decode(tok.encode(text)) == text
    # the madeupword rows exist (ids 50261-50263) but no text maps to them, and decoding drops them
    assert tok.decode([5, 50262, 4]) == "red circle" and tok.num_text == 50260


def test_ofa_bpe_dir_errors_name_the_file(tmp_path):
    d = ofa_sized_bpe_dir(tmp_path)
    (d / "dict.txt").write_text("264 1000\nnot-a-count-line\n")
    with pytest.raises(ValueError, match=r"dict.txt: line 2 'not-a-count-line'"):
        Tokenizer.from_ofa_bpe_dir(d)
    (d / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder\.json"):
        Tokenizer.from_ofa_bpe_dir(d)
