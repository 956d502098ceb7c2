"""Compile every Triton kernel for a CUDA target without a GPU: `python -m kernels.compile_check`.

The interpreter tests check the maths on the CPU but not that the kernels compile; this runs
Triton's real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas that ships with
triton) for sm_90 by default, for fp32 and bf16 data, and prints each kernel's shared memory.
Float scalars are compiled both as eager Triton types them (fp32) and as Inductor does when a
kernel runs inside torch.compile or an AOTInductor package (fp64): an fp64 scalar must not
promote the kernel's fp32 arithmetic (on the H200 it did, and `compile` failed to build).
It must run with TRITON_INTERPRET unset or 0 (the kernels must be JIT functions).

    python -m kernels.compile_check [--arch 90] [--all-configs]
"""

from __future__ import annotations

import argparse
import os
import time

from kernels import composite, flash_attention, triplane

# Per kernel: the pointer arguments that hold data in the op's dtype (the rest are fp32), the
# fp32 scalar arguments (the rest are i32), and its configs as (constexprs, num_warps, num_stages).
_SPECS = {
    "triplane_fwd": (triplane._triplane_fwd_kernel, {"planes_ptr", "out_ptr"}, set()),
    "triplane_bwd": (triplane._triplane_bwd_kernel, {"planes_ptr", "grad_out_ptr"}, set()),
    "composite_fwd": (composite._composite_fwd_kernel,
                      {"sigmas_ptr", "rgbs_ptr", "t_ptr", "deltas_ptr", "rgb_ptr", "depth_ptr", "opacity_ptr",
                       "weights_ptr"}, set()),
    "composite_bwd": (composite._composite_bwd_kernel,
                      {"sigmas_ptr", "rgbs_ptr", "t_ptr", "deltas_ptr", "g_rgb_ptr", "g_depth_ptr",
                       "g_opacity_ptr", "g_weights_ptr"}, set()),
    "attn_fwd": (flash_attention._attn_fwd_kernel, {"q_ptr", "k_ptr", "v_ptr", "o_ptr"}, {"sm_scale"}),
    "attn_bwd_dkdv": (flash_attention._attn_bwd_dkdv_kernel,
                      {"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"}, {"sm_scale"}),
    "attn_bwd_dq": (flash_attention._attn_bwd_dq_kernel, {"q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr"},
                    {"sm_scale"}),
}


def _configs(name: str, all_configs: bool) -> list[tuple[dict, int, int]]:
    comp = {"T_MIN": composite.T_MIN, "BLOCK_R": composite._BLOCK_R, "BLOCK_S": composite._BLOCK_S}
    if name == "triplane_fwd":
        tuned = triplane._FWD_CONFIGS if all_configs else triplane._FWD_CONFIGS[:1]
        return [({"BLOCK_N": c.kwargs["BLOCK_N"], "BLOCK_C": 32}, c.num_warps, c.num_stages) for c in tuned]
    if name == "triplane_bwd":
        return [({"BLOCK_N": triplane._BWD_BLOCK_N, "BLOCK_C": 32, "NEED_POINTS_GRAD": need}, 4, 3)
                for need in (True, False)]
    if name.startswith("composite"):
        return [(comp, 4, 3)]
    tuned = flash_attention._FWD_CONFIGS if name == "attn_fwd" else flash_attention._BWD_CONFIGS
    tuned = tuned if all_configs else tuned[:1]
    head_dims = (32, 64, 128) if all_configs else (64,)
    return [({**c.kwargs, "BLOCK_D": d}, c.num_warps, c.num_stages) for c in tuned for d in head_dims]


SCALAR_TYPES = ("fp32", "fp64")  # a Python float as eager Triton types it, and as Inductor does


def compile_all(arch: int = 90, all_configs: bool = False) -> list[tuple[str, str, dict, int]]:
    """Compile each kernel and config for fp32 and bf16 data, with fp32 and fp64 float scalars; returns
    (kernel, dtype, constexprs, shared bytes), one row per data dtype (the scalar types share the row)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels' compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for dtype in ("fp32", "bf16"):
        for name, (kernel, data_ptrs, floats) in _SPECS.items():
            fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
            for consts, num_warps, num_stages in _configs(name, all_configs):
                for scalar in SCALAR_TYPES if floats else SCALAR_TYPES[:1]:
                    signature = {
                        arg: "constexpr" if arg in consts
                        else (f"*{dtype}" if arg in data_ptrs else "*fp32") if arg.endswith("_ptr")
                        else scalar if arg in floats else "i32"
                        for arg in fn.arg_names
                    }
                    compiled = triton.compile(ASTSource(fn, signature, constexprs=consts), target=target,
                                              options={"num_warps": num_warps, "num_stages": num_stages})
                    if "xf64>" in compiled.asm["ttir"]:  # compiled, but at double precision: half the speed
                        raise RuntimeError(f"{name} ({dtype} data, {scalar} scalars): tensors promoted to fp64")
                results.append((name, dtype, consts, compiled.metadata.shared))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    parser.add_argument("--all-configs", action="store_true",
                        help="every autotune config and head dims 32, 64, 128")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for name, dtype, consts, shared in compile_all(args.arch, args.all_configs):
        print(f"ok  sm_{args.arch}  {name:14s} {dtype}  shared {shared:>7d} B  {consts}")
    print(f"all kernels compiled in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
