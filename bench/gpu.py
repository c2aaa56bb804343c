"""The device checks in one run, for a GPU lent for a few minutes: LM training throughput of
every backbone on CUDA (fp32 against bf16 autocast, the AWD-LSTM through cuDNN with weight
dropout on), then a short paper-size AWD-LSTM pretraining on the Wikipedia extract through the
real training loop (``train_language_model``: STLR, clipping, checkpoints, validation).

    python bench/gpu.py --data DIR --out DIR [--pretrain-seconds 240] [--smoke]

--data holds a workspace's ``data/wikipedia_tokens/{train,valid}.parquet``. Writes to --out, as
it goes: ``gpu.md`` (the tables), ``gpu.json`` (every figure, the pretraining's history) and the
pretrained LM's weights in fp16, split into ``lm.pt.partN`` files small enough to copy back
(``bench/gpu_lm.py`` joins them into a pretrained-LM folder that ``pretrain.reuse`` takes).
``--smoke`` runs tiny sizes for a few steps on whatever device there is: a check of the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_lm_throughput import DROPOUTS  # noqa: E402
from ulmfit.evaluate import evaluate_lm  # noqa: E402
from ulmfit.model import AWDLSTMConfig, LanguageModel, detach_state  # noqa: E402
from ulmfit.schedule import ScheduleConfig  # noqa: E402
from ulmfit.storage import read_metadata, read_tokens  # noqa: E402
from ulmfit.train import LMTrainConfig, TrainEvent, train_language_model  # noqa: E402
from ulmfit.transformer import TransformerConfig, TransformerLM  # noqa: E402

PART_BYTES = 15 * 2**20  # under the 16 MiB a returned file may hold
VOCAB = 15000  # the benchmark profile's tokenizer
PAPER = dict(embed_size=400, hidden_size=1150, num_layers=3)
AWD_DROPOUTS = {ours: p for ours, (_, p) in DROPOUTS.items()}  # the AWD-LSTM paper's


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    config: AWDLSTMConfig | TransformerConfig
    batch: int
    bptt: int = 70


def arms(smoke: bool) -> list[Arm]:
    if smoke:
        tiny = AWDLSTMConfig(500, 16, 24, 2, **AWD_DROPOUTS)
        return [
            Arm("AWD-LSTM tiny", tiny, 4, 10),
            Arm("AWD-QRNN tiny", dataclasses.replace(tiny, qrnn=True), 4, 10),
            Arm("GPT-style tiny", TransformerConfig(500, 16, 2, 2, 2, 64), 4, 10),
        ]
    paper = AWDLSTMConfig(VOCAB, **PAPER, **AWD_DROPOUTS)
    small = dataclasses.replace(paper, embed_size=200, hidden_size=512)
    arms_size = dict(dim=256, num_layers=4, heads=4, ff_mult=4, max_len=128, dropout=0.1)
    gpt1_size = dict(dim=768, num_layers=12, heads=12, ff_mult=4, max_len=128, dropout=0.1)
    return [
        Arm("AWD-LSTM 200/512x3 (benchmark profile)", small, 32),
        Arm("AWD-LSTM 400/1150x3 (paper)", paper, 64),
        Arm("AWD-LSTM 400/1150x3 (paper)", paper, 128),
        Arm("AWD-QRNN 400/1150x3", dataclasses.replace(paper, qrnn=True), 64),
        Arm("GPT-style 256x4 (arms profile)", TransformerConfig(VOCAB, **arms_size), 32),
        Arm("GPT-style 256x4 (arms profile)", TransformerConfig(VOCAB, **arms_size), 64),
        Arm(
            "BERT-style 256x4 (arms profile)",
            TransformerConfig(VOCAB, **arms_size, objective="mlm", mask_id=0),
            64,
        ),
        Arm("GPT-style 768x12 (GPT-1 size)", TransformerConfig(VOCAB, **gpt1_size), 64),
    ]


def build(config) -> torch.nn.Module:
    return LanguageModel(config) if isinstance(config, AWDLSTMConfig) else TransformerLM(config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(arm: Arm, bf16: bool, device: torch.device, steps: int, warmup: int) -> dict:
    """Tokens/s of one training step (forward, loss, backward, clip 0.3, AdamW), the median of
    three timed blocks of ``steps``; the state carried (detached) as in training."""
    torch.manual_seed(0)
    model = build(arm.config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stream = torch.randint(2, arm.config.vocab_size, (arm.batch, arm.bptt + 1), device=device)
    x, y = stream[:, :-1], stream[:, 1:]
    state = None
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        nonlocal state
        with cast:
            out = model.forward_loss(x, y, state)
        state = detach_state(out.state)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        rates.append(steps * arm.batch * arm.bptt / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": statistics.median(rates), "spread": max(rates) / min(rates),
            "peak_gib": peak, "params_m": params / 1e6}  # fmt: skip


class Deadline:
    """The pretraining's callback: a progress line every ``every`` steps and at each validation,
    and a stop (an exception the caller catches) once ``seconds`` have passed, as a guard if the
    planned steps run slower than measured."""

    class Reached(Exception):
        pass

    def __init__(self, seconds: float, every: int, batch: int) -> None:
        self.start = time.perf_counter()
        self.seconds, self.every, self.batch = seconds, every, batch
        self.history: list[dict] = []  # the validations, kept even if the deadline stops the run
        self.step = self.tokens = 0  # tokens: batch x each step's (variable) BPTT length

    def __call__(self, event: TrainEvent) -> None:
        elapsed = time.perf_counter() - self.start
        self.step = event.step
        if event.kind == "step":
            self.tokens += self.batch * int(event.metrics["seq_len"])
        if event.kind == "step" and event.step % self.every == 0:
            rate = self.tokens / elapsed
            print(f"  step {event.step}: loss {event.metrics['loss']:.3f}, {rate:,.0f} tokens/s "
                  f"({elapsed:.0f} s)", flush=True)  # fmt: skip
        elif event.kind == "eval":
            self.history.append({**event.metrics, "seconds": elapsed, "trained": self.tokens})
            print(f"  validation at step {event.step}: perplexity "
                  f"{event.metrics['perplexity']:.2f} ({elapsed:.0f} s)", flush=True)  # fmt: skip
        if elapsed > self.seconds:
            raise Deadline.Reached(f"stopped at step {event.step} after {elapsed:.0f} s")


def pretrain(data: Path, out: Path, seconds: float, smoke: bool) -> dict:
    """Paper-size AWD-LSTM on the Wikipedia extract for about ``seconds`` at the training
    loop's measured rate, bf16 autocast, the benchmark profile's recipe but lr 5e-3 (the fastai
    v1 pretraining rate, METHOD.md) and batch 64 (the paper's)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = read_metadata(data / "train.parquet")
    train, valid = read_tokens(data / "train.parquet"), read_tokens(data / "valid.parquet")
    vocab = int(meta["vocab_size"])
    sizes = dict(embed_size=16, hidden_size=24, num_layers=2) if smoke else PAPER
    dropouts = dict(embed_dropout=0.02, input_dropout=0.25, hidden_dropout=0.15,
                    weight_dropout=0.2, output_dropout=0.1)  # fmt: skip  # benchmark profile's
    config = AWDLSTMConfig(vocab, **sizes, **dropouts).scaled(0.1)
    batch, bptt = (4, 10) if smoke else (64, 70)
    cfg = LMTrainConfig(
        epochs=100, batch_size=batch, bptt=bptt, lr=5e-3, amp="bf16" if device.type == "cuda"
        else "none", keep_checkpoints=1, deterministic=False,
        schedule=ScheduleConfig(discriminative=False, stlr=True, cut_frac=0.1, stlr_ratio=32),
    )  # fmt: skip
    # The loop's own rate (per-step loss read-back, variable BPTT, batching) sets the steps:
    # 60 calibration steps on a throwaway model, the last 50 timed.
    calibration = Deadline(float("inf"), 60, batch)
    stamps: list[tuple[float, int]] = []  # (time, tokens trained) after each step

    def record(event: TrainEvent) -> None:
        calibration(event)
        if event.kind == "step":
            stamps.append((time.perf_counter(), calibration.tokens))

    train_language_model(LanguageModel(config), train, None, dataclasses.replace(cfg, max_steps=60),
                         device=device, callback=record)  # fmt: skip
    rate = (stamps[-1][1] - stamps[9][1]) / (stamps[-1][0] - stamps[9][0])
    evals = 4
    steps = max(evals, int(seconds * rate / (batch * bptt)) // evals * evals)
    cfg = dataclasses.replace(
        cfg, max_steps=steps, eval_every=steps // evals, checkpoint_every=steps // evals
    )
    torch.manual_seed(cfg.seed)
    model = LanguageModel(config)
    deadline = Deadline(seconds * 1.5 + 30, max(1, steps // 20), batch)
    print(f"pretraining {steps} steps of {batch} x {bptt} on {device}", flush=True)
    start, stopped = time.perf_counter(), None
    try:
        train_language_model(
            model, train, valid, cfg, checkpoint_dir=tempfile.mkdtemp(),
            callback=deadline, device=device, tokenizer_identity=meta["tokenizer_identity"],
        )  # fmt: skip
    except Deadline.Reached as reached:
        stopped = str(reached)
    wall = time.perf_counter() - start
    # What comes back is fp16: its perplexity is measured on exactly those weights.
    half = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in half.items()})
    final = evaluate_lm(model.eval(), valid, batch_size=batch, bptt=bptt, device=device)
    buffer = io.BytesIO()
    torch.save({"config": dataclasses.asdict(config), "state_dict": half}, buffer)
    blob = buffer.getvalue()
    for index in range(0, len(blob), PART_BYTES):
        (out / f"lm.pt.part{index // PART_BYTES}").write_bytes(blob[index : index + PART_BYTES])
    return {
        "model": dataclasses.asdict(config), "batch": batch, "bptt": bptt, "lr": cfg.lr, "amp": cfg.amp,
        "planned_steps": steps, "steps": deadline.step, "stopped": stopped, "wall_seconds": wall,
        "tokens_trained": deadline.tokens, "train_tokens": int(train.offsets[-1]),
        "loop_tokens_per_s": rate, "train_documents": len(train.offsets) - 1,
        "valid_tokens": int(valid.offsets[-1]), "history": deadline.history, "fp16_valid": final,
        "tokenizer_identity": meta["tokenizer_identity"], "weights_sha256":
        hashlib.sha256(blob).hexdigest(), "weights_bytes": len(blob),
    }  # fmt: skip


def environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "device": device.type}  # fmt: skip
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version(),
            cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )  # fmt: skip
    return info


def write(out: Path, report: dict) -> None:
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    env = report["environment"]
    lines = [
        "# Device checks (bench/gpu.py)", "",
        f"Device: {env.get('gpu', env['device'])}; torch {env['torch']}, CUDA {env.get('cuda')}, "
        f"cuDNN {env.get('cudnn')}, Python {env['python']}. fp32 is PyTorch's default: TF32 "
        f"{'on' if env.get('tf32_matmul') else 'off'} for matrix products, "
        f"{'on' if env.get('tf32_cudnn') else 'off'} in cuDNN (the LSTM).", "",
        "## LM training throughput", "",
        "One step: forward, the fused decoder + cross entropy, backward, clip 0.3, AdamW; every "
        "dropout on (the AWD-LSTM's: the AWD-LSTM paper's, weight dropout 0.5 through cuDNN; the "
        "transformers' 0.1); the recurrent state carried. Median of three timed blocks.", "",
        "| model | params (M) | batch x bptt | fp32 tokens/s | bf16 autocast tokens/s "
        "| bf16 / fp32 | peak GiB (bf16) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in report["throughput"]:
        fp32, bf16 = row["fp32"], row["bf16"]
        lines.append(
            f"| {row['arm']} | {fp32['params_m']:.1f} | {row['batch']} x {row['bptt']} "
            f"| {fp32['tokens_per_s']:,.0f} | {bf16['tokens_per_s']:,.0f} "
            f"| {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x | {bf16['peak_gib']:.2f} |"
        )
    run = report.get("pretrain")
    if run:
        lines += ["", "## Paper-size AWD-LSTM pretraining on the Wikipedia extract", "",
                  f"{run['planned_steps']} planned steps of {run['batch']} x {run['bptt']} tokens, "
                  f"lr {run['lr']}, amp {run['amp']}; {run['steps']} done in {run['wall_seconds']:.0f} s "
                  f"({run['tokens_trained']:,} tokens of a {run['train_tokens']:,}-token train "
                  f"split); stopped early: {run['stopped']}.", "",
                  "| step | tokens | seconds | validation perplexity |", "|---|---|---|---|"]  # fmt: skip
        for h in run["history"]:
            lines.append(
                f"| {int(h['step'])} | {h['trained']:,} | {h['seconds']:.0f} "
                f"| {h['perplexity']:.2f} |"
            )
        fp16 = run["fp16_valid"]["perplexity"]
        lines.append(
            f"| the last, its weights rounded to fp16 (what comes back) | | | {fp16:.2f} |"
        )
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-seconds", type=float, default=240)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {"environment": environment(device), "throughput": []}
    print(report["environment"], flush=True)
    for arm in arms(args.smoke):
        row = {"arm": arm.name, "batch": arm.batch, "bptt": arm.bptt}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            row[name] = throughput(arm, bf16, device, args.steps, warmup=5)
            print(f"{arm.name} {arm.batch}x{arm.bptt} {name}: "
                  f"{row[name]['tokens_per_s']:,.0f} tokens/s", flush=True)  # fmt: skip
        report["throughput"].append(row)
        write(args.out, report)
    report["pretrain"] = pretrain(args.data, args.out, args.pretrain_seconds, args.smoke)
    write(args.out, report)
    print((args.out / "gpu.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
