"""Batches for the language model and the classifier (ULMFiT Sec. 3.1-3.3; AWD-LSTM Sec. 4.1).

Language model (:class:`LMStream`): each epoch the documents are shuffled (seed derived from
``(seed, epoch)``), joined into one token stream (every document starts with ``xxbos``) and cut
into ``batch_size`` contiguous streams, read ``seq_len`` tokens at a time so the hidden state
carries over between batches. ``seq_len`` varies as in AWD-LSTM (Merity et al. 2018, Sec. 4.1):
``bptt`` with probability 0.95, else ``bptt / 2``, then drawn from N(that, 5), at least 5; the
learning rate is rescaled by :func:`bptt_lr_scale`. The backward LM reads the same stream
reversed. The seq_len schedule and the document order are pure functions of ``(seed, epoch)``,
so a run resumed from :meth:`LMStream.state_dict` sees exactly the batches it would have seen.

Classifier (:class:`ClassifierBatches`): documents of similar length are batched together (shuffle,
cut into megabatches of ~100 batches, sort each by a jittered length, split, shuffle the
batches), so little compute is spent on padding while batch membership still changes from epoch
to epoch; ``index`` gives each row's position in the input so predictions can be put back in
order. A classifier reads each document closed by the boundary token (:func:`classifier_input`).

With ``world_size > 1`` (DDP) every rank builds the same *global* batch and keeps its slice of
rows, so the ranks together see exactly what a single process with the same ``batch_size`` sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from ulmfit.storage import TokenDocs
from ulmfit.tokenizer import BOS_ID

_DOC_ORDER, _SEQ_LENS, _BATCH_ORDER, _LENGTH_JITTER = 0, 1, 2, 3  # random streams per (seed, epoch)


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


CLOSING_TOKENS = 1  # what classifier_input adds to a document's length


def classifier_input(doc: np.ndarray, backward: bool = False) -> np.ndarray:
    """What a classifier reads of ``doc``: the document followed by the boundary token
    ``xxbos``, reversed for a backward classifier, so ``xxbos ... xxbos`` either way.

    The LM's stream puts ``xxbos`` between documents, so both LMs have read every document up
    to a boundary, and the state there has just read all of it. A classifier's last step
    (``h_last`` of concat pooling) sits on that boundary too, in either direction. Without it
    the forward classifier ended on the document's last word and the backward one on ``xxbos``
    (a reversed document's last token), and the forward one was much the weaker (docs/model.md,
    "What the classifier reads").
    """
    framed = np.append(doc, BOS_ID)
    return framed[::-1] if backward else framed


def bptt_lr_scale(seq_len: int, bptt: int) -> float:
    """Learning-rate factor for a batch of ``seq_len`` tokens (AWD-LSTM: lr * seq_len / bptt)."""
    return seq_len / bptt


def variable_seq_lens(
    total: int, bptt: int, *, seed: int, epoch: int, variable: bool = True, max_extra: int = 20
) -> np.ndarray:
    """The seq_len of each batch covering ``total`` positions, a pure function of (seed, epoch).

    AWD-LSTM: base = bptt with p=0.95, else bptt/2; seq_len = int(N(base, 5)), at least 5 and at
    most ``bptt + max_extra`` (bounds memory); the last batch takes what is left.
    """
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    if not variable:
        lens = np.full(-(-total // bptt), bptt, dtype=np.int64)
    else:
        rng = _rng(seed, epoch, _SEQ_LENS)
        # Draw in blocks: enough for the whole epoch on average, more if needed.
        parts, covered = [], 0
        while covered < total:
            count = max(16, 2 * (total - covered) // max(1, bptt // 2))
            base = np.where(rng.random(count) < 0.95, bptt, bptt / 2)
            block = np.clip(rng.normal(base, 5).astype(np.int64), 5, bptt + max_extra)
            parts.append(block)
            covered += int(block.sum())
        lens = np.concatenate(parts)
    ends = np.cumsum(lens)
    count = int(np.searchsorted(ends, total)) + 1
    lens = lens[:count].copy()
    lens[-1] -= int(ends[count - 1]) - total
    return lens


class LMBatch(NamedTuple):
    x: torch.Tensor  # (B, T) int64 inputs
    y: torch.Tensor  # (B, T) int64 next-token targets
    seq_len: int


class _ResumableBatches:
    """Iteration shared by both batch sources: from ``position`` to the end of the epoch.

    Subclasses provide ``__len__``, ``batch(index)`` and a ``position`` attribute.
    """

    position: int

    def __iter__(self) -> Iterator:
        if self.position >= len(self):
            self.position = 0  # a finished epoch read again starts over
        while self.position < len(self):
            index = self.position
            # Advance first: a state_dict taken while the caller works on this batch resumes
            # at the next one.
            self.position += 1
            yield self.batch(index)


class LMStream(_ResumableBatches):
    """Contiguous language-model batches over a corpus, resumable and DDP-sliced.

    Iterating yields :class:`LMBatch` for the current epoch from the current position. Call
    :meth:`set_epoch` before each epoch: a new epoch starts at its first batch, while the epoch
    already current (for example one just restored by :meth:`load_state_dict`) keeps its
    position. Iterating an epoch that has been read to its end starts it again.
    """

    def __init__(
        self,
        docs: TokenDocs,
        batch_size: int,
        bptt: int,
        *,
        backward: bool = False,
        variable_bptt: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_extra: int = 20,
    ) -> None:
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by world_size {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.docs = docs
        self.batch_size = batch_size
        self.bptt = bptt
        self.backward = backward
        self.variable_bptt = variable_bptt
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_extra = max_extra
        self.total_tokens = docs.num_tokens
        # Each of the batch_size streams holds stream_len tokens; the last few tokens of the
        # (shuffled) corpus that do not fill a stream are left out that epoch.
        self.stream_len = self.total_tokens // batch_size
        if self.stream_len < 2:
            raise ValueError(
                f"{self.total_tokens} tokens are too few for {batch_size} streams "
                "(each needs at least 2 tokens)"
            )
        rows = batch_size // world_size
        self._rows = np.arange(rank * rows, (rank + 1) * rows)
        self.epoch = -1
        self.position = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.position = 0
        order = _rng(self.seed, epoch, _DOC_ORDER).permutation(len(self.docs))
        lengths = self.docs.lengths[order]
        self._order = order
        self._order_starts = np.concatenate([[0], np.cumsum(lengths)])  # stream start per doc
        self._seq_lens = variable_seq_lens(
            self.stream_len - 1,
            self.bptt,
            seed=self.seed,
            epoch=epoch,
            variable=self.variable_bptt,
            max_extra=self.max_extra,
        )
        self._batch_starts = np.concatenate([[0], np.cumsum(self._seq_lens)])

    def __len__(self) -> int:
        """Batches in the current epoch (exact: the seq_len schedule is drawn in advance)."""
        return len(self._seq_lens)

    @property
    def seq_lens(self) -> np.ndarray:
        """The seq_len of every batch of the current epoch."""
        return self._seq_lens

    def _forward_tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of this epoch's forward stream (documents in shuffled order)."""
        first = int(np.searchsorted(self._order_starts, start, side="right")) - 1
        pieces, position, doc = [], start, first
        while position < stop:
            doc_id = self._order[doc]
            offset = position - self._order_starts[doc]
            begin = self.docs.offsets[doc_id] + offset
            take = min(stop - position, self._order_starts[doc + 1] - position)
            pieces.append(self.docs.ids[begin : begin + take])
            position += take
            doc += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _stream_tokens(self, start: int, stop: int) -> np.ndarray:
        if not self.backward:
            return self._forward_tokens(start, stop)
        # Backward: the whole forward stream reversed (documents reversed and in reverse order).
        total = self.total_tokens
        return self._forward_tokens(total - stop, total - start)[::-1]

    def batch(self, index: int) -> LMBatch:
        """Batch ``index`` of the current epoch (this rank's rows)."""
        seq_len = int(self._seq_lens[index])
        offset = int(self._batch_starts[index])
        window = np.empty((len(self._rows), seq_len + 1), dtype=np.int64)
        for row_index, row in enumerate(self._rows):
            start = row * self.stream_len + offset
            window[row_index] = self._stream_tokens(start, start + seq_len + 1)
        tokens = torch.from_numpy(window)
        return LMBatch(x=tokens[:, :-1], y=tokens[:, 1:], seq_len=seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "bptt": self.bptt,
            "backward": self.backward,
            "total_tokens": self.total_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "bptt", "backward", "total_tokens"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"LMStream state has {key}={state[key]!r} but this stream has "
                    f"{getattr(self, key)!r}: it was saved for other data or settings"
                )
        self.set_epoch(int(state["epoch"]))
        self.position = int(state["position"])


class ClsBatch(NamedTuple):
    tokens: torch.Tensor  # (B, T) int64, right-padded with pad_id
    lengths: torch.Tensor  # (B,) int64
    labels: torch.Tensor  # (B,) int64 (-1 when the documents have no labels)
    index: torch.Tensor  # (B,) int64 position of each row in the input documents


class ClassifierBatches(_ResumableBatches):
    """Length-bucketed, right-padded classifier batches; resumable and DDP-sliced.

    Training (``shuffle=True``): per epoch, shuffle, cut into megabatches of
    ``megabatch_batches`` batches, sort each by length (longest first), split into batches and
    shuffle the batches. fastai uses 50; 100 cuts the padding on 5,000 IMDb reviews from 7% to
    4% of tokens at batch 64, while each batch still comes from a random set of 6,400
    documents. The sort key is the log length plus uniform noise of +-``length_jitter``, so
    documents within about that fraction of each other's length trade places: without it a
    corpus smaller than one megabatch (6,400 documents at batch 64) would be cut into the same
    batches every epoch, only in another order. A last batch of a single document is merged
    into the batch before it (batch norm cannot normalise one row). Evaluation
    (``shuffle=False``): all documents sorted by length, longest first, no randomness.
    Each row is :func:`classifier_input` of its document (``backward`` reverses it), one token
    longer than the document. Epoch handling is as in :class:`LMStream`. With
    ``world_size > 1`` each rank keeps an even share of every batch's rows; batches with fewer
    documents than ranks are left out so every rank has work.
    """

    def __init__(
        self,
        docs: TokenDocs,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        backward: bool = False,
        pad_id: int = 1,
        rank: int = 0,
        world_size: int = 1,
        megabatch_batches: int = 100,
        length_jitter: float = 0.03,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.docs = docs
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.backward = backward
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.megabatch_batches = megabatch_batches
        self.length_jitter = length_jitter
        self._lengths = docs.lengths + CLOSING_TOKENS  # the rows classifier_input makes
        self.epoch = -1
        self.position = 0
        self.set_epoch(0)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """The document indices of every global batch of ``epoch``."""
        n, size = len(self.docs), self.batch_size
        if not self.shuffle:
            order = np.argsort(-self._lengths, kind="stable")
            return [order[i : i + size] for i in range(0, n, size)]
        order = _rng(self.seed, epoch, _DOC_ORDER).permutation(n)
        jitter = _rng(self.seed, epoch, _LENGTH_JITTER).uniform(
            -self.length_jitter, self.length_jitter, n
        )
        keys = np.log(np.maximum(self._lengths, 1)) + jitter  # (n,) in input order
        mega = size * self.megabatch_batches
        starts = list(range(0, n, mega))
        if len(starts) > 1 and n - starts[-1] < size:
            starts.pop()  # a last megabatch smaller than one batch joins the one before it
        batches = []
        for start, stop in zip(starts, [*starts[1:], n], strict=True):
            chunk = order[start:stop]
            chunk = chunk[np.argsort(-keys[chunk], kind="stable")]
            cut = [chunk[i : i + size] for i in range(0, len(chunk), size)]
            if len(cut) > 1 and len(cut[-1]) == 1:  # no batch of one: batch norm needs two rows
                cut[-2:] = [np.concatenate(cut[-2:])]
            batches.extend(cut)
        shuffled = _rng(self.seed, epoch, _BATCH_ORDER).permutation(len(batches))
        return [batches[i] for i in shuffled]

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.position = 0
        plan = self._plan(epoch)
        if self.world_size > 1:
            plan = [
                np.array_split(b, self.world_size)[self.rank]
                for b in plan
                if len(b) >= self.world_size
            ]
        self._batches = plan

    def __len__(self) -> int:
        return len(self._batches)

    def padding_fraction(self) -> float:
        """Share of pad tokens in this epoch's batches (this rank's rows)."""
        padded = real = 0
        for rows in self._batches:
            lengths = self._lengths[rows]
            padded += int(lengths.max(initial=0)) * len(rows)
            real += int(lengths.sum())
        return 1 - real / padded if padded else 0.0

    def batch(self, index: int) -> ClsBatch:
        rows = self._batches[index]
        lengths = self._lengths[rows]
        tokens = np.full((len(rows), int(lengths.max(initial=0))), self.pad_id, dtype=np.int64)
        for row_index, doc_index in enumerate(rows):
            framed = classifier_input(self.docs[doc_index], self.backward)
            tokens[row_index, : len(framed)] = framed
        labels = (
            self.docs.labels[rows]
            if self.docs.labels is not None
            else np.full(len(rows), -1, dtype=np.int64)
        )
        return ClsBatch(
            tokens=torch.from_numpy(tokens),
            lengths=torch.from_numpy(lengths.astype(np.int64)),
            labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
            index=torch.from_numpy(rows.astype(np.int64)),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "num_docs": len(self.docs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("seed", self.seed),
            ("batch_size", self.batch_size),
            ("shuffle", self.shuffle),
            ("num_docs", len(self.docs)),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"ClassifierBatches state has {key}={state[key]!r} but these batches have "
                    f"{mine!r}: it was saved for other data or settings"
                )
        self.set_epoch(int(state["epoch"]))
        self.position = int(state["position"])
