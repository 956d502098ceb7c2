"""Shared pytest setup.

TRITON_INTERPRET must be set before triton is first imported: it makes every Triton kernel run on
the CPU through the interpreter, which is how the kernel tests check kernels without a GPU. It is
a default only (setdefault), so a GPU run can export TRITON_INTERPRET=0; it changes nothing for
tests that do not launch Triton kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# One intra-op thread: the test tensors are small, and with two threads a second busy process on a
# 2-core machine makes OpenMP spin-waits cost 10-100x (measured: a 2-s fixture took 400 s).
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# `../shared` sits beside the project in the team's checkouts and in CI; a user's clone lacks it.
# LN3DIFF_SHARED points elsewhere (a clone made in /tmp, say).
SHARED_DIR = Path(os.environ.get("LN3DIFF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
OFFICIAL_DIR = SHARED_DIR / "official-ln3diff"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a pytest skip naming what is missing and why."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared fixtures sit beside the project in CI and team checkouts only")
    return path
