"""Token files: corpora encoded once into Parquet, read back as flat arrays (ULMFiT Sec. 3.1-3.3).

All three ULMFiT phases read the same encoded corpora (Wikipedia for pretraining, the target
texts for LM fine-tuning and classification). A token file is Parquet with one row per document:
``ids: list<int32>`` and optionally ``label: int64``. Its schema metadata records the identity
(sha256) of the tokenizer that made it, so ids are never read with the wrong vocabulary.

:func:`encode_corpus` streams any number of texts through a pool of worker processes, a bounded
number of chunks at a time, and writes them in order as row groups: memory does not grow with the
corpus, and every core is used.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ulmfit.errors import InputError
from ulmfit.io import atomic_path
from ulmfit.tokenizer import Tokenizer

FORMAT_VERSION = "1"
_KEY_IDENTITY = b"ulmfit.tokenizer_identity"
_KEY_VOCAB = b"ulmfit.vocab_size"
_KEY_DOCS = b"ulmfit.num_docs"
_KEY_TOKENS = b"ulmfit.num_tokens"
_KEY_VERSION = b"ulmfit.format_version"
_FIX = "re-run the tokenize stage"


@dataclasses.dataclass
class TokenDocs:
    """Documents of token ids as one flat array plus offsets (no per-document Python objects).

    ids: int32 (total_tokens,); offsets: int64 (num_docs + 1,), document i is
    ``ids[offsets[i]:offsets[i + 1]]``; labels: int64 (num_docs,) or None.
    """

    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise ValueError("offsets must be 1-D and start at 0")
        if self.offsets[-1] != len(self.ids):
            raise ValueError(f"offsets end at {self.offsets[-1]} but there are {len(self.ids)} ids")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if len(self.labels) != len(self):
                raise ValueError(f"{len(self.labels)} labels for {len(self)} documents")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(len(self)):
            yield self[index]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document, int64 (num_docs,)."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_lists(
        cls, docs: Sequence[Sequence[int]], labels: Sequence[int] | None = None
    ) -> TokenDocs:
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=offsets[-1])
        return cls(ids, offsets, None if labels is None else np.asarray(labels, dtype=np.int64))

    def subset(self, indices: Sequence[int] | np.ndarray) -> TokenDocs:
        """The documents at ``indices``, in that order (copies the ids)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[indices]
        # Positions of every kept token: each document's start repeated, plus 0..len-1.
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        ids = self.ids[np.repeat(starts, lengths) + within]
        labels = None if self.labels is None else self.labels[indices]
        return TokenDocs(ids, offsets, labels)


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """What :func:`encode_corpus` did: documents, tokens and wall-clock seconds."""

    docs: int
    tokens: int
    seconds: float


def _schema(with_labels: bool, metadata: dict[bytes, bytes]) -> pa.Schema:
    fields = [pa.field("ids", pa.list_(pa.int32()), nullable=False)]
    if with_labels:
        fields.append(pa.field("label", pa.int64(), nullable=False))
    return pa.schema(fields, metadata=metadata)


class TokenFileWriter:
    """Streams documents into a token file, one row group per :meth:`write`, atomically.

    Use as a context manager; the file appears at ``path`` only when the block succeeds, with
    the document and token counts added to its metadata.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer_identity: str,
        vocab_size: int,
        with_labels: bool = False,
        compression: str = "zstd",
    ) -> None:
        self.path = Path(path)
        self.with_labels = with_labels
        self._metadata = {
            _KEY_IDENTITY: tokenizer_identity.encode(),
            _KEY_VOCAB: str(int(vocab_size)).encode(),
            _KEY_VERSION: FORMAT_VERSION.encode(),
        }
        self._compression = compression
        self.num_docs = 0
        self.num_tokens = 0
        self._atomic = None
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> TokenFileWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(
            tmp, _schema(self.with_labels, self._metadata), compression=self._compression
        )
        return self

    def write_flat(self, ids: np.ndarray, offsets: np.ndarray, labels: np.ndarray | None) -> None:
        """Append documents given as flat int32 ids and (n+1,) offsets starting at 0."""
        assert self._writer is not None, "use TokenFileWriter as a context manager"
        if (labels is not None) != self.with_labels:
            raise ValueError("labels must be given exactly when the writer has with_labels=True")
        if len(offsets) <= 1:
            return
        # list<int32> has int32 offsets; one row group holds far fewer than 2**31 tokens.
        lists = pa.ListArray.from_arrays(
            pa.array(np.asarray(offsets, dtype=np.int32)),
            pa.array(np.asarray(ids, dtype=np.int32)),
        )
        columns = [lists]
        if labels is not None:
            columns.append(pa.array(np.asarray(labels, dtype=np.int64)))
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._writer.schema))
        self.num_docs += len(offsets) - 1
        self.num_tokens += int(offsets[-1])

    def write(self, docs: TokenDocs) -> None:
        self.write_flat(docs.ids, docs.offsets, docs.labels)

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._writer is not None and self._atomic is not None
        try:
            if exc_type is None:
                self._writer.add_key_value_metadata(
                    {
                        _KEY_DOCS.decode(): str(self.num_docs),
                        _KEY_TOKENS.decode(): str(self.num_tokens),
                    }
                )
            self._writer.close()
        finally:
            self._atomic.__exit__(exc_type, exc, tb)


def write_tokens(
    path: str | Path, docs: TokenDocs, tokenizer_identity: str, vocab_size: int
) -> None:
    """Write ``docs`` to a token file atomically (row groups of at most 2**20 documents)."""
    with TokenFileWriter(
        path,
        tokenizer_identity=tokenizer_identity,
        vocab_size=vocab_size,
        with_labels=docs.labels is not None,
    ) as writer:
        step = 1 << 20
        if len(docs) == 0:
            return
        for start in range(0, len(docs), step):
            stop = min(start + step, len(docs))
            offsets = docs.offsets[start : stop + 1]
            writer.write_flat(
                docs.ids[offsets[0] : offsets[-1]],
                offsets - offsets[0],
                None if docs.labels is None else docs.labels[start:stop],
            )


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``ulmfit.*`` metadata of a token file (identity, vocab size, counts, version)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "token file not found", fix=_FIX)
    try:
        # File-level key-value metadata: the schema's keys plus the counts added at close.
        metadata = pq.read_metadata(path).metadata or {}
    except (pa.ArrowException, OSError) as err:
        raise InputError(path, f"not a readable Parquet token file ({err})", fix=_FIX) from err
    found = {
        k.decode()[len("ulmfit.") :]: v.decode()
        for k, v in metadata.items()
        if k.startswith(b"ulmfit.")
    }
    if found.get("format_version") != FORMAT_VERSION or "tokenizer_identity" not in found:
        raise InputError(
            path,
            f"not a ulmfit token file of format {FORMAT_VERSION} "
            f"(found version {found.get('format_version')!r})",
            fix=_FIX,
        )
    return found


def read_tokens(path: str | Path, tokenizer: Tokenizer | None = None) -> TokenDocs:
    """Read a token file; with ``tokenizer``, check that it made the file.

    The ids are taken from the Arrow list array's value buffer without a copy when the file
    holds one row group, and concatenated once otherwise.
    """
    path = Path(path)
    metadata = read_metadata(path)
    if tokenizer is not None and metadata["tokenizer_identity"] != tokenizer.identity:
        raise InputError(
            path,
            f"made by tokenizer {metadata['tokenizer_identity'][:12]}, not by {tokenizer.path} "
            f"({tokenizer.identity[:12]})",
            fix=f"{_FIX} with this tokenizer",
        )
    try:
        table = pq.read_table(path)
        column = table.column("ids")
        has_labels = "label" in table.column_names
        labels = table.column("label").to_numpy() if has_labels else None
    except (pa.ArrowException, OSError, KeyError) as err:
        raise InputError(path, f"corrupt token file ({err})", fix=_FIX) from err
    values: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for chunk in column.chunks:
        chunk_offsets = chunk.offsets.to_numpy()
        values.append(
            chunk.values.to_numpy(zero_copy_only=True)[chunk_offsets[0] : chunk_offsets[-1]]
        )
        lengths.append(np.diff(chunk_offsets))
    ids = values[0] if len(values) == 1 else np.concatenate(values or [np.zeros(0, np.int32)])
    offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    if int(metadata.get("num_docs", len(offsets) - 1)) != len(offsets) - 1:
        raise InputError(path, "document count differs from its metadata", fix=_FIX)
    return TokenDocs(ids, offsets, labels)


# ---- encoding a corpus with worker processes -------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    # Runs once per worker: the tokenizer arrives pickled (model bytes), no file is re-read.
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode one chunk; flat arrays pickle far faster than lists of lists."""
    assert _worker_tokenizer is not None
    return _flatten(_worker_tokenizer.encode(texts))


def _flatten(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(doc) for doc in encoded], out=offsets[1:])
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=offsets[-1])
    return ids, offsets


def _chunks(
    texts: Iterable[str], labels: Iterable[int] | None, chunk_docs: int, chunk_chars: int
) -> Iterator[tuple[list[str], list[int] | None]]:
    label_iter = iter(labels) if labels is not None else None
    chunk: list[str] = []
    chunk_labels: list[int] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"encode_corpus expects str texts, got {type(text).__name__}")
        chunk.append(text)
        size += len(text)
        if label_iter is not None:
            try:
                chunk_labels.append(int(next(label_iter)))
            except StopIteration:
                raise ValueError("fewer labels than texts") from None
        if len(chunk) >= chunk_docs or size >= chunk_chars:
            yield chunk, (chunk_labels if label_iter is not None else None)
            chunk, chunk_labels, size = [], [], 0
    if label_iter is not None and next(label_iter, None) is not None:
        raise ValueError("more labels than texts")
    if chunk:
        yield chunk, (chunk_labels if label_iter is not None else None)


def _pool_context(start_method: str | None) -> multiprocessing.context.BaseContext:
    if start_method is None:
        available = multiprocessing.get_all_start_methods()
        start_method = "forkserver" if "forkserver" in available else "spawn"
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload([__name__])
    return context


def encode_corpus(
    texts: Iterable[str],
    tokenizer_path: str | Path,
    out_path: str | Path,
    *,
    labels: Iterable[int] | None = None,
    workers: int | None = None,
    chunk_docs: int = 256,
    chunk_chars: int = 1 << 21,
    max_chunks_in_flight: int | None = None,
    progress: Callable[[int], None] | None = None,
    start_method: str | None = None,
) -> EncodeStats:
    """Normalise and encode ``texts`` into the token file ``out_path`` with bounded memory.

    Texts are read lazily in chunks (``chunk_docs`` documents or ``chunk_chars`` characters,
    whichever comes first); at most ``max_chunks_in_flight`` (default ``2 * workers``) chunks are
    in the pool at once, and results are written in input order as Parquet row groups. Memory
    therefore depends on the chunk size, not on the corpus. ``workers`` defaults to all cores;
    ``workers=1`` (or a corpus of a single chunk) encodes in this process. ``progress`` receives
    the number of documents done.
    ``labels``, if given, is consumed in step with ``texts``.

    Workers are started with ``start_method`` (default: "forkserver" where the platform has it,
    else "spawn"); both are safe in a parent that runs threads (Prefect, MLflow), unlike "fork".
    The fork server imports this module once, so later pools start in milliseconds.
    """
    started = time.perf_counter()
    tokenizer = Tokenizer.load(tokenizer_path)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    in_flight_limit = max_chunks_in_flight or 2 * workers
    chunks = _chunks(texts, labels, chunk_docs, chunk_chars)
    with TokenFileWriter(
        out_path,
        tokenizer_identity=tokenizer.identity,
        vocab_size=tokenizer.vocab_size,
        with_labels=labels is not None,
    ) as writer:

        def write(result: tuple[np.ndarray, np.ndarray], chunk_labels: list[int] | None) -> None:
            ids, offsets = result
            writer.write_flat(
                ids, offsets, None if chunk_labels is None else np.array(chunk_labels)
            )
            if progress is not None:
                progress(writer.num_docs)

        # A corpus of one chunk (a small valid or test split) is not worth starting a pool for.
        head = list(itertools.islice(chunks, 2))
        chunks = itertools.chain(head, chunks)
        if workers == 1 or len(head) < 2:
            for chunk, chunk_labels in chunks:
                write(_flatten(tokenizer.encode(chunk)), chunk_labels)
        else:
            context = _pool_context(start_method)
            with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
                pending: collections.deque = collections.deque()
                for chunk, chunk_labels in chunks:
                    pending.append((pool.apply_async(_encode_chunk, (chunk,)), chunk_labels))
                    if len(pending) >= in_flight_limit:
                        result, result_labels = pending.popleft()
                        write(result.get(), result_labels)
                while pending:
                    result, result_labels = pending.popleft()
                    write(result.get(), result_labels)
        docs, tokens = writer.num_docs, writer.num_tokens
    return EncodeStats(docs=docs, tokens=tokens, seconds=time.perf_counter() - started)
