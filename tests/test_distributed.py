"""torch.distributed data parallelism: two gloo processes equal one process with the same batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ulmfit import distributed
from ulmfit.model import ClassifierConfig, LanguageModel, SequenceClassifier
from ulmfit.train import (
    ClassifierTrainConfig,
    LMTrainConfig,
    evaluate_classifier,
    evaluate_lm,
    train_classifier,
    train_language_model,
)

WORLD_SIZE = 2
CFG = LMTrainConfig(epochs=2, batch_size=4, bptt=5, lr=0.01, seed=3, max_steps=6)
CLASSIFIER_CFG = ClassifierTrainConfig(epochs=2, batch_size=4, lr=0.01, gradual_unfreezing=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model() -> LanguageModel:
    from test_train import TINY

    torch.manual_seed(0)
    return LanguageModel(TINY.scaled(0.0))  # no dropout: every rank computes the same thing


def _classifier() -> SequenceClassifier:
    from test_train import TINY

    torch.manual_seed(0)
    return SequenceClassifier(ClassifierConfig(encoder=TINY, num_classes=2, bptt=5))


def _worker(rank: int, port: int, out_dir: str) -> None:
    from test_train import classifier_docs, lm_docs

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_RANK=str(rank),
    )
    context = distributed.init_from_env(device="cpu")
    assert context.world_size == WORLD_SIZE and context.rank == rank
    assert dist.get_backend() == "gloo"
    try:
        model = _model()
        losses = []
        train_language_model(
            model,
            lm_docs(),
            None,
            CFG,
            checkpoint_dir=Path(out_dir) / "checkpoints",
            callback=lambda e: losses.append(e.metrics["loss"]) if e.kind == "step" else None,
        )
        metrics = evaluate_lm(model, lm_docs(seed=1), batch_size=4, bptt=5)
        mean = distributed.all_reduce_mean({"rank": float(rank)})
        classifier = _classifier()
        train_classifier(classifier, classifier_docs(), classifier_docs(seed=1), CLASSIFIER_CFG)
        # every rank must hold the same classifier weights after DDP training
        flat = torch.cat([p.detach().flatten() for p in classifier.parameters()])
        copies = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
        dist.all_gather(copies, flat)
        assert all(torch.equal(copies[0], copy) for copy in copies)
        classifier_metrics, probs = evaluate_classifier(
            classifier, classifier_docs(n_docs=13), batch_size=4
        )
        if distributed.is_main_process():
            torch.save(
                {
                    "state": model.state_dict(),
                    "metrics": metrics,
                    "mean": mean,
                    "steps": losses,
                    "classifier": classifier.state_dict(),
                    "classifier_metrics": classifier_metrics,
                    "probs": torch.from_numpy(probs),
                },
                Path(out_dir) / "ddp.pt",
            )
        distributed.barrier()
    finally:
        distributed.teardown()


def test_single_process_helpers_are_no_ops() -> None:
    assert not distributed.is_initialized()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main_process()
    assert distributed.all_reduce_mean({"loss": 2.5}) == {"loss": 2.5}
    distributed.barrier()
    context = distributed.init_from_env(device="cpu")
    assert context.world_size == 1 and context.is_main and not distributed.is_initialized()


def test_two_gloo_processes_match_one_process_with_the_same_total_batch(tmp_path: Path) -> None:
    from test_train import classifier_docs, lm_docs

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["mean"] == {"rank": 0.5}
    assert len(ddp["steps"]) == CFG.max_steps

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        train_language_model(model, lm_docs(), None, CFG)
        single_metrics = evaluate_lm(model, lm_docs(seed=1), batch_size=4, bptt=5)
    finally:
        torch.set_num_threads(threads)
    moved = 0.0
    initial = _model().state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], tensor, atol=1e-6, rtol=1e-5)
        moved = max(moved, float((tensor - initial[name]).abs().max()))
    assert moved > 1e-3  # training really changed the weights, so the comparison means something
    for key in ("loss", "accuracy", "tokens"):
        assert ddp["metrics"][key] == pytest.approx(single_metrics[key], rel=1e-5)
    # the classifier trains under DDP (batch-norm statistics are per rank, so its weights are
    # not compared with a single process); its evaluation gathers every document, in order
    classifier = _classifier()
    classifier.load_state_dict(ddp["classifier"])
    single_classifier_metrics, single_probs = evaluate_classifier(
        classifier, classifier_docs(n_docs=13), batch_size=4
    )
    torch.testing.assert_close(ddp["probs"], torch.from_numpy(single_probs), atol=1e-6, rtol=1e-5)
    assert ddp["classifier_metrics"]["accuracy"] == single_classifier_metrics["accuracy"]
    # the checkpoint holds the recurrent state of the whole global batch
    checkpoint = torch.load(
        sorted((tmp_path / "checkpoints").glob("step-*.pt"))[-1], weights_only=True
    )
    assert checkpoint["world_size"] == WORLD_SIZE and len(checkpoint["rng"]) == WORLD_SIZE
    assert checkpoint["recurrent_state"][0].shape[1] == CFG.batch_size
