"""Wall time of one call in milliseconds, shared by the benchmarks: CUDA events on a GPU (the
kernels run asynchronously), time.perf_counter elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_once_ms(fn: Callable[[], None], device: str | torch.device) -> float:
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
