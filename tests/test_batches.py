"""LM streams and classifier batches: contiguity, reversal, seq_len law, resume, DDP slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ulmfit.batches import (
    ClassifierBatches,
    LMStream,
    bptt_lr_scale,
    classifier_input,
    variable_seq_lens,
)
from ulmfit.storage import TokenDocs

BOS = 2


def make_docs(num_docs: int, seed: int = 0, mean_log: float = 3.0, labels: bool = True):
    """Documents whose tokens are unique running numbers (so positions can be checked)."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(mean_log, 0.6, num_docs).astype(int))
    docs, next_id = [], 10
    for length in lengths:
        docs.append([BOS, *range(next_id, next_id + length - 1)])
        next_id += length - 1
    return TokenDocs.from_lists(docs, labels=rng.integers(0, 3, num_docs) if labels else None)


def epoch_stream(stream: LMStream) -> np.ndarray:
    """The (B, N) token matrix the epoch's batches were read from (rows are streams)."""
    xs = [b.x for b in stream]
    ys = [b.y for b in stream]
    x = torch.cat(xs, dim=1)
    assert torch.equal(x[:, 1:], torch.cat(ys, dim=1)[:, :-1])  # y is x shifted by one
    return torch.cat([x, ys[-1][:, -1:]], dim=1).numpy()


def test_lm_streams_are_contiguous_documents_in_shuffled_order() -> None:
    docs = make_docs(60)
    stream = LMStream(docs, batch_size=4, bptt=10, seed=3)
    flat = epoch_stream(stream).reshape(-1)  # rows are consecutive parts of one stream
    assert len(flat) == (docs.num_tokens // 4) * 4
    # Cut at xxbos: every piece is one whole document (the last may be cut short).
    starts = np.flatnonzero(flat == BOS)
    assert starts[0] == 0
    pieces = np.split(flat, starts[1:])
    doc_by_first_token = {int(d[1]): i for i, d in enumerate(docs) if len(d) > 1}
    order = []
    for piece in pieces:
        if len(piece) > 1:
            doc = docs[doc_by_first_token[int(piece[1])]]
            assert np.array_equal(piece, doc[: len(piece)])
            order.append(doc_by_first_token[int(piece[1])])
    assert len(set(order)) == len(order)  # no document twice
    assert order != sorted(order)  # shuffled


def test_lm_order_and_seq_lens_depend_only_on_seed_and_epoch() -> None:
    docs = make_docs(40)
    a = LMStream(docs, batch_size=2, bptt=12, seed=7)
    b = LMStream(docs, batch_size=2, bptt=12, seed=7)
    assert np.array_equal(epoch_stream(a), epoch_stream(b))
    a.set_epoch(1)
    b.set_epoch(1)
    assert np.array_equal(a.seq_lens, b.seq_lens)
    first_epoch = LMStream(docs, batch_size=2, bptt=12, seed=7)
    assert not np.array_equal(epoch_stream(first_epoch), epoch_stream(a))


def test_backward_stream_is_the_forward_stream_reversed() -> None:
    docs = make_docs(30)
    forward = LMStream(docs, batch_size=1, bptt=9, seed=1)
    backward = LMStream(docs, batch_size=1, bptt=9, seed=1, backward=True)
    assert np.array_equal(epoch_stream(backward)[0], epoch_stream(forward)[0][::-1])


def test_variable_seq_len_distribution() -> None:
    lens = variable_seq_lens(700_000, 70, seed=0, epoch=0)
    assert lens.sum() == 700_000
    body = lens[:-1]
    assert body.min() >= 5 and body.max() <= 90
    near_full = np.abs(body - 70) <= 15
    near_half = np.abs(body - 35) <= 15
    assert 0.93 < near_full.mean() < 0.97 and 0.03 < near_half.mean() < 0.07
    # int() truncates as in AWD-LSTM, so the mean sits half a token below bptt
    assert abs(body[near_full].mean() - 69.5) < 0.3 and 4 < body[near_full].std() < 6
    fixed = variable_seq_lens(100, 30, seed=0, epoch=0, variable=False)
    assert fixed.tolist() == [30, 30, 30, 10]
    assert bptt_lr_scale(35, 70) == 0.5


def test_lm_resume_yields_identical_remaining_batches() -> None:
    docs = make_docs(50)
    stream = LMStream(docs, batch_size=4, bptt=8, seed=5)
    stream.set_epoch(2)
    seen = []
    for batch in stream:
        seen.append(batch)
        if len(seen) == 3:
            state = stream.state_dict()
            break
    rest = list(stream)  # continues from batch 4 to the end
    resumed = LMStream(docs, batch_size=4, bptt=8, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the current epoch keeps its position
    again = list(resumed)
    assert len(again) == len(rest) == len(stream) - 3
    for a, b in zip(rest, again, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.seq_len == b.seq_len
    other = LMStream(docs, batch_size=2, bptt=8, seed=5)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


@pytest.mark.parametrize("backward", [False, True])
def test_lm_ddp_slices_concatenate_to_the_single_process_batch(backward: bool) -> None:
    docs = make_docs(50)
    single = list(LMStream(docs, batch_size=4, bptt=8, seed=2, backward=backward))
    ranks = [
        list(LMStream(docs, 4, 8, seed=2, backward=backward, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, part0, part1 in zip(single, *ranks, strict=True):
        assert part0.seq_len == part1.seq_len == whole.seq_len
        assert torch.equal(torch.cat([part0.x, part1.x]), whole.x)
        assert torch.equal(torch.cat([part0.y, part1.y]), whole.y)


def test_classifier_each_doc_once_per_epoch_and_index_restores_order() -> None:
    docs = make_docs(230, seed=4)
    batches = ClassifierBatches(docs, batch_size=16, seed=1)
    for epoch in range(2):
        batches.set_epoch(epoch)
        seen = []
        for batch in batches:
            assert batch.tokens.shape == (len(batch.index), int(batch.lengths.max()))
            for row, doc_index in enumerate(batch.index.tolist()):
                length = int(batch.lengths[row])
                expected = classifier_input(docs[doc_index])
                assert batch.tokens[row, :length].tolist() == expected.tolist()
                assert (batch.tokens[row, length:] == 1).all()
                assert int(batch.labels[row]) == int(docs.labels[doc_index])
            seen.extend(batch.index.tolist())
        assert sorted(seen) == list(range(len(docs)))
    # eval mode: longest first, deterministic; scores put back in input order via index
    evaluation = ClassifierBatches(docs, batch_size=16, shuffle=False)
    lengths = torch.cat([b.lengths for b in evaluation])
    assert torch.all(lengths[:-1] >= lengths[1:])
    scores = torch.zeros(len(docs))
    for batch in evaluation:
        scores[batch.index] = batch.tokens[:, 1].float()  # a per-document "prediction"
    expected = torch.tensor([float(d[1]) if len(d) > 1 else float(BOS) for d in docs])
    assert torch.equal(scores, expected)


@pytest.mark.parametrize("num_docs, batch_size, megabatch", [(17, 8, 100), (25, 8, 1), (65, 4, 4)])
def test_classifier_training_never_yields_a_batch_of_one(num_docs, batch_size, megabatch) -> None:
    # 17 documents at batch 8 used to end with a batch of one, which batch norm cannot
    # normalise in training mode; 25 at megabatch 1 left a last megabatch of one document.
    docs = make_docs(num_docs, seed=5)
    batches = ClassifierBatches(docs, batch_size, seed=0, megabatch_batches=megabatch)
    for epoch in range(3):
        batches.set_epoch(epoch)
        sizes = [len(b.index) for b in batches]
        assert min(sizes) >= 2 and sum(sizes) == num_docs


def test_classifier_batch_membership_changes_between_epochs_on_a_small_corpus() -> None:
    # 1,000 IMDb-like reviews fit in one megabatch: sorted by exact length, the batches
    # were cut the same way every epoch (a third of them identical even with ties broken at
    # random). The jittered sort changes them while keeping each batch's lengths close.
    rng = np.random.default_rng(1)
    lengths = np.maximum(10, rng.lognormal(np.log(250), 0.63, 1000).astype(int))
    docs = TokenDocs(np.zeros(lengths.sum(), np.int32), np.concatenate([[0], np.cumsum(lengths)]))

    def shared_batches(batches: ClassifierBatches) -> int:
        memberships = []
        for epoch in range(2):
            batches.set_epoch(epoch)
            memberships.append({frozenset(b.index.tolist()) for b in batches})
        return len(memberships[0] & memberships[1])

    exact = ClassifierBatches(docs, batch_size=32, seed=0, length_jitter=0.0)
    jittered = ClassifierBatches(docs, batch_size=32, seed=0)
    assert shared_batches(exact) >= 32 // 3
    assert shared_batches(jittered) <= 32 // 10
    assert jittered.padding_fraction() < exact.padding_fraction() + 0.02


def test_classifier_backward_reverses_each_document() -> None:
    docs = make_docs(20, labels=False)
    batch = next(iter(ClassifierBatches(docs, batch_size=8, backward=True, shuffle=False)))
    for row, doc_index in enumerate(batch.index.tolist()):
        length = int(batch.lengths[row])
        expected = classifier_input(docs[doc_index], backward=True)
        assert batch.tokens[row, :length].tolist() == expected.tolist()
    assert (batch.labels == -1).all()


def test_a_classifier_reads_each_document_between_two_boundaries() -> None:
    # The LM's stream puts xxbos (2) between documents; a classifier's last step sits on one.
    assert classifier_input(np.array([2, 7, 8, 9])).tolist() == [2, 7, 8, 9, 2]
    assert classifier_input(np.array([2, 7, 8, 9]), backward=True).tolist() == [2, 9, 8, 7, 2]
    docs = make_docs(9, seed=3)
    for backward in (False, True):
        batch = next(iter(ClassifierBatches(docs, 16, shuffle=False, backward=backward)))
        assert batch.lengths.tolist() == [len(docs[i]) + 1 for i in batch.index.tolist()]
        last = batch.tokens.gather(1, (batch.lengths - 1)[:, None])
        assert (last == 2).all() and (batch.tokens[:, 0] == 2).all()


def test_classifier_padding_fraction_on_imdb_like_lengths() -> None:
    # IMDb reviews under a 15k unigram vocabulary: median ~250 tokens, log-length sd ~0.63
    # (measured on 5,000 reviews of aclImdb/train), i.e. a lognormal with a long right tail.
    rng = np.random.default_rng(0)
    lengths = np.maximum(10, rng.lognormal(np.log(250), 0.63, 25_000).astype(int))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    docs = TokenDocs(np.zeros(offsets[-1], np.int32), offsets)
    batches = ClassifierBatches(docs, batch_size=64, seed=0)
    assert batches.padding_fraction() < 0.10
    # without length bucketing the same batches would be mostly padding
    random_batches = ClassifierBatches(docs, batch_size=64, seed=0, megabatch_batches=1)
    assert random_batches.padding_fraction() > 0.3


def test_classifier_resume_and_ddp_slices() -> None:
    docs = make_docs(100, seed=6)
    full = ClassifierBatches(docs, batch_size=8, seed=3)
    full.set_epoch(1)
    everything = list(full)
    resumed = ClassifierBatches(docs, batch_size=8, seed=3)
    state = {**full.state_dict(), "position": 4}
    resumed.load_state_dict(state)
    for a, b in zip(everything[4:], resumed, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.index, b.index)
    ranks = [ClassifierBatches(docs, 8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for part in ranks:
        part.set_epoch(1)
    for whole, part0, part1 in zip(everything, *ranks, strict=True):
        assert torch.equal(torch.cat([part0.index, part1.index]), whole.index)
