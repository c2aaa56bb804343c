"""LM training throughput: our AWD-LSTM against fastai's ``AWD_LSTM``, one full step each.

A step is forward, loss, backward and an Adam step on a (batch x bptt) window, with every
dropout on, the state carried (detached) from the previous window, and plain cross entropy as
the loss for both models (AR/TAR off for both, so the work is the same). The two models'
steps are interleaved (A B A B ...) so that load on this shared machine hits both alike, and
the medians are compared. The fraction of the machine's GEMM rate uses the step's matrix
FLOPs counted analytically and a large ``torch.mm`` timed in the same run.

    python bench/bench_lm_throughput.py --steps 5 --configs small,paper

Writes the table to stdout and to ``bench/results/lm_throughput.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ulmfit.io import atomic_write  # noqa: E402
from ulmfit.model import AWDLSTMConfig, LanguageModel, detach_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lm_throughput.md"
DROPOUTS = dict(  # the AWD-LSTM paper's, as AWDLSTMConfig's defaults (ours, fastai's names)
    embed_dropout=("embed_p", 0.1),
    input_dropout=("input_p", 0.6),
    hidden_dropout=("hidden_p", 0.2),
    weight_dropout=("weight_p", 0.5),
    output_dropout=("output_p", 0.1),
)


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    vocab: int
    embed: int
    hidden: int
    batch: int
    bptt: int


SIZES = {
    "paper": Size("paper", 15000, 400, 1150, 64, 70),
    "small": Size("small", 15000, 200, 512, 32, 70),
}


def step_flops(size: Size, layers: int = 3) -> float:
    """Matrix FLOPs of one training step: 2 per multiply-add forward, twice that backward."""
    dims = [size.embed] + [size.hidden] * (layers - 1) + [size.embed]
    lstm = sum(4 * dims[i + 1] * (dims[i] + dims[i + 1]) for i in range(layers))
    decoder = size.embed * size.vocab
    return 6.0 * (lstm + decoder) * size.batch * size.bptt


def gemm_rate(dtype: torch.dtype, backend: str, n: int = 2048, repeats: int = 5) -> float:
    """FLOPs per CPU-second of a large square matmul (median of ``repeats``).

    ``backend`` "mkl" is ``torch.mm`` (MKL on x86), "onednn" is oneDNN's matmul, which PyTorch
    uses for its CPU LSTM and which runs AVX-512 code on AMD CPUs where MKL does not.
    """
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    if backend == "mkl":
        run = lambda: torch.mm(a, b)  # noqa: E731
    else:
        run = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # noqa: E731
    run()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return 2 * n**3 / statistics.median(times)


def fastai_step(size: Size, seed: int) -> Callable[[], None]:
    from fastai.text.all import AWD_LSTM, get_language_model

    torch.manual_seed(seed)
    config = dict(
        emb_sz=size.embed, n_hid=size.hidden, n_layers=3, pad_token=1, bidir=False,
        tie_weights=True, out_bias=True, **{fa: p for fa, p in DROPOUTS.values()},
    )  # fmt: skip
    model = get_language_model(AWD_LSTM, size.vocab, config=config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _batch(size, seed)

    def step() -> None:  # fastai keeps the (detached) state inside the model
        logits = model(x)[0]
        loss = F.cross_entropy(logits.reshape(-1, size.vocab), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def ours_step(
    size: Size, seed: int, *, fused: bool = True, bf16: bool = False
) -> Callable[[], None]:
    torch.manual_seed(seed)
    cfg = AWDLSTMConfig(
        size.vocab, size.embed, size.hidden, **{ours: p for ours, (_, p) in DROPOUTS.items()}
    )
    model = LanguageModel(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _batch(size, seed)
    state = None

    def step() -> None:
        nonlocal state
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with autocast:
            if fused:
                out = model.forward_loss(x, y, state)
                loss = out.loss
            else:
                out = model(x, state)
                loss = F.cross_entropy(out.logits.reshape(-1, size.vocab).float(), y.reshape(-1))
        state = detach_state(out.state)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _batch(size: Size, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    stream = torch.randint(2, size.vocab, (size.batch, size.bptt + 1), generator=generator)
    return stream[:, :-1], stream[:, 1:]


VARIANTS: dict[str, tuple[str, Callable[[Size, int], Callable[[], None]]]] = {
    "fastai": ("fastai AWD_LSTM, fp32", fastai_step),
    "ours": ("ours, fp32 (fused chunked decoder + CE)", ours_step),
    "ours-unfused": (
        "ours, fp32, logits + F.cross_entropy",
        lambda s, r: ours_step(s, r, fused=False),
    ),
    "ours-bf16": ("ours, bf16 autocast (numerics change)", lambda s, r: ours_step(s, r, bf16=True)),
}


def measure(
    size: Size, variants: list[str], steps: int, warmup: int
) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, CPU seconds) per step of each variant, the variants' steps interleaved."""
    step_fns = {v: VARIANTS[v][1](size, 0) for v in variants}
    for _ in range(warmup):
        for fn in step_fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for i in range(steps):
        order = variants if i % 2 == 0 else variants[::-1]  # A B, then B A: no fixed position
        for v in order:
            wall, cpu = time.perf_counter(), time.process_time()
            step_fns[v]()
            times[v].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def profile(size: Size, variants: list[str]) -> None:
    """Where one step's time goes, per variant (self CPU time of the top operators)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for v in variants:
        step = VARIANTS[v][1](size, 0)
        step()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n## {VARIANTS[v][0]} ({size.name})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per model and size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--configs", default="small,paper", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}"
    )
    parser.add_argument(
        "--threads", default=str(torch.get_num_threads()), help="comma list of thread counts"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table per variant and exit"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="fastai")  # fastai's own import-time chatter
    variants = [v.strip() for v in args.variants.split(",")]
    if "fastai" in variants:
        variants.remove("fastai")
        variants.insert(0, "fastai")
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.profile:
        torch.set_num_threads(thread_counts[0])
        profile(SIZES[args.configs.split(",")[0].strip()], variants)
        return

    load = os.getloadavg()[0]
    header = [
        "# LM training throughput: ours vs fastai AWD_LSTM",
        "",
        f"Reproduce: `python bench/bench_lm_throughput.py --steps {args.steps} "
        f"--warmup {args.warmup} --configs {args.configs} --variants {','.join(variants)} "
        f"--threads {args.threads}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}. "
        + (
            "**Measured under load**: the machine was shared with other jobs (load average "
            f"{load:.1f} at start), so wall-clock figures are noisy. "
            if load > 1.5
            else f"Load average {load:.1f} at start (no other jobs). "
        )
        + "The steps are interleaved and "
        "the ratios use the median CPU time per step, which time-slicing does not inflate "
        "(with 2 threads, CPU time also counts OpenMP spin-waiting).",
        "",
        "One step = forward, plain cross entropy, backward, `torch.optim.Adam` step; all dropouts "
        f"on ({', '.join(f'{k}={p}' for k, (_, p) in DROPOUTS.items())}); AR/TAR off for both; "
        "the state carried (detached) between steps. FLOPs per step counted analytically "
        "(LSTM and decoder matrix products, forward and backward); '% of GEMM' divides the "
        "step's FLOPs per CPU-second by the faster backend's 2048^3 matmul rate per CPU-second "
        "for that dtype and thread count.",
        "",
    ]
    gemm_lines: list[str] = []
    rows = [
        "| threads | config | variant | median wall s/step | tokens/s (wall) "
        "| median CPU s/step | tokens per CPU-s | vs fastai (CPU time) | vs fastai (wall) "
        "| % of GEMM rate | wall spread (max/min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        rates = {
            (dtype, backend): gemm_rate(dtype, backend)
            for dtype in (torch.float32, torch.bfloat16)
            for backend in ("mkl", "onednn")
        }
        gemm_lines.append(
            f"- {threads} thread(s), GEMM rate per CPU-second: "
            + ", ".join(
                f"{'fp32' if d == torch.float32 else 'bf16'} {b} {r / 1e9:.0f} GFLOP/s"
                for (d, b), r in rates.items()
            )
        )
        fp32_rate = max(rates[torch.float32, b] for b in ("mkl", "onednn"))
        bf16_rate = max(rates[torch.bfloat16, b] for b in ("mkl", "onednn"))
        for name in args.configs.split(","):
            size = SIZES[name.strip()]
            times = measure(size, variants, args.steps, args.warmup)
            tokens = size.batch * size.bptt
            walls = {v: statistics.median(t[0] for t in times[v]) for v in variants}
            cpus = {v: statistics.median(t[1] for t in times[v]) for v in variants}
            for v in variants:
                rate = bf16_rate if v.endswith("bf16") else fp32_rate
                vs_cpu = f"{cpus['fastai'] / cpus[v]:.2f}x" if "fastai" in cpus else "-"
                vs_wall = f"{walls['fastai'] / walls[v]:.2f}x" if "fastai" in walls else "-"
                rows.append(
                    f"| {threads} | {size.name} (V={size.vocab}, {size.embed}/{size.hidden}x3, "
                    f"{size.batch}x{size.bptt}) | {VARIANTS[v][0]} | {walls[v]:.2f} | "
                    f"{tokens / walls[v]:.0f} | {cpus[v]:.2f} | {tokens / cpus[v]:.0f} | "
                    f"{vs_cpu} | {vs_wall} | {100 * step_flops(size) / cpus[v] / rate:.0f}% | "
                    f"{max(t[0] for t in times[v]) / min(t[0] for t in times[v]):.1f} |"
                )
            print("\n".join(rows[-len(variants) :]), flush=True)
    footer = [
        "",
        f"Steps measured per variant: {args.steps} (after {args.warmup} warm-up). A wall spread "
        "far above 1 means identical steps took very different times: the row measured "
        "contention with other jobs more than the model.",
        "",
    ]
    text = "\n".join(header + gemm_lines + [""] + rows + footer)
    print(text)
    with atomic_write(args.output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
