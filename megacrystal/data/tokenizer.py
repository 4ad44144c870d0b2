"""SentencePiece BPE tokenizer with Crystal's 18 StarCoder special tokens appended after the base vocabulary."""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from megacrystal.data.errors import DataError

# Crystal added these with add_special_tokens in this order, so they take ids base+0 .. base+17 (crystal-spec §2).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>",
    "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
)
# 32000 + 18 rounded up to a multiple of 32 is Crystal's 32032 embedding rows.
DEFAULT_PAD_MULTIPLE = 32
SPACE = "\u2581"  # SentencePiece's visible space
# sentencepiece's BPE gets slower per byte as its input grows (its merge queue spans the whole text), so long
# documents are encoded in segments of about this many bytes, cut where no merge can cross: same ids, less time.
SEGMENT_BYTES = 256
# A cut goes before a space that follows neither a space nor a visible space: the text around it normalizes to
# "x▁", and a model without any piece containing a non-▁ character followed by ▁ never merges across it.
_CUT = {bytes: re.compile(rb"(?<! )(?<!\xe2\x96\x81) "), str: re.compile(f"(?<![ {SPACE}]) ")}
_CROSSES_CUT = re.compile(f"[^{SPACE}]{SPACE}")


def pad_to_multiple(n: int, multiple: int) -> int:
    """Round n up to a multiple of `multiple`."""
    if multiple <= 0:
        raise DataError(f"pad multiple must be positive, got {multiple}")
    return -(-n // multiple) * multiple


class CrystalTokenizer:
    """A SentencePiece model plus the StarCoder special tokens, usable as a megatron-core GPTDataset tokenizer."""

    def __init__(self, model_proto: bytes, padded_vocab_size: int | None = None, eos_id: int | None = None,
                 source: str = "<bytes>"):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.source = source
        self.base_vocab_size = self._sp.get_piece_size()
        self.num_tokens = self.base_vocab_size + len(SPECIAL_TOKENS)
        if padded_vocab_size is None:
            padded_vocab_size = pad_to_multiple(self.num_tokens, DEFAULT_PAD_MULTIPLE)
        if padded_vocab_size < self.num_tokens:
            raise DataError(
                f"padded_vocab_size {padded_vocab_size} is smaller than {self.num_tokens} (base vocabulary "
                f"{self.base_vocab_size} of {source} + {len(SPECIAL_TOKENS)} special tokens); set it to at least "
                f"{pad_to_multiple(self.num_tokens, DEFAULT_PAD_MULTIPLE)}")
        self.padded_vocab_size = padded_vocab_size
        self.eos_id = self._sp.eos_id() if eos_id is None else eos_id
        if not 0 <= self.eos_id < self.base_vocab_size:
            raise DataError(f"eos_id {self.eos_id} is not a token of {source} (base vocabulary "
                            f"{self.base_vocab_size}); pass eos_id explicitly")
        self.bos_id = self._sp.bos_id()
        self.special_ids = {tok: self.base_vocab_size + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self.special_ids.items()}
        # Computed once: megatron asks for unique_identifiers repeatedly and the proto can be ~0.5 MB.
        h = hashlib.sha256(self._proto)
        h.update(json.dumps([self.padded_vocab_size, self.eos_id, list(SPECIAL_TOKENS)]).encode())
        self._fingerprint = h.hexdigest()

    @classmethod
    def load(cls, model_path: str | os.PathLike, padded_vocab_size: int | None = None,
             eos_id: int | None = None) -> "CrystalTokenizer":
        """Load any SentencePiece `.model` (ours or a LLaMA one); padded size defaults to a multiple of 32."""
        path = Path(model_path)
        if not path.is_file():
            raise DataError(f"tokenizer model {path} not found; train one with `megacrystal prepare` "
                            f"or point tokenizer.model at a SentencePiece .model file")
        try:
            return cls(path.read_bytes(), padded_vocab_size, eos_id, source=str(path))
        except RuntimeError as e:  # sentencepiece's parse error is a bare RuntimeError
            raise DataError(f"tokenizer model {path} is not a SentencePiece model ({e}); "
                            f"point tokenizer.model at a .model file") from None

    # Pickled as the model bytes so worker processes need no shared file path.
    def __getstate__(self):
        return {"proto": self._proto, "padded": self.padded_vocab_size, "eos": self.eos_id, "source": self.source}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["padded"], state["eos"], state["source"])

    # --- megatron-core GPTDataset duck-typed interface ---
    @property
    def vocab_size(self) -> int:
        """Embedding rows (padded), which is what megatron sizes buffers and dtypes by."""
        return self.padded_vocab_size

    @property
    def eod(self) -> int:
        """End-of-document id (the EOS appended to every document)."""
        return self.eos_id

    @property
    def eos(self) -> int:
        """Alias of eos_id for megatron."""
        return self.eos_id

    @property
    def bos(self) -> int:
        """Alias of bos_id for megatron."""
        return self.bos_id

    @property
    def pad(self) -> int:
        """`<fim_pad>`: Crystal pads FIM samples with it and masks its loss (megatron masks labels equal to pad)."""
        return self.special_ids["<fim_pad>"]

    @property
    def unique_identifiers(self) -> dict:
        """What megatron hashes into its dataset cache keys."""
        return {"class": type(self).__name__, "fingerprint": self.fingerprint()}

    # --- encoding ---
    @property
    def fim_ids(self) -> dict[str, int]:
        """Ids of the FIM sentinels, keyed prefix/middle/suffix/pad."""
        return {k: self.special_ids[f"<fim_{k}>"] for k in ("prefix", "middle", "suffix", "pad")}

    def encode(self, text: str) -> list[int]:
        """Text to base-vocabulary ids; special-token strings in text stay plain text on purpose."""
        return self._sp.encode(text, out_type=int)

    def encode_documents(self, texts: Sequence[str | bytes], dtype,
                         segment: int = SEGMENT_BYTES) -> tuple[np.ndarray, np.ndarray]:
        """Encode a batch as documents (str, or UTF-8 bytes): one `dtype` array of every text's ids followed by
        EOS, and the lengths (EOS included). The ids equal `encode` of each whole text; a text longer than twice
        `segment` is encoded in segments where the model allows it (see SEGMENT_BYTES). sentencepiece's numpy
        output skips building a Python int per token."""
        if not texts:
            return np.zeros(0, dtype), np.zeros(0, np.int32)
        heads, rests, counts = _segments(texts, segment if self.segmented else math.inf)
        head_ids = self._sp.encode(heads, return_type="numpy", num_threads=1)
        rest_ids = iter(self._continuation.encode(rests, return_type="numpy", num_threads=1) if rests else ())
        eos = np.array([self.eos_id], np.int32)
        parts, lengths = [], np.empty(len(heads), np.int32)
        for i, (ids, count) in enumerate(zip(head_ids, counts)):
            parts.append(ids)
            size = ids.size + 1
            for ids in itertools.islice(rest_ids, count):
                parts.append(ids)
                size += ids.size
            parts.append(eos)
            lengths[i] = size
        return np.concatenate(parts, dtype=dtype, casting="unsafe"), lengths

    @functools.cached_property
    def _continuation(self) -> spm.SentencePieceProcessor | None:
        return _continuation_model(self._proto)  # built on first use: training loads a tokenizer but never needs it

    @property
    def segmented(self) -> bool:
        """Whether `encode_documents` may encode long documents in segments (see SEGMENT_BYTES)."""
        return self._continuation is not None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special ids become their strings, padding ids (unused rows) become nothing."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if 0 <= i < self.base_vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self._sp.decode(run))
                run = []
            if i in self._special_by_id:
                out.append(self._special_by_id[i])
            elif not self.num_tokens <= i < self.padded_vocab_size:
                raise DataError(f"token id {i} is outside the vocabulary [0, {self.padded_vocab_size}) of "
                                f"{self.source}; check that the data was prepared with this tokenizer")
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        """The piece or special-token string of one id."""
        if i in self._special_by_id:
            return self._special_by_id[i]
        if 0 <= i < self.base_vocab_size:
            return self._sp.id_to_piece(i)
        return f"<pad_{i}>"

    def fingerprint(self) -> str:
        """sha256 over the model bytes, padded size, EOS id and special tokens: equal means same token ids."""
        return self._fingerprint

    def __len__(self) -> int:
        return self.num_tokens


def _continuation_model(proto: bytes) -> spm.SentencePieceProcessor | None:
    """The model without its dummy prefix, which encodes the segments after a document's first; None where a cut
    could change the ids: a model that is not BPE, a normalizer that does more than escape single spaces (a
    character map, collapsed whitespace, whitespace as suffix), or a piece that a merge across a cut would make."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto.FromString(proto)
    norm, trainer = model.normalizer_spec, model.trainer_spec
    if (trainer.model_type != model_pb2.TrainerSpec.BPE or norm.precompiled_charsmap or
            norm.remove_extra_whitespaces or not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix or
            any(_CROSSES_CUT.search(p.piece) for p in model.pieces)):
        return None
    norm.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


def _segments(texts: Sequence[str | bytes], size: float) -> tuple[list, list, list[int]]:
    """Each text's first segment, every later segment in order, and how many later segments each text has."""
    heads, rests, counts = [], [], []
    for text in texts:
        before, start = len(rests), 0
        if len(text) > 2 * size:
            cut = _CUT[bytes if isinstance(text, bytes) else str]
            while len(text) - start > 2 * size and (m := cut.search(text, start + size)):
                (rests if start else heads).append(text[start:m.start()])
                start = m.start()
        (rests if start else heads).append(text[start:])
        counts.append(len(rests) - before)
    return heads, rests, counts


# LLaMA's SentencePiece settings: lossless (identity normalization, whitespace kept) so code round-trips.
_TRAINER_DEFAULTS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=0.9995,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, shuffle_input_sentence=False, minloglevel=2,
)


def _training_lines(text_files: Sequence[str | os.PathLike], text_field: str, max_line_bytes: int) -> Iterator[str]:
    """Non-empty lines of .txt files and of the text field of .jsonl files, in the given order."""
    for f in text_files:
        path = Path(f)
        with path.open(encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if path.suffix == ".jsonl":
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{path}:{lineno}: no string field '{text_field}'; fix the line or pass "
                                        f"the right text field") from None
                    pieces = text.split("\n")
                else:
                    pieces = [line.rstrip("\n")]
                for piece in pieces:
                    # sentencepiece drops over-long sentences with a warning; cutting keeps their start instead.
                    if piece.strip():
                        yield piece.encode("utf-8")[:max_line_bytes].decode("utf-8", errors="ignore")


def train_tokenizer(text_files: Sequence[str | os.PathLike], out_prefix: str | os.PathLike, vocab_size: int, *,
                    text_field: str = "text", max_sentences: int = 2_000_000, max_line_bytes: int = 4096,
                    seed: int = 45, num_threads: int = 1, **trainer_options) -> Path:
    """Train a deterministic SentencePiece BPE model (byte fallback) and write `<out_prefix>.model`."""
    if vocab_size < 300:
        raise DataError(f"vocab_size {vocab_size} too small: byte fallback alone takes 259 ids; use at least 300")
    # sentencepiece seeds its own RNG globally; fixing it plus one thread and no shuffling makes the model
    # bytes identical across runs.
    for f in text_files:
        if not Path(f).is_file():
            raise DataError(f"tokenizer training input {f} not found; build the corpus first or fix the path")
    spm.set_random_generator_seed(seed)
    input_errors: list[DataError] = []

    def lines() -> Iterator[str]:
        # sentencepiece wraps exceptions raised inside its iterator into a RuntimeError with a traceback
        # dump; stash ours so the user gets the one-line message.
        try:
            yield from itertools.islice(_training_lines(text_files, text_field, max_line_bytes), max_sentences)
        except DataError as e:
            input_errors.append(e)

    buf = io.BytesIO()
    options = dict(_TRAINER_DEFAULTS, vocab_size=vocab_size, input_sentence_size=max_sentences,
                   max_sentence_length=max_line_bytes, num_threads=num_threads, **trainer_options)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=buf, **options)
    except RuntimeError as e:
        if input_errors:
            raise input_errors[0] from None
        raise DataError(f"sentencepiece training for {out_prefix}.model failed ({e}); "
                        f"use more text or a smaller vocab_size") from None
    if input_errors:
        raise input_errors[0]
    out = Path(f"{out_prefix}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)  # atomic: a crash never leaves a half-written model that a later run would load
    return out
