"""The fused KD-loss kernel is GPU-ready: every variant the launcher can pick compiles, for sm_80
and sm_90, to machine code that spills no register. CPU only: no GPU is needed to compile.

Each variant is made by calling the real launcher (`trainer.losses.triton_kernel.launch`) on small CPU
tensors with Triton's driver replaced by an offline one that only names the target GPU. Triton's
JIT then specializes the call exactly as on a GPU (constexprs from `kernel_constexprs`,
`block_v_for`, `num_warps_for`; argument types; 16-divisibility of pointers, strides, V and K),
and a `jit_cache_hook` takes that specialization instead of launching. `preload` compiles it
through Triton's own pipeline (TTIR -> PTX -> `ptxas -v`, with the ptxas binary and flags Triton
uses on a GPU), and ptxas's log gives the registers and spill bytes.

Triton must be imported without TRITON_INTERPRET (tests/conftest.py sets it on CPU), so the
matrix runs in a subprocess: this file run as a script, compiling variants in a process pool.
Print the table (JSON, one row per arch and variant) with

    .venv/bin/python tests/trainer/test_ptx.py            # --summary: max registers per K and mode
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)  # A100, H100/H200
VOCAB = 128256  # Llama 3
KS = (8, 64, 256, 1024, 4096)
DTYPES = ("float32", "bfloat16", "float16")
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
WORKERS = 2


@dataclass(frozen=True)
class Variant:
    """One call of the launcher: which inputs are given decides the kernel's compile-time parameters.

    ce: labels with alpha = 0.5 (the CE term, rows counted by label), else no labels and alpha = 0.
    temperature: 1 with weights and CE is the launcher's ONE_SOFTMAX case.
    """

    weighted: bool
    divergence: str
    has_logp: bool
    dtype: str
    k: int
    ce: bool
    temperature: float = 2.0
    ids_dtype: str = "int32"

    @property
    def name(self) -> str:
        target = ("logp" if self.has_logp else "counts") if self.weighted else self.divergence
        ce = ("ce-T1" if self.temperature == 1.0 else "ce") if self.ce else "no-ce"
        ids = "-ids64" if self.ids_dtype == "int64" else ""
        return f"{'weighted' if self.weighted else 'bucket'}/{target}/{self.dtype}/K{self.k}/{ce}{ids}"


def variants() -> list[Variant]:
    """BUCKET: every divergence; WEIGHTED: fkl with and without teacher log-probs; each with and
    without CE (WEIGHTED + CE also at T = 1), every logits dtype and K; plus int64 ids once."""
    out = []
    for dtype in DTYPES:
        for k in KS:
            for ce in (False, True):
                out += [Variant(False, div, True, dtype, k, ce) for div in DIVERGENCES]
                for has_logp in (True, False):
                    out += [Variant(True, "fkl", has_logp, dtype, k, ce, t) for t in ((2.0, 1.0) if ce else (2.0,))]
    return [*out, Variant(False, "fkl", True, "bfloat16", 64, True, ids_dtype="int64")]


class _OfflineDriver:
    """Stands in for the CUDA driver: the JIT only asks it for the target, a device id and a stream.

    The device id is the arch, so that the JIT's per-device caches (target, backend) never mix
    two archs in one process.
    """

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def compile_variant(arch: int, v: Variant) -> dict:
    """Compile what `launch` would launch for `v` on sm_`arch`; registers and spills from ptxas -v."""
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.driver import driver

    from trainer.losses.config import LossConfig
    from trainer.losses.sparse_target import SparseTarget
    from trainer.losses.triton_kernel import _kd_loss_kernel, interpreting, launch

    assert not interpreting(), "TRITON_INTERPRET was set when triton was imported"
    start = time.perf_counter()
    driver.set_active(_OfflineDriver(GPUTarget("cuda", arch, 32)))
    specs = []

    def take_specialization(*, compile, **_):
        specs.append(json.loads(compile["specialization_data"]))
        return True  # neither compile nor launch: the JIT caches nothing and returns

    dtype = getattr(torch, v.dtype)
    with knobs.runtime.scope():
        knobs.runtime.jit_cache_hook = take_specialization
        launch(
            torch.zeros(1, VOCAB, dtype=dtype),
            SparseTarget(
                torch.arange(v.k, dtype=getattr(torch, v.ids_dtype)).reshape(1, v.k),
                torch.zeros(1, v.k) if v.has_logp else None,
                torch.full((1, v.k), 1.0 / v.k) if v.weighted else None,
            ),
            torch.zeros(1, dtype=torch.int64) if v.ce else None,
            LossConfig(temperature=v.temperature, divergence=v.divergence, alpha=0.5 if v.ce else 0.0),
            inplace_grad=False, compute_grad=True,
        )  # fmt: skip
    assert len(specs) == 1, f"{v.name}: the launcher made {len(specs)} kernel calls"
    spec = specs[0]
    # What the JIT would compile (as JITFunction.preload decodes it; JSON made tuples lists).
    constants = {tuple(key): val for key, val in zip(spec["constant_keys"], spec["constant_vals"], strict=True)}
    attrs = {tuple(key): val for key, val in zip(spec["attrs_keys"], spec["attrs_vals"], strict=True)}
    options = {key: tuple(val) if isinstance(val, list) else val for key, val in spec["options"].items()}
    src = ASTSource(_kd_loss_kernel, spec["signature"], constants, attrs)

    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of its `ptxas -v` run
        kernel = triton.compile(src, target=GPUTarget(**spec["target"]), options=options)
    log = log.getvalue()
    spills, registers = _SPILLS.findall(log), _REGISTERS.findall(log)
    if len(spills) != 1 or len(registers) != 1:
        raise RuntimeError(f"{v.name} sm_{arch}: cannot read one kernel's usage from the ptxas log:\n{log}")
    ptx = kernel.asm["ptx"]
    names = _kd_loss_kernel.arg_names
    constexprs = {names[i]: val for (i,), val in constants.items()}
    return dict(
        arch=arch, name=v.name, **asdict(v),
        gpu=re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1),
        ptx_version=re.search(r"^\.version\s+([\d.]+)", ptx, re.M).group(1),
        ptxas=log.split(" info", 1)[0].split()[-1],
        num_warps=options["num_warps"], block_v=constexprs["BLOCK_V"], one_softmax=constexprs["ONE_SOFTMAX"],
        registers=int(registers[0]), stack_bytes=int(spills[0][0]),
        spill_stores=int(spills[0][1]), spill_loads=int(spills[0][2]),
        compile_s=round(time.perf_counter() - start, 2),
    )  # fmt: skip


def _compile_task(task: tuple[int, Variant]) -> dict:
    return compile_variant(*task)


def compile_matrix(archs=ARCHS, workers=WORKERS, ks=KS, dtypes=DTYPES) -> list[dict]:
    """Every variant (with K in `ks`, logits in `dtypes`) for every arch, compiled in `workers`
    processes (call without TRITON_INTERPRET)."""
    tasks = [(arch, v) for arch in archs for v in variants() if v.k in ks and v.dtype in dtypes]
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i][1].k)  # longest first: the pool ends together
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(_compile_task, [tasks[i] for i in order]))
    return [row for _, row in sorted(zip(order, rows, strict=True))]


def summarize(rows: list[dict]) -> list[str]:
    """One line per (arch, mode, K): the variant with the most registers, and the spill total."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["weighted"], r["k"]), []).append(r)
    lines = []
    for (arch, weighted, k), rs in sorted(groups.items()):
        top = max(rs, key=lambda r: r["registers"])
        spilled = sum(r["spill_stores"] + r["spill_loads"] for r in rs)
        lines.append(
            f"sm_{arch} {'weighted' if weighted else 'bucket  '} K={k:<5} BLOCK_V={top['block_v']:<5} "
            f"warps={top['num_warps']:<2} max registers {top['registers']:>3} ({top['name']}), "
            f"spill bytes {spilled} over {len(rs)} variants"
        )
    return lines


def describe(r: dict) -> str:
    return (
        f"sm_{r['arch']} {r['name']}: {r['registers']} registers, {r['spill_stores']} bytes spill stores, "
        f"{r['spill_loads']} bytes spill loads (BLOCK_V={r['block_v']}, num_warps={r['num_warps']})"
    )


# The issue asks for 0 spill bytes. With the launcher's earlier choices (BLOCK_V 4096 at K = 64,
# 8 warps at K >= 512 and at BLOCK_V 8192) ptxas spilled 4-32 bytes in 36 of 422 variants; the
# old K = 1024 de-duplication spilled 14.8 KB. `num_warps_for` and `block_v_for` now say why.
# Session 25: all 422 variants 0 spills (~13 min on 2 idle cores). CI compiles the training
# dtype at every K (142 compiles, ~4.5 min): K = 4096 sits at 128 registers, the most 16 warps allow.
MAX_SPILL_BYTES = 0
CI_DTYPES = ("bfloat16",)
CI_KS = KS


@pytest.mark.slow
def test_kernel_variants_compile_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    out = tmp_path / "ptx.json"
    proc = subprocess.run(
        [sys.executable, __file__, "--out", str(out), "--dtype", *CI_DTYPES, "--k", *map(str, CI_KS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, f"compiling the matrix failed:\n{proc.stderr[-6000:]}"
    rows = json.loads(out.read_text())

    expected = sorted((a, v.name) for a in ARCHS for v in variants() if v.dtype in CI_DTYPES and v.k in CI_KS)
    assert sorted((r["arch"], r["name"]) for r in rows) == expected
    assert {r["gpu"] for r in rows} == {"sm_80", "sm_90a"}
    spilling = [describe(r) for r in rows if max(r["spill_stores"], r["spill_loads"]) > MAX_SPILL_BYTES]
    assert not spilling, f"{len(spilling)} of {len(rows)} kernel variants spill:\n" + "\n".join(spilling)
    print("\n".join(summarize(rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    parser.add_argument("--k", type=int, nargs="+", default=list(KS), help="only these K (8 64 256 1024 4096)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), help="only these logits dtypes")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--out", type=Path, help="write the JSON table here instead of stdout")
    parser.add_argument("--summary", action="store_true", help="print the per-K summary instead of the table")
    args = parser.parse_args()
    if os.environ.pop("TRITON_INTERPRET", None):
        print("note: TRITON_INTERPRET ignored (compiling, not interpreting)", file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if "TRITON_CACHE_DIR" not in os.environ:  # keep ~/.triton/cache clean (every variant recompiles anyway)
            os.environ["TRITON_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory())
        rows = compile_matrix(args.arch, args.workers, args.k, args.dtype)
    print(f"{len(rows)} variants compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    text = "\n".join(summarize(rows)) if args.summary else json.dumps(rows, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
