"""Shared pytest setup.

TRITON_INTERPRET must be set before triton is first imported: it makes every Triton kernel run on
the CPU through the interpreter, which is how the kernel tests check kernels without a GPU. It is
a default only (setdefault), so a GPU run can export TRITON_INTERPRET=0; it changes nothing for
tests that do not launch Triton kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
