"""The cluster extra on a local Ray instance (2 CPUs): the ln3diff.v1 service through Ray Serve's gRPC proxy on
127.0.0.1, and `ln3diff batch` on Ray Data. Skipped where Ray is not installed.

One replica of conftest.py's `cube_checkpoint` (every seed gives a rounded cube) serves everything; starting Ray
and Serve takes most of the time (about 15 s each on two busy cores).
"""

import io
import json
import os
import socket
import time
from pathlib import Path

import grpc
import pytest
import trimesh
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

ray = pytest.importorskip("ray", reason="the cluster extra (ray[serve,data]) is not installed")
from ray import serve  # noqa: E402

from ln3diff_rt.batch import MANIFEST, ModelSpec, run_batch  # noqa: E402
from serve.client import Client, build_request  # noqa: E402
from serve.ln3diff.v1 import generator_pb2_grpc as pb_grpc  # noqa: E402
from serve.ray_app import CONFIG, GRPC_SERVICERS, REPLICA_METADATA, build_app  # noqa: E402
from serve.server import SERVICE  # noqa: E402

pytestmark = pytest.mark.slow
FAST = dict(steps=2, mesh_resolution=32, preview_views=1, preview_size=32)
LONG_STEPS = 1000  # >= 10 s of sampling even on idle cores, so a quick follow-up proves the replica was freed
TIMEOUT = 120.0  # per RPC: generous for two busy cores, so a broken proxy fails instead of hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def proxy(local_ray, cube_checkpoint) -> str:
    """The application on one CPU replica behind Ray Serve's gRPC proxy; yields its address."""
    # Ray gives its proxy actor a fixed 60 s to start (serve/_private/constants.py: HTTP_PROXY_TIMEOUT); on two
    # cores busy with other work that was seen to run out once, killing the proxy. One more try covers that.
    for attempt in (1, 2):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                        grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS})
            serve.run(build_app({"ckpt": str(cube_checkpoint), "max_batch": 4, "max_wait_ms": 20,
                                 "limits": {"max_steps": LONG_STEPS}}), name="ln3diff")
            break
        except ray.exceptions.RayError:
            serve.shutdown()
            if attempt == 2:
                raise
    yield f"127.0.0.1:{port}"
    serve.shutdown()


def test_config_files_are_valid_for_ray():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    rayservice = yaml.safe_load(CONFIG.with_name("rayservice.yaml").read_text())
    for text in (CONFIG.read_text(), rayservice["spec"]["serveConfigV2"]):  # `serve run`'s, and KubeRay's
        config = ServeDeploySchema.model_validate(yaml.safe_load(text))
        assert config.grpc_options.grpc_servicer_functions == GRPC_SERVICERS
        assert config.applications[0].import_path == "serve.ray_app:build_app"


def test_generate_streams_a_glb_through_the_proxy(proxy, cube_checkpoint):
    with Client(proxy) as client:
        assert client.health(SERVICE, timeout=TIMEOUT) == "SERVING"  # answered by a warm replica
        info = client.model_info(timeout=TIMEOUT)
        assert info.preset == "tiny" and info.device == "cpu" and info.limits.max_batch == 4
        stages = []
        got = client.generate("a red cube", seed=5, timeout=TIMEOUT, on_progress=lambda s, *_: stages.append(s),
                              **FAST)  # sizes and sha256 checked against the Result by `assemble`
    assert got.result.seed == 5 and got.result.steps == 2 and len(got.previews) == 1
    assert stages[0] == "queued" and stages.count("sample") == 2 and "mesh" in stages
    mesh = trimesh.load(io.BytesIO(got.meshes["glb"]), file_type="glb", force="mesh")
    assert len(mesh.faces) == got.result.face_count > 0

    stub = pb_grpc.GeneratorStub(grpc.insecure_channel(proxy))
    call = stub.Generate(build_request("a red cube", seed=5, **FAST), timeout=TIMEOUT)
    messages = list(call)
    assert messages[-1].result.meshes == got.result.meshes  # the same seed, the same bytes
    assert dict(call.trailing_metadata())[REPLICA_METADATA]  # which replica ran it
    unary = stub.GenerateUnary(build_request("a red cube", seed=5, **FAST), timeout=TIMEOUT)
    assert unary.meshes[0].data == got.meshes["glb"]


def test_errors_health_and_reflection(proxy):
    channel = grpc.insecure_channel(proxy)
    stub = pb_grpc.GeneratorStub(channel)
    with pytest.raises(grpc.RpcError) as bad:
        list(stub.Generate(build_request("a red cube", steps=5000), timeout=TIMEOUT))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details() == f"steps=5000: expected an integer in [1, {LONG_STEPS}]"  # the app's limits
    with pytest.raises(grpc.RpcError) as big:  # refused before any work, as ln3diff-serve does
        stub.GenerateUnary(build_request("a red cube", faces=200_000), timeout=TIMEOUT)
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_unary_reply_bytes" in big.value.details()
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert SERVICE in ProtoReflectionDescriptorDatabase(channel).get_services()  # Ray's proxy serves reflection


def test_deadline_frees_the_replica(proxy):
    with Client(proxy) as client:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            client.generate("a red cube", timeout=2.0, steps=LONG_STEPS, skip_mesh=True, preview_views=0)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        client.generate("a red cube", timeout=TIMEOUT, steps=1, skip_mesh=True, preview_views=0)
    assert time.monotonic() - start < 8.0  # the long request stopped at a sampling step, not after 1000


def test_batch_on_ray_data_resumes(local_ray, tmp_path, cube_checkpoint):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na wooden chair\na blue teapot\n")
    overrides = dict(steps=1, guidance=1.0, mesh_resolution=16, preview_views=1, preview_size=16)
    model = ModelSpec(str(cube_checkpoint), "cpu")
    summary = run_batch(prompts, tmp_path / "out", model, overrides, ("glb",), batch_size=2, ray="local", workers=1)
    assert (summary.total, summary.skipped, summary.made) == (3, 0, 3)
    records = [json.loads(line) for line in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    assert all(int(r["worker"].split(":")[1]) != os.getpid() for r in records)  # made in a Ray worker
    assert all(Path(tmp_path / "out" / f["path"]).stat().st_size == f["bytes"] for r in records for f in r["files"])
    again = run_batch(prompts, tmp_path / "out", model, overrides, ("glb",), batch_size=2, ray="local", workers=1)
    assert (again.skipped, again.made) == (3, 0)
