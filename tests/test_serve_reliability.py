"""Issue 17: no request can hold the worker, no error is a traceback, no long value is echoed, auth details.

Each test reproduces one failure found by fault and abuse tests, against real servers on 127.0.0.1 (ephemeral
ports) with conftest.py's `cube_checkpoint` (every seed gives a rounded cube filling the box, so every preview
ray hits and every mesh has a surface). Times are generous bounds on measured values, never sleeps.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import code_of
from google.protobuf.message import DecodeError

from ln3diff_rt.checkpoint import file_sha256, load_models
from ln3diff_rt.pipeline import Generator
from serve.client import Client, build_request
from serve.ln3diff.v1 import generator_pb2 as pb
from serve.server import SERVICE, ServerConfig, ServerThread
from serve.validation import Limits

REPO = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, mesh_resolution=32, preview_views=1, preview_size=32)  # ~0.2 s a request
# 16 frames of 512 px: about a minute a frame on two busy CPU cores, 64 ray chunks each.
BIG_PREVIEWS = dict(steps=2, preview_views=16, preview_size=512, skip_mesh=True)


@pytest.fixture(scope="module")
def generator(cube_checkpoint) -> Generator:
    return Generator.from_checkpoint(cube_checkpoint)


def start(generator: Generator, **config) -> ServerThread:
    return ServerThread(lambda: generator, ServerConfig(port=0, **config)).wait_serving()


@pytest.fixture(scope="module")
def server(generator):
    st = start(generator, max_wait_ms=10.0, metrics_port=0, limits=Limits(max_preview_pixels=16 * 512 * 512))
    yield st
    st.stop()


def count(server: ServerThread, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value("ln3diff_requests_total", {"method": method, "code": code}) or 0


def eventually(condition, timeout: float = 10.0) -> bool:
    """Whether `condition()` holds within `timeout` seconds: the server counts and logs an RPC just after the
    client has its status."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def counted(server: ServerThread, method: str, code: str, expected: float) -> bool:
    return eventually(lambda: count(server, method, code) == expected)


# -- 1. head-of-line blocking: cancellation per ray chunk, costs bounded up front, shutdown -------------------------


def test_a_request_past_its_deadline_in_a_big_preview_frees_the_worker_within_a_chunk(client):
    """The deadline passes inside the first 512 px frame; the next request waits one ray chunk, not the frame."""
    t = time.monotonic()
    code, _ = code_of(lambda: client.generate("a red cube", timeout=3.0, **BIG_PREVIEWS))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t < 10.0
    follow_up = client.generate("a blue sphere", **FAST).result
    assert follow_up.face_count > 0
    assert follow_up.timings["queue"] < 5.0, follow_up.timings  # a frame takes far longer than this


def test_preview_cost_is_bounded_up_front_and_advertised(generator):
    st = start(generator)  # the default limits
    try:
        with Client(f"127.0.0.1:{st.port}") as c:
            limits = c.model_info().limits
            assert limits.max_preview_pixels == Limits().max_preview_pixels < 16 * 512 * 512
            code, details = code_of(lambda: c.generate("a red cube", timeout=10.0, **BIG_PREVIEWS))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.startswith("preview_views=16") and str(limits.max_preview_pixels) in details, details
    finally:
        st.stop()


def test_sigterm_during_big_previews_exits_0_within_the_grace_period_and_a_chunk(cube_checkpoint, tmp_path):
    grace = 1.0
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--ckpt", str(cube_checkpoint), "--port", "0",
                             "--grace", str(grace)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            record = json.loads(line) if line.startswith("{") else {}
            port = record.get("port", port)
            if record.get("msg") == "serving":
                break
        assert port, "the server did not start"
        with Client(f"127.0.0.1:{port}") as c:
            call = c.stub.Generate(build_request("a red cube", **{**BIG_PREVIEWS, "preview_views": 4}))
            assert any(r.progress.stage == "preview" for r in call)  # the frames are being rendered now
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            assert time.monotonic() - t < grace + 10.0  # a 512 px frame takes far longer than this
            call.cancel()
        assert "terminate called" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 2. the served checkpoint's digest ------------------------------------------------------------------------------


def test_model_info_reports_the_verified_tensor_digest(client, cube_checkpoint):
    info = client.model_info()
    assert info.checkpoint_sha256 == load_models(cube_checkpoint).sha256 != file_sha256(cube_checkpoint)


# -- 3. long bad values are quoted short ----------------------------------------------------------------------------


@pytest.mark.parametrize("field,change,length", [
    ("prompt", {"prompt": " " * (1 << 20)}, "1048576 chars"),
    ("sampler", {"sampler": "x" * (1 << 20)}, "1048576 chars"),
    ("formats", {"formats": ["glb"] * 10_000}, "10000 items"),
])
def test_a_long_rejected_value_is_quoted_short_with_its_length(server, client, field, change, length):
    request = build_request(change.pop("prompt", "a red cube"), **FAST)
    for name, value in change.items():
        if name == "formats":
            request.formats[:] = value
        else:
            setattr(request, name, value)
    before = count(server, "GenerateUnary", "INVALID_ARGUMENT")
    code, details = code_of(lambda: client.stub.GenerateUnary(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}=") and length in details and len(details) < 400, details[:500]
    assert counted(server, "GenerateUnary", "INVALID_ARGUMENT", before + 1)


# -- 4. undecodable requests ----------------------------------------------------------------------------------------

GARBAGE = {
    "random bytes": bytes.fromhex("0bad5eed" * 8),
    "truncated message": build_request("a red cube", **FAST).SerializeToString()[:-3],
    "bad varint": b"\x18" + b"\xff" * 11,  # steps (field 3) as an 11-byte varint
}


def raw_call(channel: grpc.Channel, method: str, data: bytes, metadata=()):
    """One call with the request bytes as given (no serialisation); the reply stays undecoded too."""
    path = f"/{SERVICE}/{method}"
    if method == "Generate":
        return list(channel.unary_stream(path)(data, timeout=10, metadata=metadata))
    return channel.unary_unary(path)(data, timeout=10, metadata=metadata)


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_an_undecodable_request_is_invalid_argument_counted_and_logged_in_one_line(server, client, kind, caplog):
    with pytest.raises(DecodeError):  # the bytes really are no GenerateRequest
        pb.GenerateRequest.FromString(GARBAGE[kind])
    caplog.set_level(logging.INFO)
    for method in ("Generate", "GenerateUnary"):
        before = count(server, method, "INVALID_ARGUMENT")
        code, details = code_of(lambda method=method: raw_call(client.channel, method, GARBAGE[kind]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request="), details
        assert counted(server, method, "INVALID_ARGUMENT", before + 1)
    rpc_lines = lambda: [r for r in caplog.records if r.getMessage() == "rpc"]  # noqa: E731
    assert eventually(lambda: len(rpc_lines()) == 2), rpc_lines()
    assert all(r.fields["code"] == "INVALID_ARGUMENT" for r in rpc_lines())
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_the_token_is_checked_before_the_request_is_decoded(generator):
    st = start(generator, token="s3cret")
    try:
        with Client(f"127.0.0.1:{st.port}") as c:
            garbage = GARBAGE["random bytes"]
            code, _ = code_of(lambda: raw_call(c.channel, "GenerateUnary", garbage, [("authorization", "Bearer x")]))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert counted(st, "GenerateUnary", "UNAUTHENTICATED", 1)
            good = [("authorization", "Bearer s3cret")]
            code, _ = code_of(lambda: raw_call(c.channel, "GenerateUnary", garbage, good))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert counted(st, "GenerateUnary", "INVALID_ARGUMENT", 1)
    finally:
        st.stop()


# -- 5. GenerateUnary past the receive limit ------------------------------------------------------------------------


def test_a_unary_reply_over_the_advertised_limit_is_refused_before_any_work(server, client):
    assert client.model_info().limits.max_unary_reply_bytes == 4 << 20  # gRPC's default receive limit
    samples_before = server.metrics.registry.get_sample_value("ln3diff_batch_size_count") or 0
    t = time.monotonic()
    code, details = code_of(lambda: client.generate_unary("a red cube", mesh_resolution=256, faces=200_000,
                                                          formats=["glb", "obj", "ply"], timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("faces=200000") and "max_unary_reply_bytes" in details and "Generate" in details
    assert time.monotonic() - t < 5.0
    assert (server.metrics.registry.get_sample_value("ln3diff_batch_size_count") or 0) == samples_before
    assert client.generate("a red cube", mesh_resolution=32, faces=200_000, formats=["glb", "obj", "ply"],
                           preview_views=0, steps=2).result.face_count > 0  # streaming has no such limit


def test_a_unary_reply_is_measured_before_it_is_sent(generator, monkeypatch):
    import serve.server

    monkeypatch.setattr(serve.server, "unary_reply_bytes", lambda spec: 0)  # an estimate that misses
    st = start(generator, limits=Limits(max_unary_reply_bytes=10_000))
    try:
        with Client(f"127.0.0.1:{st.port}") as c:
            code, details = code_of(lambda: c.generate_unary("a red cube", **{**FAST, "preview_views": 0}))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "Generate" in details, details
            assert counted(st, "GenerateUnary", "INVALID_ARGUMENT", 1) and count(st, "GenerateUnary", "OK") == 0
    finally:
        st.stop()


# -- 6. auth details ------------------------------------------------------------------------------------------------


def test_several_authorization_headers_are_refused(generator):
    st = start(generator, token="s3cret")
    try:
        with Client(f"127.0.0.1:{st.port}") as c:
            twice = [("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")]
            code, details = code_of(lambda: c.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=twice, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "one" in details, details
            assert c.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=twice[1:], timeout=10).preset == "tiny"
    finally:
        st.stop()


def test_token_from_a_file_or_the_environment_and_the_bare_flag_warns(tmp_path, monkeypatch, caplog):
    from serve.__main__ import parse_args, token_of

    monkeypatch.delenv("LN3DIFF_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    caplog.set_level(logging.WARNING)
    assert token_of(parse_args(["--token-file", str(token_file)])) == "from-file"
    assert token_of(parse_args([])) is None
    monkeypatch.setenv("LN3DIFF_TOKEN", "from-env")
    assert token_of(parse_args([])) == "from-env"
    assert not caplog.records
    assert token_of(parse_args(["--token", "on-the-command-line"])) == "on-the-command-line"
    assert any("--token-file" in r.getMessage() for r in caplog.records)
    with pytest.raises(SystemExit):
        parse_args(["--token-file", str(tmp_path / "missing")])


def test_a_token_without_tls_is_warned_about(generator, caplog):
    caplog.set_level(logging.WARNING)
    start(generator, token="s3cret").stop()
    assert any("TLS" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_metrics_bind_to_loopback_unless_told_otherwise(generator):
    st = start(generator, host="127.0.0.2", metrics_port=0)  # the gRPC port on another address
    try:
        port = st.server.metrics_port
        assert b"ln3diff_requests" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5)
    finally:
        st.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_a_bad_tls_key_is_named_as_such(generator, tmp_path):
    cert, key, other = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    for key_out, cert_out in ((key, cert), (other, tmp_path / "other-cert.pem")):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key_out),
                        "-out", str(cert_out)], check=True, capture_output=True)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    for bad in (garbage, other):  # not a key at all; a key that does not match the certificate
        with pytest.raises(ValueError, match="private key") as info:
            ServerThread(lambda: generator, ServerConfig(port=0, tls_cert=cert, tls_key=bad))
        assert str(bad) in str(info.value) and "Failed to bind" not in str(info.value)


# -- 7. prompts of only invisible characters ------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["\u200b\u200c\u200d\u2060\ufeff", "\x00\x07\x1b\x7f", "\u200b \t\n\u200b"])
def test_a_prompt_of_only_zero_width_or_control_characters_is_empty(client, prompt):
    code, details = code_of(lambda: client.generate_unary(prompt, **FAST))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt="), details


def test_prompts_are_normalised_before_use():
    from ln3diff_rt.prompts import normalise_prompt

    assert normalise_prompt("  a cafe\u0301\u200b chair\x00 ") == "a caf\u00e9 chair"
    assert normalise_prompt("a red\tcube\non a\u00a0table") == "a red cube on a\u00a0table"
    assert normalise_prompt("\u200b\x07\ufeff") == ""


def test_a_default_request_fits_the_unary_reply_estimate():
    """The estimate must not refuse what a default request makes (a textured 30K-face GLB and 8 previews): an
    uncompressed bound on the texture once did, in the Ray tests."""
    from ln3diff_rt.options import GenerationOptions
    from ln3diff_rt.runner import Request
    from serve.validation import Limits, unary_reply_bytes

    assert unary_reply_bytes(Request("a red cube", 1, GenerationOptions(), ("glb",))) < Limits().max_unary_reply_bytes
