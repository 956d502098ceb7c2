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


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) writes bytes as, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random-weight CLIP text model (`CLIPTextModel`, width 768 like CLIP ViT-L/14's so it feeds the official
    DiT's context, 1 layer, 77 positions, the published config's bos/pad/eos ids and quick_gelu) and a working
    `CLIPTokenizer` (a byte-level vocabulary without merges: one token per character) in a transformers
    directory, fixed seed. Builds in well under a second."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel

    path = tmp_path_factory.mktemp("tiny-clip")
    symbols = _bytes_to_unicode()
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]  # specials last, as CLIP
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=0, pad_token_id=1, eos_token_id=2)  # eos 2: pooled at the highest id's token
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPTextModel(config).eval().save_pretrained(path)
    return path
