"""Where a cold `ln3diff generate` spends its time: the whole process, and a breakdown of one like it.

    python -m ln3diff_rt.profile --cold [--repeats 5] [any generation flag: --texture 0 --views 0 ...]

The headline is the wall time of the real command (`python -m ln3diff_rt.cli generate PROMPT --out DIR ...`),
median of `repeats` fresh processes. The breakdown comes from one more fresh process that does what the command
does, timing each phase: interpreter start, imports (with `-X importtime`, attributed to the top-level package
that pays them), checkpoint, text encoder, each stage of the first request, writing the files. The phases do
not add up to the headline exactly: they come from another process on a noisy machine.

This module imports nothing heavy at its top, so that the child's import timings are the command's own.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red cube"


def _generate_args(out: str, changes: dict, seed: int) -> list[str]:
    from ln3diff_rt.options import flag_name

    flags = [str(item) for name, value in changes.items() for item in (flag_name(name), value)]
    return ["generate", PROMPT, "--out", out, *flags, "--seed", str(seed)]


def child(out: str, changes: dict, seed: int) -> dict:
    """The phases of one cold generation, in this (fresh) process: what `cli.generate` does, timed apart."""
    phases: dict[str, float] = {}
    t = time.perf_counter()
    import ln3diff_rt.cli  # noqa: F401  (the command's own module-level imports)
    from ln3diff_rt.checkpoint import load_models
    from ln3diff_rt.outputs import write_result
    from ln3diff_rt.pipeline import DEFAULT_CHECKPOINT, Generator, eager_components
    from ln3diff_rt.runner import Request, run

    phases["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    models = load_models(DEFAULT_CHECKPOINT, "cpu", require=("vae", "dit"))
    phases["checkpoint"] = time.perf_counter() - t
    t = time.perf_counter()
    components = eager_components(models, "cpu")
    phases["text_encoder"] = time.perf_counter() - t
    gen = Generator(models, "cpu", components)
    options = gen.default_options().replace(**changes).validate()
    (result,) = run(gen, [Request(PROMPT, seed, options, ("glb",))])
    for stage, seconds in result.timings.items():
        phases[f"request: {stage}"] = seconds
    t = time.perf_counter()
    write_result(result, out)
    phases["write files"] = time.perf_counter() - t
    return phases


def import_breakdown(stderr: str) -> dict[str, float]:
    """`-X importtime` lines -> seconds of self time per top-level package, largest first."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        package = name.strip().split(".")[0]
        totals[package] = totals.get(package, 0.0) + int(self_us) / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return seconds, proc


def profile_cold(repeats: int, changes: dict) -> dict:
    """Median wall time of `repeats` cold `ln3diff generate` processes with the option `changes` (field -> value;
    the rest keep the model's defaults), and one process's breakdown."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        startup = statistics.median(_timed([sys.executable, "-c", "pass"], env)[0] for _ in range(3))
        walls = [_timed([sys.executable, "-m", "ln3diff_rt.cli", *_generate_args(tmp, changes, i)], env)[0]
                 for i in range(repeats)]
        report = Path(tmp) / "phases.json"
        code = (f"import json, sys; from ln3diff_rt.cold_start import child; "
                f"json.dump(child({tmp!r}, {changes!r}, 0), open({str(report)!r}, 'w'))")
        wall, proc = _timed([sys.executable, "-X", "importtime", "-c", code], env)
        phases = json.loads(report.read_text())
    return {"command": "ln3diff " + shlex.join(_generate_args("OUT", changes, 0)),
            "whole_process": {"median": statistics.median(walls), "min": min(walls), "max": max(walls),
                              "runs": walls},
            "interpreter_start": startup, "breakdown": phases, "breakdown_process": wall,
            "imports_by_package": import_breakdown(proc.stderr), "threads": os.environ.get("OMP_NUM_THREADS")}


def format_cold(result: dict, top: int = 8) -> str:
    whole = result["whole_process"]
    lines = [f"cold start: {result['command']}",
             f"whole process, median of {len(whole['runs'])}: {whole['median']:.2f} s "
             f"({whole['min']:.2f}-{whole['max']:.2f})",
             f"breakdown (one more process, {result['breakdown_process']:.2f} s under -X importtime):",
             f"{'phase':<28} {'ms':>8}", f"{'interpreter start':<28} {result['interpreter_start'] * 1e3:>8.0f}"]
    lines += [f"{phase:<28} {seconds * 1e3:>8.0f}" for phase, seconds in result["breakdown"].items()]
    lines.append("imports by package (self time under -X importtime, which inflates it):")
    packages = list(result["imports_by_package"].items())
    lines += [f"  {name:<26} {seconds * 1e3:>8.0f}" for name, seconds in packages[:top]]
    rest = sum(seconds for _, seconds in packages[top:])
    lines.append(f"  {'(the rest)':<26} {rest * 1e3:>8.0f}")
    return "\n".join(lines)
