"""AOTInductor (.pt2, CPU) engines of the tiny model against eager: denoiser, decoder and field at batch 1
and 4, and full requests (latents, mesh vertex counts). The text encoder stays eager here, which the
manifest says (its AOTInductor export is in test_export_aoti_text.py): three compiles per test session
(~40 s on two loaded cores)."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, check_components_match_eager, check_generate_matches_eager

from export.build_engine import build_engine, summary_table
from export.manifest import read_manifest
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.text import TextEncoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, random_tiny_checkpoint):
    ckpt = random_tiny_checkpoint
    engine_dir = tmp_path_factory.mktemp("aoti")
    build_engine(ckpt, engine_dir, "aoti", batch_sizes=[1, 4], components=("denoiser", "decoder", "field"),
                 progress=False)
    eager = Generator.from_checkpoint(ckpt)
    engine = Generator.from_checkpoint(ckpt, backend="aoti", engine_dir=engine_dir)
    return ckpt, engine_dir, eager, engine


def test_manifest_and_summary(built):
    _, engine_dir, _, engine = built
    manifest = read_manifest(engine_dir)
    assert manifest.backend == "aoti" and manifest.device == "cpu" and manifest.versions["torch"] == torch.__version__
    text = manifest.entry("text_encoder")
    assert text.backend == "eager" and text.file is None
    assert isinstance(engine.components.text_encoder, TextEncoder)  # the eager module, as the manifest says
    for name in ("denoiser", "decoder", "field"):
        entry = manifest.entry(name)
        assert entry.file == f"{name}.pt2" and (engine_dir / entry.file).is_file()
        assert entry.exporter == "torch.export+aoti"
        assert max(entry.max_abs_error.values()) < TOLERANCES[name]
    assert manifest.entry("field").extra["form"] == "projected"  # the gather form (models/projected_field.py)
    table = summary_table(manifest).splitlines()
    assert table[0].split()[:5] == ["component", "backend", "file", "size", "seconds"]
    assert "stays eager" in table[1] and "stays eager" in table[2] and "denoiser.pt2" in table[3]  # text, image


@pytest.mark.parametrize("batch", [1, 4])
def test_components_match_eager(built, batch):
    _, _, eager, engine = built
    check_components_match_eager(eager.components, engine.components, eager.config, batch)


@pytest.mark.parametrize("batch", [1, 4])
def test_generate_matches_eager(built, batch):
    _, _, eager, engine = built
    check_generate_matches_eager(eager, engine, batch)
