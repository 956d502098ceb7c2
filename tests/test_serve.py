"""The ln3diff.v1 server end to end: real grpc.aio servers on 127.0.0.1 (ephemeral ports), real clients.

The model is conftest.py's `cube_checkpoint`: random weights that give a rounded cube filling the box
for every seed, a surface to mesh and export, which is all serving needs.
"""

import concurrent.futures
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import grpc
import pytest
import trimesh
from conftest import code_of
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from ln3diff_rt.checkpoint import load_models
from ln3diff_rt.pipeline import Generator
from serve import codegen
from serve.client import Client, IntegrityError, assemble, build_request
from serve.ln3diff.v1 import generator_pb2 as pb
from serve.ln3diff.v1 import generator_pb2_grpc as pb_grpc
from serve.server import SERVICE, ServerConfig, ServerThread
from serve.validation import Limits

REPO = Path(__file__).resolve().parents[1]
# ~0.2 s a request; vertex colours (texture 0): a default 1024^2 bake alone takes seconds on a CPU, and
# tests/test_assets_serve.py covers textured assets
FAST = dict(steps=2, mesh_resolution=32, preview_views=1, preview_size=32, texture=0)
LONG_STEPS = 1000  # >= 10 s of sampling even on idle cores, so a quick follow-up proves the worker was freed


@pytest.fixture(scope="module")
def checkpoint(cube_checkpoint) -> Path:
    return cube_checkpoint  # conftest.py: every seed gives a rounded cube filling the box


@pytest.fixture(scope="module")
def generator(checkpoint) -> Generator:
    return Generator.from_checkpoint(checkpoint)


def start(generator: Generator, **config) -> ServerThread:
    return ServerThread(lambda: generator, ServerConfig(port=0, **config)).wait_serving()


@pytest.fixture(scope="module")
def server(generator):
    st = start(generator, max_batch=8, max_wait_ms=100.0, max_queue=64, metrics_port=0, object_threads=2,
               limits=Limits(max_prompt_chars=100, max_steps=LONG_STEPS))  # batches finished two objects at once
    yield st
    st.stop()


def load_glb(data: bytes) -> trimesh.Trimesh:
    return trimesh.load(io.BytesIO(data), file_type="glb", force="mesh")


# -- generated code ---------------------------------------------------------------------------------


def test_generated_stubs_are_current():
    import grpc_tools

    made_with = pb_grpc.GRPC_GENERATED_VERSION
    installed = getattr(grpc_tools, "__version__", None) or importlib.metadata.version("grpcio-tools")
    if installed != made_with:
        pytest.skip(f"stubs were generated with grpcio-tools {made_with}, {installed} is installed")
    assert codegen.stale_files() == [], "run: python -m serve.codegen"


# -- results ------------------------------------------------------------------------------------------


def test_generate_returns_a_glb_that_trimesh_loads(client):
    stages = []
    gen = client.generate("a red cube", formats=["glb", "ply"], on_progress=lambda *e: stages.append(e), **FAST)
    r = gen.result
    assert r.seed != 0 and r.steps == 2 and math.isclose(r.guidance, 3.0) and r.sampler == "euler"
    mesh = load_glb(gen.meshes["glb"])  # client.generate already checked size and sha256
    assert len(mesh.faces) == r.face_count > 100
    assert trimesh.load(io.BytesIO(gen.meshes["ply"]), file_type="ply").vertices.shape[0] == r.vertex_count
    assert [m.format for m in r.meshes] == ["glb", "ply"]
    assert len(gen.previews) == r.preview_count == 1 and gen.previews[0].startswith(b"\x89PNG")
    assert list(r.bounding_box.max) == pytest.approx([0.5, 1.0, 0.5], abs=0.01)  # a 1 m cube on the floor
    assert list(r.bounding_box.min) == pytest.approx([-0.5, 0.0, -0.5], abs=0.01)
    assert stages[0][0] == "queued"
    assert [e for e in stages if e[0] == "sample"] == [("sample", 1, 2), ("sample", 2, 2)]
    assert {"sample", "decode", "mesh", "export", "preview", "total"} <= set(r.timings)


def test_same_seed_same_mesh_streaming_and_unary(client):
    streamed = client.generate("a red cube", seed=1234, **FAST)
    unary = client.generate_unary("a red cube", seed=1234, **FAST)
    assert streamed.result.seed == unary.result.seed == 1234
    assert streamed.result.meshes[0].sha256 == unary.result.meshes[0].sha256
    assert unary.previews[0].startswith(b"\x89PNG")


def test_client_rejects_corrupt_or_reordered_chunks():
    data = b"x" * 100
    good = pb.Result(meshes=[pb.MeshInfo(format="glb", size=100, sha256=hashlib.sha256(data).hexdigest())])
    chunks = [pb.GenerateResponse(mesh_chunk=pb.MeshChunk(format="glb", offset=0, data=data[:60])),
              pb.GenerateResponse(mesh_chunk=pb.MeshChunk(format="glb", offset=60, data=data[60:]))]
    assert assemble([*chunks, pb.GenerateResponse(result=good)]).meshes["glb"] == data
    with pytest.raises(IntegrityError, match="offset"):
        assemble([chunks[1], chunks[0], pb.GenerateResponse(result=good)])
    flipped = pb.GenerateResponse(mesh_chunk=pb.MeshChunk(format="glb", offset=60, data=b"y" * 40))
    with pytest.raises(IntegrityError, match="sha256"):
        assemble([chunks[0], flipped, pb.GenerateResponse(result=good)])
    with pytest.raises(IntegrityError, match="without a result"):
        assemble(chunks)


def test_model_info(client, checkpoint):
    info = client.model_info()
    assert info.preset == "tiny" and info.backend == "eager" and info.device == "cpu"
    assert info.checkpoint_sha256 == load_models(checkpoint).sha256  # the tensors' digest, checked at load
    assert list(info.latent_shape) == [3, 4, 8, 8]
    assert info.limits.max_batch == 8 and info.limits.max_prompt_chars == 100
    assert info.defaults.steps == 8 and list(info.defaults.formats) == ["glb"]


# -- protocol services ----------------------------------------------------------------------------------


def test_health_and_reflection(client):
    assert client.health() == "SERVING"
    assert client.health(SERVICE) == "SERVING"
    db = ProtoReflectionDescriptorDatabase(client.channel)
    assert {SERVICE, "grpc.health.v1.Health"} <= set(db.get_services())
    from google.protobuf.descriptor_pool import DescriptorPool

    methods = DescriptorPool(db).FindServiceByName(SERVICE).methods_by_name
    assert set(methods) == {"Generate", "GenerateUnary", "GetModelInfo"}
    assert methods["Generate"].output_type.full_name == "ln3diff.v1.GenerateResponse"


def test_metrics_endpoint(server, client):
    client.generate("a red cube", **FAST)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'ln3diff_requests_total{code="OK",method="Generate"}' in text
    for name in ("ln3diff_stage_seconds_bucket", "ln3diff_queue_depth", "ln3diff_batch_size_count"):
        assert name in text


# -- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,options", [
    ("prompt", {"prompt": "   "}),
    ("prompt", {"prompt": "x" * 101}),
    ("steps", {"steps": LONG_STEPS + 1}),
    ("guidance", {"guidance": -1.0}),
    ("guidance", {"guidance": float("nan")}),
    ("shift", {"shift": 0.0}),
    ("sampler", {"sampler": "ddim"}),
    ("mesh_resolution", {"mesh_resolution": 8}),
    ("faces", {"faces": 10}),
    ("preview_views", {"preview_views": 99}),
    ("preview_size", {"preview_size": 4}),
    ("formats", {"formats": ["fbx"]}),
    ("formats", {"formats": ["glb", "glb"]}),
    ("formats", {"formats": ["glb"], "skip_mesh": True}),
])
def test_bad_field_is_invalid_argument(client, field, options):
    request = build_request(options.pop("prompt", "a red cube"), **FAST)
    for name, value in options.items():
        if name == "formats":
            request.formats[:] = value
        else:
            setattr(request, name, value)
    for call in (client.stub.GenerateUnary, lambda r: list(client.stub.Generate(r))):
        code, details = code_of(lambda call=call: call(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"{field}="), details


# -- cancellation, deadlines, back-pressure ---------------------------------------------------------------


def follow_up_seconds(client) -> float:
    """Time for a short request right after an abandoned long one: short only if the worker was freed."""
    t = time.monotonic()
    assert client.generate("a blue sphere", **FAST).result.face_count > 0
    return time.monotonic() - t


def test_expired_deadline_frees_the_worker(client, server):
    before = server.metrics.registry.get_sample_value(
        "ln3diff_requests_total", {"method": "GenerateUnary", "code": "DEADLINE_EXCEEDED"}) or 0
    code, _ = code_of(lambda: client.generate_unary("a red cube", timeout=1.0, **{**FAST, "steps": LONG_STEPS}))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert follow_up_seconds(client) < 5.0
    counts = {(m.labels["method"], m.labels["code"]): m.value
              for metric in server.metrics.registry.collect() if metric.name == "ln3diff_requests"
              for m in metric.samples if m.name == "ln3diff_requests_total"}
    assert counts.get(("GenerateUnary", "DEADLINE_EXCEEDED")) == before + 1, counts


def test_cancelled_call_frees_the_worker(client):
    call = client.stub.Generate(build_request("a red cube", **{**FAST, "steps": LONG_STEPS}))
    for response in call:
        if response.progress.stage == "sample" and response.progress.step >= 2:
            call.cancel()
            break
    assert call.code() == grpc.StatusCode.CANCELLED
    assert follow_up_seconds(client) < 5.0


def test_full_queue_is_resource_exhausted_and_admitted_requests_complete(generator):
    st = start(generator, max_batch=1, max_queue=2)
    try:
        with Client(f"127.0.0.1:{st.port}") as c:
            def one(i):
                try:
                    return c.generate("a red cube", seed=i + 1, **{**FAST, "steps": 10}).result
                except grpc.RpcError as e:
                    return e.code()

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                outcomes = list(pool.map(one, range(6)))
    finally:
        st.stop()
    done = [o for o in outcomes if isinstance(o, pb.Result)]
    refused = [o for o in outcomes if o == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(done) + len(refused) == 6, outcomes
    assert refused and len(done) >= 2
    assert all(r.face_count > 0 for r in done)


def test_sixteen_concurrent_clients_are_batched(server, client):
    batches_before = server.metrics.multi_request_batches()
    seeds = list(range(101, 117))
    options = {**FAST, "preview_views": 0}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda s: client.generate(f"object {s % 4}", seed=s, **options), seeds))
    assert [g.result.seed for g in results] == seeds
    assert all(len(load_glb(g.meshes["glb"]).faces) == g.result.face_count > 0 for g in results)
    assert max(g.result.batch_size for g in results) > 1
    assert server.metrics.multi_request_batches() > batches_before


# -- auth, TLS, shutdown ------------------------------------------------------------------------------------


def test_wrong_token_is_unauthenticated(generator):
    st = start(generator, token="s3cret")
    try:
        target = f"127.0.0.1:{st.port}"
        for token in ("wrong", None):
            with Client(target, token=token) as c:
                code, details = code_of(c.model_info)
                assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details
                assert code_of(lambda c=c: c.generate("a red cube", **FAST))[0] == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"  # probes need no token
        with Client(target, token="s3cret") as c:
            assert c.model_info().preset == "tiny"
            assert c.generate("a red cube", **FAST).result.face_count > 0
    finally:
        st.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls(generator, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    st = start(generator, tls_cert=cert, tls_key=key)
    try:
        with Client(f"localhost:{st.port}", root_certificates=cert.read_bytes()) as c:
            assert c.generate("a red cube", **FAST).result.face_count > 0
        with Client(f"localhost:{st.port}") as plain:  # plaintext to a TLS port fails
            assert code_of(lambda: plain.model_info(timeout=3))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        st.stop()


def test_graceful_stop_finishes_in_flight_requests(generator):
    st = start(generator)
    with Client(f"127.0.0.1:{st.port}") as c:
        sampling = threading.Event()
        outcome = {}

        def run():
            try:
                outcome["result"] = c.generate("a red cube", on_progress=lambda s, *_: s == "sample" and sampling.set(),
                                               **{**FAST, "steps": 20}).result
            except grpc.RpcError as e:
                outcome["error"] = e.code()

        worker = threading.Thread(target=run)
        worker.start()
        assert sampling.wait(30)
        st.stop(grace=30.0)
        worker.join(30)
        assert outcome.get("result") is not None and outcome["result"].face_count > 0, outcome
        assert code_of(lambda: c.model_info(timeout=3))[0] == grpc.StatusCode.UNAVAILABLE


# -- the command lines and the Blender job runner --------------------------------------------------------------


def test_stop_cancels_requests_still_running_after_the_grace_period(generator):
    st = start(generator, limits=Limits(max_steps=LONG_STEPS))
    with Client(f"127.0.0.1:{st.port}") as c:
        call = c.stub.Generate(build_request("a red cube", **{**FAST, "steps": LONG_STEPS}))
        assert next(call).progress.stage == "queued"
        t = time.monotonic()
        st.stop(grace=0.5)
        assert time.monotonic() - t < 5.0  # the worker dropped the batch instead of running 1000 steps
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def test_not_serving_until_the_model_is_loaded(generator):
    release = threading.Event()
    st = ServerThread(lambda: release.wait(30) and generator, ServerConfig(port=0))
    try:
        with Client(f"127.0.0.1:{st.port}") as c:
            assert c.health() == "NOT_SERVING" and c.health(SERVICE) == "NOT_SERVING"
            code, details = code_of(lambda: c.generate("a red cube", **FAST))
            assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
            release.set()
            st.wait_serving()
            assert c.health() == "SERVING"
    finally:
        release.set()
        st.stop()


def test_server_flags_are_checked(tmp_path, capsys):
    from serve.__main__ import parse_args

    for argv, message in ((["--ckpt", str(tmp_path / "missing.safetensors")], "no such file"),
                          (["--tls-cert", str(tmp_path / "c.pem")], "go together"),
                          (["--max-batch", "0"], "at least 1"),
                          (["--precision", "fp16"], "invalid choice: 'fp16'")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    assert parse_args(["--precision", "bf16"]).precision == "bf16" and parse_args([]).precision == "fp32"


def test_cli_server_and_client_end_to_end(checkpoint, tmp_path):
    """python -m serve logs JSON, answers python -m serve.client, and exits 0 on SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--ckpt", str(checkpoint), "--port", "0"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if line.startswith("{"):
                lines.append(json.loads(line))
                if lines[-1]["msg"] == "listening":
                    port = lines[-1]["port"]
                if lines[-1]["msg"] == "serving":
                    break
            elif proc.poll() is not None:
                break
        assert port and lines[-1]["msg"] == "serving", lines
        out = tmp_path / "a.glb"
        client = subprocess.run([sys.executable, "-m", "serve.client", "--server", f"127.0.0.1:{port}", "generate",
                                 "a red cube", "--out", str(out), "--steps", "2", "--resolution", "32"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr
        assert "sha256 verified" in client.stdout and "seed=" in client.stdout
        assert len(load_glb(out.read_bytes()).faces) > 0
        bad = subprocess.run([sys.executable, "-m", "serve.client", "--server", f"127.0.0.1:{port}", "generate",
                              "a red cube", "--out", str(out), "--steps", "5000"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "INVALID_ARGUMENT: steps=5000" in bad.stderr and "Traceback" not in bad.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert all(line.startswith("{") for line in proc.stderr.read().splitlines() if line.strip())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_blender_generation_job_fetches_a_glb(server, tmp_path):
    spec = importlib.util.spec_from_file_location("ln3diff_blender", REPO / "examples/blender/ln3diff_blender.py")
    addon = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(addon)  # no bpy needed: the Blender classes are built in register()
    job = addon.GenerationJob(f"127.0.0.1:{server.port}", "a red cube", tmp_path, seed=7, steps=2,
                              mesh_resolution=32).start()
    job.wait(60)
    assert job.done and job.error is None, job.error
    assert job.path.name == "ln3diff_7.glb" and job.fraction == 1.0
    assert len(load_glb(job.path.read_bytes()).faces) > 0
    bad = addon.GenerationJob(f"127.0.0.1:{server.port}", "", tmp_path).start()
    bad.wait(30)
    assert bad.done and bad.error.startswith("INVALID_ARGUMENT: prompt=")


def test_result_and_model_info_carry_prompt_warnings_and_vocabulary(client):
    long_prompt = "a " * 40  # 42 tokens with the markers: more than the 32 the tiny model's text encoder reads
    result = client.generate(long_prompt.strip(), **FAST).result
    assert len(result.warnings) == 1 and "the text encoder reads the first 32" in result.warnings[0]
    assert list(client.generate("a red cube", **FAST).result.warnings) == []
    info = client.model_info()
    assert info.text_input and not info.image_input and list(info.vocabulary) == []


def test_a_second_server_on_a_bound_port_fails_instead_of_sharing_it(server, generator):
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}: the port is in use"):
        ServerThread(lambda: generator, ServerConfig(port=server.port))


def test_blender_addon_zip_carries_its_client_and_fetches_a_glb(server, tmp_path):
    """The zip alone (no checkout on sys.path): its vendored client and stubs talk to a real server."""
    from serve.blender_addon import build_zip

    with zipfile.ZipFile(build_zip(tmp_path / "addon.zip")) as z:
        z.extractall(tmp_path / "addons")
    script = (f"import sys; sys.path.insert(0, {str(tmp_path / 'addons')!r})\n"
              "import ln3diff_blender as addon\n"
              f"job = addon.GenerationJob('127.0.0.1:{server.port}', 'a red cube', {str(tmp_path / 'out')!r}, "
              "seed=3, steps=2, mesh_resolution=32).start()\n"
              "job.wait(60)\n"
              "import serve.client\n"
              "print(job.error, job.path, serve.client.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    error, path, client_file = proc.stdout.split()
    assert error == "None" and path.endswith("ln3diff_3.glb"), proc.stderr
    assert client_file.startswith(str(tmp_path / "addons" / "ln3diff_blender" / "vendor"))  # not the checkout's
