"""The latency profiler: runs in seconds on the shipped tiny model, reports every stage, stages add up."""

import json

from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.profile import Workload, format_table, main, profile, random_weight_generator


def test_profile_shipped_model_has_every_stage_and_adds_up():
    gen = Generator.from_checkpoint()
    options = GenerationOptions(steps=4, mesh_resolution=48, preview_views=1, preview_size=32, faces=0)
    result = profile(gen, Workload(1, options), repeats=2, warmup=1)
    stages = set(result["stages"])
    expected = {"encode_text", "decode", "field_queries", "mesh_extract", "export", "preview"}
    assert expected <= stages
    assert {f"denoise_step_{i:02d}" for i in range(1, 5)} <= stages
    for s in result["stages"].values():
        assert 0 < s["median"] <= s["p90"]
    e2e = result["end_to_end"]["median"]
    assert abs(result["stage_sum_median"] - e2e) < 0.1 * e2e
    assert 100 < result["peak_memory_mb"] < 64 * 1024  # MiB: a process with torch and a model holds a few hundred
    assert "end to end" in format_table(result)


def test_profile_cli_random_preset_writes_json(tmp_path):
    out = tmp_path / "profile.json"
    assert main(["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--steps", "2", "--no-mesh",
                 "--views", "0", "--batch-sizes", "1,2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["batch_size"] for r in results] == [1, 2]
    assert all("denoise_step_02" in r["stages"] for r in results)


def test_random_weight_generator_text_matches_context_width():
    gen = random_weight_generator("tiny", "cpu")
    cond = gen.components.text_encoder(["a red cube"])
    assert cond.context.shape[-1] == gen.config.dit.context_dim


def test_profile_cli_rejects_unknown_backend(capsys):
    assert main(["--preset", "tiny", "--compare", "eager,warp"]) == 2
    assert "unknown backend 'warp'" in capsys.readouterr().err


def test_cold_profile_times_fresh_processes_and_breaks_one_down(tmp_path, capsys):
    out = tmp_path / "cold.json"
    assert main(["--cold", "--repeats", "1", "--views", "0", "--texture", "0", "--resolution", "40",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("ln3diff generate 'a red cube' --out OUT")
    assert all(flag in result["command"] for flag in ("--views 0", "--texture 0", "--resolution 40"))
    assert len(result["whole_process"]["runs"]) == 1 and result["whole_process"]["median"] > 0.5
    phases = result["breakdown"]
    for phase in ("imports", "checkpoint", "text_encoder", "request: sample", "request: mesh", "write files"):
        assert phases[phase] > 0, phase
    assert "request: preview" not in phases and "request: bake_texture" not in phases  # the flags reached the child
    packages = result["imports_by_package"]
    assert packages["torch"] > 0.1 and "transformers" not in packages  # the shipped model needs no transformers
    assert "whole process, median of 1" in capsys.readouterr().out


def test_import_breakdown_attributes_self_time_to_top_level_packages():
    from ln3diff_rt.cold_start import import_breakdown

    stderr = ("import time: self [us] | cumulative | imported package\n"
              "import time:       150 |        150 |     torch._C\n"
              "import time:      1000 |       1150 |   torch\n"
              "import time:        20 |         20 | numpy\n"
              "some other line\n")
    assert import_breakdown(stderr) == {"torch": 1150e-6, "numpy": 20e-6}
