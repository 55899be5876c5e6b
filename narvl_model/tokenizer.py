"""The tokenizer: byte-level BPE text ids, location tokens <bin_k> and the CTC blank, in OFA's index layout.

Layout of the final ids (both kinds):

    0 <s>, 1 <pad>, 2 </s>, 3 <unk>        fairseq's specials
    4 ..                                    text (BPE) tokens
    [<mask>, <code_0>.. ]                   OFA only: the mask and the image codes
    <bin_0> .. <bin_{B-1}>                  location tokens
    <blank>                                 the CTC blank, always the last id (vocab_size includes it)

Text is lower-cased and encoded by an inner `tokenizers` BPE model; location tokens are cut out of the text with a
regular expression before BPE, so "<bin_12>" is always one atomic id. The inner model's ids are mapped to the final
layout through a table: the identity shifted by 4 for a trained tokenizer, GPT-2 id -> dict.txt line + 4 for
OFA's files (as fairseq's Dictionary does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_BIN_RE = re.compile(r"\s*<bin_(\d+)>\s*")
_META_VERSION = 1


class Tokenizer:
    """Text <-> ids for the NARVL models.

    Args:
        inner: the `tokenizers` BPE tokenizer for text.
        inner_to_id: final id of every inner id (length = inner vocabulary size; UNK_ID where unmapped).
        num_bins: number of location tokens.
        num_codes: image-code tokens between <mask> and the bins (OFA layout only; 0 means no <mask> either).
        kind: "bpe" (trained here) or "ofa" (built from OFA's GPT-2 BPE files).
    """

    def __init__(self, inner: HFTokenizer, inner_to_id: np.ndarray, num_bins: int, num_codes: int = 0,
                 kind: str = "bpe", num_text: int | None = None) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins={num_bins}: need at least 1 location token")
        self._inner = inner
        self._inner_to_id = np.asarray(inner_to_id, dtype=np.int64)
        self.kind = kind
        self.num_bins = num_bins
        self.num_codes = num_codes
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = BOS_ID, PAD_ID, EOS_ID, UNK_ID
        if num_text is None:
            num_text = int(self._inner_to_id.max()) + 1 - len(SPECIALS) if len(self._inner_to_id) else 0
        self.num_text = num_text
        first_free = len(SPECIALS) + num_text
        self.mask_id: int | None = first_free if num_codes else None
        self.first_code_id = first_free + 1 if num_codes else first_free
        self.first_bin_id = self.first_code_id + num_codes
        self.blank_id = self.first_bin_id + num_bins
        self.vocab_size = self.blank_id + 1
        # final id -> inner id (-1 where the final id is not a text token)
        self._id_to_inner = np.full(self.vocab_size, -1, dtype=np.int64)
        valid = self._inner_to_id >= len(SPECIALS)
        self._id_to_inner[self._inner_to_id[valid]] = np.nonzero(valid)[0]

    # ---- ids ---------------------------------------------------------------------------------------------------
    def bin_id(self, k: int) -> int:
        """Id of <bin_k>."""
        if not 0 <= k < self.num_bins:
            raise ValueError(f"bin {k} out of range 0..{self.num_bins - 1}")
        return self.first_bin_id + k

    def bin_index(self, token_id: int) -> int | None:
        """k if `token_id` is <bin_k>, else None."""
        k = int(token_id) - self.first_bin_id
        return k if 0 <= k < self.num_bins else None

    # ---- text --------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of `text` (lower-cased), without bos/eos. "<bin_k>" becomes one location token."""
        out: list[int] = []
        pos = 0
        for m in _BIN_RE.finditer(text):
            out += self._encode_text(text[pos:m.start()])
            k = int(m.group(1))
            if k >= self.num_bins:
                raise ValueError(f"<bin_{k}> in {text!r}: this tokenizer has {self.num_bins} bins")
            out.append(self.first_bin_id + k)
            pos = m.end()
        out += self._encode_text(text[pos:])
        return out

    def _encode_text(self, text: str) -> list[int]:
        if not text.strip():
            return []
        inner = self._inner.encode(text.lower(), add_special_tokens=False).ids
        return self._inner_to_id[inner].tolist() if inner else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: specials, <mask>, image codes and the blank dropped; bins rendered as "<bin_k>"."""
        pieces: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                text = self._inner.decode(run, skip_special_tokens=False).strip()
                if text:
                    pieces.append(text)
                run.clear()

        for t in ids:
            t = int(t)
            if 0 <= t < self.vocab_size and self._id_to_inner[t] >= 0:
                run.append(int(self._id_to_inner[t]))
                continue
            flush()
            k = self.bin_index(t)
            if k is not None:
                pieces.append(f"<bin_{k}>")
        flush()
        return " ".join(pieces)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, num_bins: int) -> Tokenizer:
        """Train a byte-level BPE on lower-cased `texts`; `vocab_size` counts BPE tokens (alphabet + merges)."""
        inner = HFTokenizer(models.BPE())
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        # location tokens never reach BPE: cut them out of the training texts as encode() does
        inner.train_from_iterator((_BIN_RE.sub(" ", t).lower() for t in texts), trainer=trainer)
        n = inner.get_vocab_size()
        return cls(inner, np.arange(n, dtype=np.int64) + len(SPECIALS), num_bins=num_bins, kind="bpe")

    @classmethod
    def from_ofa_files(cls, encoder_json: str | Path, vocab_bpe: str | Path, dict_txt: str | Path,
                       num_bins: int = 1000, num_codes: int = 8192) -> Tokenizer:
        """OFA's vocabulary: GPT-2 BPE ids remapped through fairseq's dict.txt, then <mask>, codes, bins, blank.

        Args:
            encoder_json: GPT-2 `encoder.json` (byte-level token -> GPT-2 id).
            vocab_bpe: GPT-2 `vocab.bpe` (merges, first line a version header).
            dict_txt: fairseq `dict.txt`; line i ("<gpt2 id> <count>") is final id 4 + i.
            num_bins: location tokens (OFA: 1000).
            num_codes: image-code tokens (OFA: 8192).
        """
        vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        merges = []
        for line in Path(vocab_bpe).read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            a, b = line.split()
            merges.append((a, b))
        inner = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        dict_index: dict[int, int] = {}
        lines = Path(dict_txt).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            # fairseq: "<symbol> <count> [#fairseq:overwrite]"; symbols that are no GPT-2 id (the madeupword
            # padding lines of fairseq's GPT-2 dict.txt) keep their row but no text maps to them
            parts = line.split()
            if len(parts) not in (2, 3) or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{dict_txt}: line {i + 1} {line!r} is not '<symbol> <count> [flag]'")
            if parts[0].isdigit():
                dict_index[int(parts[0])] = len(SPECIALS) + i
        n_inner = max(vocab.values()) + 1
        table = np.full(n_inner, UNK_ID, dtype=np.int64)
        for gpt2_id, final in dict_index.items():
            if 0 <= gpt2_id < n_inner:
                table[gpt2_id] = final
        # dict.txt lines that are no GPT-2 id of encoder.json still take their index
        return cls(inner, table, num_bins=num_bins, num_codes=num_codes, kind="ofa", num_text=len(lines))

    @classmethod
    def from_ofa_bpe_dir(cls, bpe_dir: str | Path, num_bins: int = 1000, num_codes: int = 8192) -> Tokenizer:
        """OFA's tokenizer from its BPE folder (OFA's `utils/BPE`: encoder.json, vocab.bpe, dict.txt).

        With OFA's files the ids equal the rows of OFA's checkpoints: <s>=0 <pad>=1 </s>=2 <unk>=3, text 4..50263,
        <mask>=50264, <code_0..8191>=50265..58456, <bin_0..999>=58457..59456; the CTC blank is one extra row, 59457.
        """
        d = Path(bpe_dir)
        files = [d / "encoder.json", d / "vocab.bpe", d / "dict.txt"]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"OFA BPE folder {d}: missing {absent} (OFA's utils/BPE holds encoder.json, "
                                    f"vocab.bpe and dict.txt)")
        return cls.from_ofa_files(*files, num_bins=num_bins, num_codes=num_codes)

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (the inner BPE) and tokenizer_meta.json (layout, special ids, id table)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._inner.save(str(d / "tokenizer.json"))
        identity = bool(np.array_equal(self._inner_to_id, np.arange(len(self._inner_to_id)) + len(SPECIALS)))
        meta = {
            "meta_version": _META_VERSION, "kind": self.kind, "num_bins": self.num_bins,
            "num_codes": self.num_codes, "num_text": self.num_text, "vocab_size": self.vocab_size,
            "bos_id": self.bos_id, "pad_id": self.pad_id, "eos_id": self.eos_id, "unk_id": self.unk_id,
            "blank_id": self.blank_id, "mask_id": self.mask_id, "first_bin_id": self.first_bin_id,
            "inner_to_id": None if identity else self._inner_to_id.tolist(),
        }
        (d / "tokenizer_meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer written by `save`."""
        d = Path(directory)
        for name in ("tokenizer.json", "tokenizer_meta.json"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found: expected a folder written by Tokenizer.save")
        meta = json.loads((d / "tokenizer_meta.json").read_text())
        inner = HFTokenizer.from_file(str(d / "tokenizer.json"))
        table = meta["inner_to_id"]
        table = np.arange(inner.get_vocab_size(), dtype=np.int64) + len(SPECIALS) if table is None else table
        tok = cls(inner, np.asarray(table), num_bins=meta["num_bins"], num_codes=meta["num_codes"],
                  kind=meta["kind"], num_text=meta["num_text"])
        if tok.vocab_size != meta["vocab_size"] or tok.blank_id != meta["blank_id"]:
            raise ValueError(f"{d}: tokenizer_meta.json disagrees with the layout rebuilt from it")
        return tok

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind}, text={self.num_text}, bins={self.num_bins}, "
                f"vocab_size={self.vocab_size}, blank_id={self.blank_id})")
