"""Textures, levels of detail and USD through every entry point: the runner (stages, progress), `ln3diff generate`
(files side by side), the gRPC server and client (each file streamed and listed with size, sha256 and name; old
requests unchanged) and the profiler's stage table. The model is conftest.py's cube checkpoint."""

import hashlib
import io

import grpc
import pytest
import trimesh

from ln3diff_rt.cli import main as cli_main
from ln3diff_rt.options import GenerationOptions
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.profile import Workload, format_table, profile
from ln3diff_rt.runner import Request, run
from serve.client import build_request
from serve.client import main as client_main
from serve.ln3diff.v1 import generator_pb2 as pb
from serve.server import ServerConfig, ServerThread
from serve.validation import Limits

FAST = GenerationOptions(steps=2, mesh_resolution=32, preview_views=0, texture=64)
FAST_RPC = dict(steps=2, mesh_resolution=32, preview_views=0)


@pytest.fixture(scope="module")
def generator(cube_checkpoint) -> Generator:
    return Generator.from_checkpoint(cube_checkpoint)


@pytest.fixture(scope="module")
def server(generator):
    st = ServerThread(lambda: generator, ServerConfig(port=0, limits=Limits(max_texture=1024))).wait_serving()
    yield st
    st.stop()


def test_runner_times_and_reports_unwrap_bake_and_lods(generator):
    events = []
    [result] = run(generator, [Request("a red cube", 1, FAST.replace(lods="1500,400"), ("glb", "obj"))],
                   progress=lambda stage, done, total, index: events.append((stage, done)))
    assert sorted(result.exports) == ["LOD0.glb", "LOD0.obj", "LOD1.glb", "LOD1.obj", "mtl", "png"]
    assert {"uv_unwrap", "bake_texture", "lods", "export"} <= set(result.timings)
    stages = [stage for stage, done in events if done == 0 and stage not in ("encode_text", "sample", "decode")]
    assert stages == ["mesh", "uv_unwrap", "bake_texture", "lods", "export"]
    lod1 = trimesh.load(io.BytesIO(result.exports["LOD1.glb"]), file_type="glb", force="mesh")
    assert len(lod1.faces) == 400 and isinstance(lod1.visual, trimesh.visual.TextureVisuals)
    [plain] = run(generator, [Request("a red cube", 1, FAST.replace(texture=0), ("glb",))])
    assert list(plain.exports) == ["glb"] and "uv_unwrap" not in plain.timings  # 0: vertex colours, no unwrap
    [levels] = run(generator, [Request("a red cube", 1, FAST.replace(texture=0, lods="400,1500"), ("ply",))])
    assert list(levels.exports) == ["LOD0.ply", "LOD1.ply"]  # any order given, most detailed first
    coarse = trimesh.load(io.BytesIO(levels.exports["LOD1.ply"]), file_type="ply", process=False)
    assert len(coarse.faces) == 400 and coarse.visual.vertex_colors.shape == (len(coarse.vertices), 4)


def test_a_missing_assets_extra_is_named_before_any_work(generator, monkeypatch):
    import importlib.util

    from ln3diff_rt.options import InvalidOption

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("pxr", "meshoptimizer") else find_spec(name, *a))
    for request, field in [(Request("a red cube", 1, FAST, ("usdz",)), "formats"),
                           (Request("a red cube", 1, FAST.replace(lods="1500"), ("glb",)), "lods")]:
        with pytest.raises(InvalidOption, match="ln3diff-rt\\[assets\\]") as info:
            list(run(generator, [request]))
        assert info.value.field == field


def test_cli_writes_obj_mtl_png_and_levels_side_by_side(cube_checkpoint, tmp_path, capsys):
    code = cli_main(["generate", "a red cube", "--ckpt", str(cube_checkpoint), "--out", str(tmp_path), "--seed", "4",
                     "--steps", "2", "--resolution", "32", "--views", "0", "--format", "obj", "--texture", "64",
                     "--lods", "1500,400", "--roughness", "0.6"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-red-cube_s4.mtl", "a-red-cube_s4.png",
                                                          "a-red-cube_s4_LOD0.obj", "a-red-cube_s4_LOD1.obj"]
    assert "Pr 0.6" in (tmp_path / "a-red-cube_s4.mtl").read_text()
    loaded = trimesh.load(tmp_path / "a-red-cube_s4_LOD1.obj", force="mesh", process=False)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals) and loaded.visual.material.image.size == (64, 64)
    for args, message in [(["--lods", "8000,abc"], "--lods='8000,abc': expected up to 8 comma-separated integers"),
                          (["--texture", "-1"], "--texture=-1: expected an integer in [0, 8192]"),
                          (["--format", "fbx"], "--format 'fbx': expected one of glb, obj, ply, usdz, usda")]:
        assert cli_main(["generate", "a red cube", "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_a_request_without_the_new_fields_gets_one_glb_as_before(client, generator):
    gen = client.generate("a red cube", seed=3, formats=["glb"], **FAST_RPC)
    [info] = gen.result.meshes
    assert (info.format, info.file_name) == ("glb", "a-red-cube_s3.glb") and list(gen.meshes) == ["glb"]
    assert info.sha256 == hashlib.sha256(gen.meshes["glb"]).hexdigest() and info.size == len(gen.meshes["glb"])
    defaults = client.model_info().defaults
    assert (defaults.texture, defaults.roughness, defaults.lods) == (1024, 1.0, "")
    assert client.model_info().limits.max_texture == 1024
    assert "bake_texture" in gen.result.timings  # textured by default (at the server's default size)


def test_every_file_streams_and_is_listed_with_size_sha256_and_name(client, tmp_path):
    gen = client.generate("a red cube", seed=5, formats=["obj"], texture=64, lods="1500,400", roughness=0.5,
                          **FAST_RPC)
    listed = {m.format: m for m in gen.result.meshes}
    assert sorted(listed) == ["LOD0.obj", "LOD1.obj", "mtl", "png"]  # the client checked every size and sha256
    assert listed["png"].file_name == "a-red-cube_s5.png" and listed["LOD1.obj"].file_name == "a-red-cube_s5_LOD1.obj"
    paths = gen.write(tmp_path / "cube.obj", "obj")
    assert sorted(p.name for p in paths) == ["a-red-cube_s5.mtl", "a-red-cube_s5.png", "cube_LOD0.obj",
                                             "cube_LOD1.obj"]
    loaded = trimesh.load(tmp_path / "cube_LOD1.obj", force="mesh", process=False)
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals) and len(loaded.faces) == 400
    streamed = client.generate("a red cube", seed=5, formats=["usdz"], texture=64, **FAST_RPC)
    assert [m.format for m in streamed.result.meshes] == ["usdz"] and streamed.meshes["usdz"][:2] == b"PK"


def test_unary_usdz(client):
    unary = client.generate_unary("a red cube", seed=5, formats=["usdz"], texture=64, **FAST_RPC)
    assert [m.format for m in unary.result.meshes] == ["usdz"] and unary.meshes["usdz"][:2] == b"PK"


@pytest.mark.parametrize("options,field", [({"lods": "1500,abc"}, "lods"), ({"lods": "50"}, "lods"),
                                           ({"texture": 2048}, "texture"), ({"roughness": 1.5}, "roughness")])
def test_bad_texture_options_are_invalid_argument(client, options, field):
    with pytest.raises(grpc.RpcError) as info:
        client.stub.GenerateUnary(build_request("a red cube", **FAST_RPC, **options), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(f"{field}=")


def test_client_cli_writes_the_files_beside_out(server, tmp_path, capsys):
    out = tmp_path / "thing.usda"
    assert client_main(["--server", f"127.0.0.1:{server.port}", "generate", "a red cube", "--out", str(out),
                        "--seed", "1", "--steps", "2", "--resolution", "32", "--texture", "64",
                        "--lods", "1500,400"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-red-cube_s1.png", "thing_LOD0.usda", "thing_LOD1.usda"]
    assert "@a-red-cube_s1.png@" in (tmp_path / "thing_LOD1.usda").read_text()  # refers to the PNG beside it


def test_profile_stage_table_has_unwrap_and_bake(generator):
    options = GenerationOptions(steps=2, mesh_resolution=32, preview_views=0, texture=128)
    result = profile(generator, Workload(1, options), repeats=1, warmup=0)
    stages = list(result["stages"])
    assert stages.index("mesh_extract") < stages.index("uv_unwrap") < stages.index("bake_texture") \
        < stages.index("export")
    assert "bake_texture" in format_table(result)


def test_result_proto_is_backward_compatible():
    """Old clients read new Results: the new MeshInfo field and request fields are additions with fresh numbers."""
    old_fields = {"format": 1, "size": 2, "sha256": 3}
    assert {f.name: f.number for f in pb.MeshInfo.DESCRIPTOR.fields if f.name in old_fields} == old_fields
    request = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    assert (request["texture"].number, request["roughness"].number, request["lods"].number) == (16, 17, 18)
    assert request["texture"].has_presence  # an explicit 0 (vertex colours) differs from unset (the default)
