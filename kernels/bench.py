"""Kernel benchmarks: reference vs Triton (and torch SDPA for attention), forward pass.

    python -m kernels.bench [--kernel triplane|composite|attention|all] [--preset tiny|paper]
                            [--json out.json]

One table per kernel: reference ms, Triton ms, ratio (reference / Triton), achieved GB/s (memory-bound
ops) or TFLOP/s (attention), and the speed of light: the least bytes the op must move over peak
bandwidth, or its FLOPs over the peak bf16 tensor rate, for the detected GPU. Without CUDA the
reference still runs on the CPU and Triton reads "n/a (no CUDA)" (the interpreter is never timed);
CPU cases that would take more than a few seconds or gigabytes are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kernels.attention_ref import attention_ref
from kernels.composite_ref import composite_rays_ref
from kernels.triplane_ref import triplane_sample_ref

# name fragment -> (peak HBM bytes/s, peak dense bf16 FLOP/s); first match wins.
PEAKS = (("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12))
CPU_MAX_FLOPS = 2e11  # skip CPU cases above this (~seconds on two cores)
CPU_MAX_BYTES = 2e9  # ... or whose reference materialises more than this


@dataclass
class Case:
    kernel: str
    case: str
    bytes: float  # least bytes moved: inputs read once, outputs written once
    flops: float
    ref_bytes: float  # what the reference allocates beyond inputs and outputs (attention scores)
    make: Callable[[], dict]  # -> {"reference": fn, "triton": fn, "sdpa": fn}, built lazily
    floor: bool = False  # a launch-floor case (FLOOR): what a call costs, not how fast the kernel is


@dataclass
class Row:
    kernel: str
    case: str
    ref_ms: float | None
    sdpa_ms: float | None
    triton_ms: float | None
    ratio: float | None
    ref_rate: float | None
    triton_rate: float | None
    sol_ms: float | None
    note: str
    floor: bool = False  # targets (the GPU suite's report) leave floor rows out


def _peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for fragment, bandwidth, flops in PEAKS:
        if fragment in name:
            return name, bandwidth, flops
    return name, None, None


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# A case too small to do work: its time is what every call costs (the Python launch path, the op's dispatch),
# the floor under which no size goes. On the H200 no Triton kernel went under ~55-90 us, where SDPA took 9 us.
FLOOR = "launch floor"


def _grid_points(b: int, n: int, device: torch.device) -> torch.Tensor:
    """n = side^3 points of a regular grid over [-1, 1]^3 in raster order, as the mesher queries a block: nearby
    points share their corner taps, where uniformly random points gather 12 separate cache lines each."""
    side = round(n ** (1 / 3))
    axis = torch.linspace(-1, 1, side, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
    return grid.expand(b, -1, -1).contiguous()


def triplane_cases(preset: str, device: torch.device) -> list[Case]:
    # (batch, channels, resolution, points, grid-ordered): random points are the worst case for the caches
    shapes = {"tiny": [(1, 32, 64, 16384, False), (1, 32, 64, 16 ** 3, True), (1, 32, 8, 64, False)],
              "paper": [(1, 32, 256, 64 * 64 * 128, False), (1, 32, 256, 2 ** 22, False), (1, 32, 256, 128 ** 3, True),
                        (1, 32, 8, 64, False)]}[preset]
    cases = []
    for b, c, r, n, grid in shapes:
        def make(b=b, c=c, r=r, n=n, grid=grid):
            planes = torch.randn(b, 3, c, r, r, device=device)
            points = _grid_points(b, n, device) if grid else torch.rand(b, n, 3, device=device) * 2 - 1
            fns = {"reference": lambda: triplane_sample_ref(planes, points)}
            if device.type == "cuda":
                from kernels.triplane import triplane_sample

                fns["triton"] = lambda: triplane_sample(planes, points)
            return fns

        nbytes = 4 * (b * 3 * c * r * r + b * n * 3 + b * n * c)
        floor = n <= 64
        label = f"{FLOOR + ': ' if floor else ''}planes [{b},3,{c},{r},{r}] {'grid-ordered ' if grid else ''}points {n}"
        cases.append(Case("triplane", label, nbytes, 0.0, 0.0, make, floor))
    return cases


def composite_cases(preset: str, device: torch.device) -> list[Case]:
    shapes = {"tiny": [(1024, 64), (16, 8)], "paper": [(4096, 128), (512 * 512, 64), (16, 8)]}[preset]
    cases = []
    for n, s in shapes:
        def make(n=n, s=s):
            sigmas = torch.rand(n, s, device=device) * 5
            rgbs = torch.rand(n, s, 3, device=device)
            t_vals = torch.sort(torch.rand(n, s, device=device) * 4, dim=-1).values
            deltas = torch.rand(n, s, device=device) * 0.05
            fns = {"reference": lambda: composite_rays_ref(sigmas, rgbs, t_vals, deltas)}
            if device.type == "cuda":
                from kernels.composite import composite_rays

                fns["triton"] = lambda: composite_rays(sigmas, rgbs, t_vals, deltas)
            return fns

        # sigmas, t_vals, deltas and rgbs in; weights, rgb, depth and opacity out
        nbytes = 4 * (n * s * (3 + 3 + 1) + n * 5)
        floor = n <= 16
        cases.append(Case("composite", f"{FLOOR + ': ' if floor else ''}{n} rays x {s} samples", nbytes, 0.0, 0.0,
                          make, floor))
    return cases


def attention_cases(preset: str, device: torch.device) -> list[Case]:
    # (label, batch, heads, Nq, Nk, head dim)
    if preset == "tiny":
        shapes = [("self", 1, 2, 256, 256, 64), ("cross-text", 1, 2, 256, 32, 64)]
    else:
        shapes = [(FLOOR, 1, 1, 16, 16, 64)]
        for b in (1, 4):
            shapes += [
                (f"DiT self B={b}", b, 16, 768, 768, 64),
                (f"DiT cross-text B={b}", b, 16, 768, 77, 64),
                (f"self-plane 16x16 B={b}", 3 * b, 16, 256, 256, 64),
                (f"cross-plane 3x16x16 B={b}", b, 16, 768, 768, 64),
                (f"self-plane 64x64 B={b}", 3 * b, 16, 4096, 4096, 64),
                (f"cross-plane 3x64x64 B={b}", b, 16, 12288, 12288, 64),
            ]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 matmuls are slow
    cases = []
    for label, b, h, nq, nk, d in shapes:
        def make(b=b, h=h, nq=nq, nk=nk, d=d):
            q = torch.randn(b, h, nq, d, device=device, dtype=dtype)
            k = torch.randn(b, h, nk, d, device=device, dtype=dtype)
            v = torch.randn(b, h, nk, d, device=device, dtype=dtype)
            fns = {"reference": lambda: attention_ref(q, k, v),
                   "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
            if device.type == "cuda":
                from kernels.flash_attention import flash_attention

                fns["triton"] = lambda: flash_attention(q, k, v)
            return fns

        esize = torch.finfo(dtype).bits // 8
        nbytes = esize * b * h * d * (2 * nq + 2 * nk)
        flops = 4.0 * b * h * nq * nk * d
        scores = 4.0 * b * h * nq * nk * 2  # fp32 scores and probabilities
        name = f"{label} [{b},{h},{nq}|{nk},{d}] {str(dtype).removeprefix('torch.')}"
        cases.append(Case("attention", name, nbytes, flops, scores, make, label == FLOOR))
    return cases


def run_case(case: Case, device: torch.device, bandwidth: float | None, peak_flops: float | None) -> Row:
    sol = None
    if bandwidth is not None and peak_flops is not None:
        sol = max(case.bytes / bandwidth, case.flops / peak_flops) * 1e3
    row = Row(case.kernel, case.case, None, None, None, None, None, None, sol, "", case.floor)
    if device.type != "cuda" and (case.flops > CPU_MAX_FLOPS or case.ref_bytes > CPU_MAX_BYTES):
        row.note = f"skipped on CPU ({case.flops / 1e9:.0f} GFLOP, {case.ref_bytes / 1e9:.1f} GB of scores)"
        return row
    fns = case.make()

    def rate(ms: float) -> float:  # TFLOP/s for attention, GB/s otherwise
        return case.flops / ms / 1e9 if case.flops else case.bytes / ms / 1e6

    if case.ref_bytes <= (CPU_MAX_BYTES if device.type != "cuda" else 0.5 * _free_bytes(device)):
        row.ref_ms = _time_ms(fns["reference"], device)
        row.ref_rate = rate(row.ref_ms)
    else:
        row.note = f"reference skipped ({case.ref_bytes / 1e9:.1f} GB of scores)"
    if "sdpa" in fns:
        row.sdpa_ms = _time_ms(fns["sdpa"], device)
    if "triton" in fns:
        row.triton_ms = _time_ms(fns["triton"], device)
        row.triton_rate = rate(row.triton_ms)
        if row.ref_ms is not None:
            row.ratio = row.ref_ms / row.triton_ms
    return row


def _free_bytes(device: torch.device) -> float:
    return float(torch.cuda.mem_get_info(device)[0])


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if x < 1000 else f"{x:.0f}"


def print_table(kernel: str, rows: list[Row], device: torch.device) -> None:
    unit = "TFLOP/s" if kernel == "attention" else "GB/s"
    triton_na = "n/a (no CUDA)" if device.type != "cuda" else "-"
    attn = kernel == "attention"
    header = ["case", "ref ms"] + (["sdpa ms"] if attn else []) + ["triton ms", "ref/triton"] + (
        ["sdpa/triton"] if attn else []) + [f"ref {unit}", f"triton {unit}", "SOL ms", "triton % SOL", "note"]
    table = []
    for r in rows:
        sdpa_ratio = r.sdpa_ms / r.triton_ms if r.sdpa_ms and r.triton_ms else None
        cells = [r.case, _fmt(r.ref_ms)] + ([_fmt(r.sdpa_ms)] if attn else []) + [
            _fmt(r.triton_ms) if r.triton_ms is not None else triton_na, _fmt(r.ratio)] + (
            [_fmt(sdpa_ratio)] if attn else []) + [_fmt(r.ref_rate), _fmt(r.triton_rate),
            _fmt(r.sol_ms), _fmt(100 * r.sol_ms / r.triton_ms) if r.sol_ms and r.triton_ms else "-",
            r.note]
        table.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    print(f"\n## {kernel}")
    for cells in [header, ["-" * w for w in widths], *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())


CASES = {"triplane": triplane_cases, "composite": composite_cases, "attention": attention_cases}


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=[*CASES, "all"], default="all")
    parser.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, bandwidth, peak_flops = _peaks(device)
    peak_text = (f"peak {bandwidth / 1e12:.2f} TB/s, {peak_flops / 1e12:.0f} TFLOP/s bf16"
                 if bandwidth else "no peak figures (speed of light n/a)")
    print(f"device: {name} ({peak_text}); preset {args.preset}; torch {torch.__version__}")
    rows = []
    for kernel in CASES if args.kernel == "all" else [args.kernel]:
        kernel_rows = [run_case(c, device, bandwidth, peak_flops) for c in CASES[kernel](args.preset, device)]
        print_table(kernel, kernel_rows, device)
        rows += kernel_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "preset": args.preset, "peak_bytes_per_s": bandwidth,
                       "peak_flops": peak_flops, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
