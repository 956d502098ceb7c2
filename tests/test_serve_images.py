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


def test_an_image_to_a_text_only_model_is_refused_alike_by_cli_and_server(random_tiny_checkpoint, tmp_path, capsys):
    """One check (Generator.check_inputs) behind the CLI and the server: an image for a model without image input
    is an error naming `image`, before any work."""
    import numpy as np
    from PIL import Image

    from ln3diff_rt.cli import main
    from ln3diff_rt.options import InvalidOption
    from serve.ln3diff.v1 import generator_pb2 as pb
    from serve.validation import check_request

    gen = Generator.from_checkpoint(random_tiny_checkpoint)
    assert not gen.config.takes_images
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (33, 27, 4), dtype=np.uint8)).save(photo)
    with pytest.raises(InvalidOption) as err:
        check_request(pb.GenerateRequest(prompt="a red cube", image=photo.read_bytes()), Limits(), gen)
    assert err.value.field == "image" and "takes a prompt only" in err.value.expected
    code = main(["generate", "a red cube", "--image", str(photo), "--ckpt", str(random_tiny_checkpoint),
                 "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err.strip()
    assert code == 2 and message.startswith("ln3diff generate: error: --image='<an image>': expected none: tiny")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
