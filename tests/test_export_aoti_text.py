"""The text encoder's transformer as an AOTInductor package (tokenizer kept in Python) against eager:
one compile of MiniLM per test session (~20 s), the other components left eager in the manifest."""

from __future__ import annotations

import pytest
from conftest import PROMPTS, TOLERANCES, max_error

from export.build_engine import build_engine
from ln3diff_rt.pipeline import Generator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generators(tmp_path_factory, random_tiny_checkpoint):
    ckpt = random_tiny_checkpoint
    engine_dir = tmp_path_factory.mktemp("aoti_text")
    manifest = build_engine(ckpt, engine_dir, "aoti", batch_sizes=[1, 4], components=("text_encoder",),
                            progress=False)
    assert [e.backend for e in manifest.components] == ["aoti", "eager", "eager", "eager", "eager"]
    return Generator.from_checkpoint(ckpt), Generator.from_checkpoint(ckpt, backend="aoti", engine_dir=engine_dir)


@pytest.mark.parametrize("batch", [1, 4])
def test_text_conditions_match_eager(generators, batch):
    eager, engine = generators
    assert engine.components.denoiser is engine.models.dit  # left eager
    prompts = ["", *PROMPTS][:batch]  # the unconditional "" prompt included
    ref, got = eager.components.text_encoder(prompts), engine.components.text_encoder(prompts)
    assert got.context.shape == ref.context.shape == (batch, 32, 384)
    assert max_error(got.context, ref.context) < TOLERANCES["text_encoder"]
    assert max_error(got.pooled, ref.pooled) < TOLERANCES["text_encoder"]
