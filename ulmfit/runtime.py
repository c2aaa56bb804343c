"""How a training or evaluation run executes: seeds, deterministic kernels and mixed precision.

Mixed precision follows the ``amp`` setting of the training configs: bf16 autocast where the
hardware multiplies bf16 natively, fp16 with a gradient scaler on CUDA without bf16, fp32
otherwise (see :func:`precision`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator

import numpy as np
import torch

AMP_SETTINGS = ("auto", "bf16_native", "none", "bf16", "fp16")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration of a run, restoring the caller's settings."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    if enabled:
        # warn_only: an op without a deterministic kernel (rare, CUDA only) warns instead of
        # failing a long run.
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty with NaN, a debugging aid that costs
        # a memory pass per allocation; no kernel here reads memory it has not written.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


@dataclasses.dataclass(frozen=True)
class Precision:
    """A resolved ``amp`` setting: autocast on or off, its dtype, and whether fp16 needs a
    gradient scaler."""

    enabled: bool
    dtype: torch.dtype
    use_scaler: bool


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): there, bf16
    autocast trains the LM 1.6-2.6x faster (BENCHMARKS.md); elsewhere it is emulated, slower
    than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def precision(amp: str, device: torch.device, training: bool = True) -> Precision:
    """Resolve the ``amp`` setting for ``device``.

    ``auto``: on CUDA, bf16 where supported, else fp16 with a gradient scaler; fp32 on a CPU.
    ``bf16_native``: bf16 where the hardware multiplies it natively (CUDA with bf16, or
    :func:`native_cpu_bf16`), else fp32; on a CPU only for training steps
    (``training=True``), so that validation and test figures are computed in fp32, as
    ``ulmfit.predict`` computes predictions.
    """
    if amp == "bf16_native":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = training and native_cpu_bf16()
        amp = "bf16" if native else "none"
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return Precision(False, torch.float32, False)
    if device.type == "cuda":
        if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
            return Precision(True, torch.float16, True)
        return Precision(True, torch.bfloat16, False)
    if amp == "bf16":
        return Precision(True, torch.bfloat16, False)
    raise ValueError(f"amp={amp!r} needs CUDA; use 'none' or 'bf16' on {device.type}")


def autocast(resolved: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved precision (a no-op context in fp32)."""
    if not resolved.enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=resolved.dtype)
