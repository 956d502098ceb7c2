"""Image requests over gRPC on the shipped (image-capable) model: a PNG in, a GLB out; bad images refused by field."""

from __future__ import annotations

import io

import grpc
import pytest
import trimesh
from conftest import code_of, shared_path

from ln3diff_rt.pipeline import Generator
from serve.server import ServerConfig, ServerThread
from serve.validation import Limits

FAST = dict(steps=2, mesh_resolution=32, preview_views=0, texture=0)


@pytest.fixture(scope="module")
def server():
    st = ServerThread(Generator.from_checkpoint, ServerConfig(port=0, limits=Limits(max_image_bytes=1 << 20)))
    yield st.wait_serving()
    st.stop()


def test_a_png_becomes_a_glb(client):
    assert client.model_info().image_input
    png = shared_path("samples", "images", "fox-input.png").read_bytes()
    got = client.generate("", image=png, seed=3, **FAST)  # no prompt: the image alone
    mesh = trimesh.load(io.BytesIO(got.meshes["glb"]), file_type="glb", force="mesh")
    assert got.result.seed == 3 and len(mesh.faces) == got.result.face_count > 0


@pytest.mark.parametrize("image,message", [
    (b"not an image at all", "image='<19 bytes>': expected not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image='<72 bytes>': expected"),
    (b"\0" * ((1 << 20) + 1), "an image file of at most 1048576 bytes"),
])
def test_bad_images_are_invalid_argument(client, image, message):
    code, details = code_of(lambda: client.generate("", image=image, **FAST))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details and len(details) < 400
