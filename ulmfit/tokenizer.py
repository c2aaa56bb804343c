"""SentencePiece subword tokenizer over the normalisation rules (MultiFiT, Eisenschlos et al. 2019).

ULMFiT (Sec. 3) tokenises words with special tokens for case and repetition; MultiFiT showed a
15k unigram SentencePiece vocabulary does as well or better and works for any language. The
rule markers of :mod:`ulmfit.text` are registered as user-defined pieces, so each is one token.

The model is trained on a bounded reservoir sample of the corpus (the corpus is streamed once,
never held), and it is set up so that ``decode(encode(t)) == t`` for any text: identity
normalisation, no whitespace folding, no dummy prefix, and byte fallback for characters outside
the vocabulary (newlines and tabs become byte pieces).

Ids: ``unk = 0``, ``pad = 1``, then the markers; ``bos_id`` (``BOS_ID = 2``) is the id of
``xxbos``, which begins every encoded document.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated

import sentencepiece as spm

from ulmfit.config import NonNegativeInt, OneOf, PositiveInt, Range
from ulmfit.errors import InputError
from ulmfit.io import atomic_write, sha256_file
from ulmfit.text import BOS, MARKERS, denormalize, normalize

UNK_ID = 0
PAD_ID = 1
BOS_ID = 2  # xxbos, the first of MARKERS (user-defined symbols follow unk and pad)
MODEL_TYPES = ("unigram", "bpe")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """How the SentencePiece model is trained.

    vocab_size: pieces in the vocabulary, including unk, pad, the markers and 256 byte pieces.
    model_type: "unigram" (MultiFiT) or "bpe".
    sample_docs: size of the reservoir sample of documents the model is trained on.
    max_doc_chars: each sampled document is cut to this many characters (bounds the sample).
    character_coverage: share of characters covered by ordinary pieces; the rest use bytes.
    seed: seeds the reservoir sample (SentencePiece training itself is deterministic for a
        given ``threads``).
    max_sentence_chars: training lines are split to at most this length (SentencePiece skips
        longer ones).
    threads: SentencePiece training threads. The piece scores, and so the model's bytes and
        identity, depend on it (the same pieces, scores summed in another order), so the default
        is a fixed 2: the same tokenizer on every machine. 0 uses all cores, which is faster
        on many cores but ties the tokenizer (and every figure after it) to the core count.
    """

    # Below ~300 the markers and the 256 byte pieces leave no room for subwords.
    vocab_size: Annotated[int, Range(300)] = 15000
    model_type: Annotated[str, OneOf(MODEL_TYPES)] = "unigram"
    sample_docs: PositiveInt = 50_000
    max_doc_chars: PositiveInt = 20_000
    character_coverage: Annotated[float, Range(0, 1, open_low=True)] = 0.9999
    seed: NonNegativeInt = 42
    max_sentence_chars: PositiveInt = 4096
    threads: NonNegativeInt = 2


def _reservoir_sample(texts: Iterable[str], size: int, max_chars: int, seed: int) -> list[str]:
    """Uniform sample of ``size`` documents from a stream of unknown length (Vitter's algorithm R)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for seen, text in enumerate(texts):
        if seen < size:
            sample.append(text[:max_chars])
        else:
            slot = rng.randint(0, seen)
            if slot < size:
                sample[slot] = text[:max_chars]
    return sample


def _training_lines(sample: Sequence[str], max_chars: int) -> Iterable[str]:
    """Normalised documents split into lines SentencePiece accepts (no newlines, bounded)."""
    for text in sample:
        for line in normalize(text).split("\n"):
            while len(line) > max_chars:
                cut = line.rfind(" ", 0, max_chars)
                cut = max_chars if cut <= 0 else cut
                yield line[:cut]
                line = line[cut:]
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], out_path: str | Path, cfg: TokenizerConfig) -> Tokenizer:
    """Train on a reservoir sample of raw ``texts`` and write the model atomically to ``out_path``."""
    sample = _reservoir_sample(texts, cfg.sample_docs, cfg.max_doc_chars, cfg.seed)
    if not sample:
        raise ValueError("train_tokenizer got no texts")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines(sample, cfg.max_sentence_chars)),
        model_writer=model,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        character_coverage=cfg.character_coverage,
        user_defined_symbols=list(MARKERS),
        unk_id=UNK_ID,
        pad_id=PAD_ID,
        bos_id=-1,  # our document start is the xxbos marker, not SentencePiece's <s>
        eos_id=-1,
        unk_surface="\N{REPLACEMENT CHARACTER}",
        # Exact round trip: keep every character and every space as it is.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        split_digits=False,
        max_sentence_length=cfg.max_sentence_chars * 4 + 16,  # bytes
        input_sentence_size=0,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary, not an error
        shuffle_input_sentence=False,
        num_threads=cfg.threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    out_path = Path(out_path)
    with atomic_write(out_path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer.load(out_path)


class Tokenizer:
    """A trained SentencePiece model plus the normalisation rules.

    Pickling sends the model bytes (a few hundred kB), so worker processes rebuild it without
    touching the file system.
    """

    def __init__(self, model_proto: bytes, path: str | Path, identity: str) -> None:
        self.path = Path(path)
        self.identity = identity
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = PAD_ID
        self.unk_id: int = UNK_ID
        self.bos_id: int = self._sp.piece_to_id(BOS)
        if self._sp.pad_id() != PAD_ID or self.bos_id != BOS_ID:
            raise InputError(
                self.path,
                "this SentencePiece model was not made by ulmfit (pad id or xxbos piece differ)",
                fix="train the tokenizer with ulmfit.tokenizer.train_tokenizer",
            )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            proto = path.read_bytes()
        except OSError as err:
            raise InputError(
                path,
                f"cannot read tokenizer model ({err.strerror})",
                fix="re-run the train_tokenizer stage",
            ) from err
        try:
            return cls(proto, path, sha256_file(path))
        except (RuntimeError, OSError) as err:  # SentencePiece raises RuntimeError on bad protos
            raise InputError(
                path,
                "not a valid SentencePiece model",
                fix="re-run the train_tokenizer stage",
            ) from err

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "path": str(self.path), "identity": self.identity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["path"], state["identity"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, texts: Sequence[str], *, num_threads: int = 1) -> list[list[int]]:
        """Normalise and encode raw texts; every document begins with ``bos_id``."""
        return self._sp.encode([normalize(text) for text in texts], num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """The exact raw text of one encoded document (pads are dropped)."""
        ids = [int(i) for i in ids if int(i) != PAD_ID]
        return denormalize(self._sp.decode(ids))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The subword pieces of ``ids``, for display and debugging."""
        return [self._sp.id_to_piece(int(i)) for i in ids]
