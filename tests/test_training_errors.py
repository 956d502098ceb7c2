"""Issue 17: a training run's errors are one line and an exit code, an error after step 0 saves the state first,
and the temporary files of a killed save do not pile up. In-process runs of `training.vae.main` on a few
generated objects (a few seconds each)."""

import os
import shutil
import signal
from pathlib import Path

import pytest
from safetensors import safe_open

import training.vae as vae_training
from training.common import batch_indices
from training.data.synth import generate

SMALL = ["--steps", "4", "--batch-size", "1", "--rays-per-object", "64", "--target-views", "2", "--eval-every",
         "1000", "--warmup", "1", "--seed", "5", "--save-every", "100000"]  # only the loop's own saves write a state


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, objects=5, views=6, size=64, seed=3, val_fraction=0.3)
    return root


def train_main(data: Path, out: Path, *extra: str) -> SystemExit | None:
    """Run `python -m training.vae` in-process; the SystemExit it ended with, or None on success."""
    try:
        vae_training.main(["--data", str(data), "--out", str(out), *SMALL, *extra])
    except SystemExit as e:
        return e
    return None


def one_line_error(exit: SystemExit | None, capsys) -> str:
    """The error an entry point ended with: a SystemExit carrying one line, nothing else on stderr."""
    assert exit is not None, "the run did not fail"
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    message = str(exit.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def saved_step(out: Path) -> int:
    with safe_open(str(out / "train_state.safetensors"), "pt") as f:
        return int(f.metadata()["step"])


def test_resume_with_nothing_to_resume_is_one_line(dataset, tmp_path, capsys):
    message = one_line_error(train_main(dataset, tmp_path / "fresh", "--resume"), capsys)
    assert "no training state to resume from" in message and "--resume" in message


def test_a_dataset_without_a_valid_object_is_one_line(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "broken").mkdir(parents=True)
        (tmp_path / "data" / split / "broken" / "transforms.json").write_text("{not json")
    message = one_line_error(train_main(tmp_path / "data", tmp_path / "out"), capsys)
    assert "no valid objects" in message and "transforms.json" in message


def test_a_bad_image_after_step_0_saves_the_state_then_fails_in_one_line(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    objects = sorted(p for p in (data / "train").iterdir() if p.is_dir())
    first, second = (set(batch_indices(len(objects), 1, step, 5, 0, 1)) for step in (0, 1))
    bad = objects[min(second - first)]  # first read at step 1, after a completed step 0
    for png in bad.rglob("*.png"):  # the header stays readable, so the check at start passes
        png.write_bytes(png.read_bytes()[:200])
    out = tmp_path / "out"
    message = one_line_error(train_main(data, out, "--fail-on-bad-object"), capsys)
    assert "cannot decode image" in message and str(bad) in message
    assert saved_step(out) == 1 and "saved" in message and "--resume" in message


def test_sigterm_saves_the_state_and_exits_143_in_one_line(dataset, tmp_path, monkeypatch, capsys):
    real_collate = vae_training.collate
    before = signal.getsignal(signal.SIGTERM)

    def terminated_at_step_2(ds, idx, epoch):
        if epoch == 2:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before)  # the loop's handler is on
            os.kill(os.getpid(), signal.SIGTERM)
        return real_collate(ds, idx, epoch)

    monkeypatch.setattr(vae_training, "collate", terminated_at_step_2)
    out = tmp_path / "out"
    exit = train_main(dataset, out)
    assert exit is not None and exit.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if "interrupted" in line and "--resume" in line]
    assert saved_step(out) == 2
    assert signal.getsignal(signal.SIGTERM) is before  # the handler does not outlive the run


def test_a_killed_save_leaves_no_temporary_file_behind(dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".train_state.safetensors.x1y2z3.tmp"  # a save killed between write and rename
    stale.write_bytes(b"half a state")
    assert train_main(dataset, out, "--steps", "1") is None
    assert not stale.exists() and saved_step(out) == 1
