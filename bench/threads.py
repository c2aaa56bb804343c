"""Stage wall time at several PyTorch thread counts, in a workspace that has run the pipeline.

Each stage is run forced (``ulmfit repro -s --force STAGE``) once per thread count, the thread
counts interleaved stage by stage. For each run every section's ``threads:`` in params.yaml is
set to the count; the file is restored afterwards. Times are the whole command's, start-up
included: wall, and CPU (user + system) of the process tree. Forcing re-trains the stages with
another thread count, so their outputs change: run it in a copy of a workspace.

Run: python bench/threads.py --workspace ../demo-copy \
    --stages pretrain@fwd,finetune_lm@bbc_news-fwd,train_classifier@bbc_news-fwd
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml
from collect import publish

ROOT = Path(__file__).resolve().parents[1]

THREADS = re.compile(r"^(  threads: )\d+", re.MULTILINE)


def run_stage(workspace: Path, stage: str, log: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of the children and exit code of one forced stage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(
            ["ulmfit", "repro", "-s", "--force", stage], cwd=workspace, stdout=out, stderr=out
        )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--stages", required=True, help="comma list of DVC stage names")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "threads.md")
    args = parser.parse_args()
    params = args.workspace / "params.yaml"
    original = params.read_text()
    if not THREADS.search(original):
        sys.exit(f"{params}: no section sets threads: (the default profile's sections do)")
    config = yaml.safe_load(original)
    model, vocab = config["pretrain"]["model"], config["tokenizer"]["vocab_size"]
    counts = [int(t) for t in args.threads.split(",")]
    load_start = os.getloadavg()[0]
    rows = []
    try:
        for stage in args.stages.split(","):
            first = None  # the first thread count's wall time: the speed-ups' reference
            for count in counts:
                params.write_text(THREADS.sub(rf"\g<1>{count}", original))
                log = args.workspace / f"threads-{stage}-{count}.log"
                wall, cpu, code = run_stage(args.workspace, stage, log)
                if code:
                    sys.exit(f"{stage} at {count} threads failed (exit {code}); see {log}")
                first = first or wall
                print(f"{stage} threads={count}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
                rows.append((stage, count, wall, cpu, first / wall))
    finally:
        params.write_text(original)
    lines = [
        f"## Stage wall time at {', '.join(map(str, counts))} PyTorch threads ({os.cpu_count()} CPUs)",
        "",
        f"Reproduce: `python bench/threads.py --workspace <a copy of a workspace> --stages "
        f"{args.stages} --threads {args.threads}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load_start:.2f} "
        f"at the start and {os.getloadavg()[0]:.2f} at the end. "
        "Each stage of the workspace was run forced at each thread count in turn (every "
        "section's `threads:`), the whole command timed, start-up included; CPU is user + "
        "system of the process tree. The workspace's models: AWD-LSTM "
        f"{model['embed_size']}/{model['hidden_size']}x{model['num_layers']}, {vocab:,} pieces.",
        "",
        f"| stage | threads | wall s | CPU s | speed-up vs {counts[0]} thread(s) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {stage} | {count} | {wall:.1f} | {cpu:.1f} | {speedup:.2f}x |"
        for stage, count, wall, cpu, speedup in rows
    ]
    publish(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
