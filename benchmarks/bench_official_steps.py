"""Step counts of the official text-to-3D DDPM path: how far few-step latents land from the official 250 Euler steps.

Runs the small random-weight t23d DiT of `../shared/official-ln3diff/dit-t23d-small.safetensors` on the
sampler fixture's noise and text condition (B = 2, CFG 6.5, the official schedule); the distance is the
relative L2 of the final latent to the 250-step Euler one. Random weights make the field rougher in t
than a trained model's, so these distances are an upper bound for the real checkpoint.

    python benchmarks/bench_official_steps.py [--cases euler:250 dpmpp_2m:25 ...] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ln3diff_rt.official.ddpm import sample_ddpm
from ln3diff_rt.official.dit import build_official_dit, dit_state_from_official, infer_dit_config
from ln3diff_rt.official.layout import official_to_project_latent
from ln3diff_rt.sampling import Condition

FIXTURES = Path(os.environ.get("LN3DIFF_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "official-ln3diff"
REFERENCE = ("euler", 250)


def load_inputs(fixtures: Path, device: str):
    """The small t23d DiT, the sampler fixture's noise [2, 3, 4, 32, 32] and condition."""
    state = dit_state_from_official(load_file(fixtures / "dit-t23d-small.safetensors"))
    dit = build_official_dit(infer_dit_config({k: v.shape for k, v in state.items()}))
    dit.load_state_dict(state, strict=True)
    run = load_file(fixtures / "sampler-t23d.safetensors", device=device)
    cond = Condition(run["sampler.cond.crossattn"], run["sampler.cond.vector"])
    return dit.eval().to(device), official_to_project_latent(run["sampler.noise"]), cond


def timed_sample(dit, noise, cond, method: str, steps: int) -> tuple[torch.Tensor, float]:
    if noise.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    latent = sample_ddpm(dit, noise, cond, steps=steps, method=method)
    if noise.is_cuda:
        torch.cuda.synchronize()
    return latent, 1e3 * (time.perf_counter() - start)


def run(cases: list[tuple[str, int]], fixtures: Path, device: str) -> list[dict]:
    dit, noise, cond = load_inputs(fixtures, device)
    timed_sample(dit, noise, cond, "euler", 2)  # warm-up
    reference, reference_ms = timed_sample(dit, noise, cond, *REFERENCE)
    rows = []
    for method, steps in cases:
        latent, ms = timed_sample(dit, noise, cond, method, steps)
        rows.append({"case": f"{method} {steps} steps", "method": method, "steps": steps,
                     "reference": f"{REFERENCE[0]} {REFERENCE[1]} steps", "reference_ms": reference_ms,
                     "ms": ms, "speedup": reference_ms / ms,
                     "rel_l2_to_reference": ((latent - reference).norm() / reference.norm()).item()})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<22} {'euler 250 ms':>13} {'case ms':>9} {'ratio':>7} {'rel L2 to euler 250':>20}")
    for r in rows:
        print(f"{r['case']:<22} {r['reference_ms']:>13.0f} {r['ms']:>9.0f} {r['speedup']:>6.1f}x "
              f"{r['rel_l2_to_reference']:>20.4f}")


def parse_case(text: str) -> tuple[str, int]:
    method, _, steps = text.partition(":")
    return method, int(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=parse_case, nargs="+", metavar="METHOD:STEPS",
                        default=[("euler", 250), ("dpmpp_2m", 25), ("euler", 25), ("euler", 10), ("dpmpp_2m", 10)])
    parser.add_argument("--fixtures", type=Path, default=FIXTURES, help="folder of the official-ln3diff fixtures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", nargs="?", const=str(Path(__file__).with_suffix(".json")), default=None,
                        help="write the rows as JSON (default path: next to this script)")
    args = parser.parse_args()
    rows = run(args.cases, args.fixtures, args.device)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, small t23d DiT "
          "(depth 2, width 64), B = 2, CFG 6.5")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
