"""Camera conventions: OpenCV poses (as G-Objaverse stores them) convert to the OpenGL axes used here."""

import torch

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, look_at, opencv_to_opengl


def opencv_look_at(eye: torch.Tensor) -> torch.Tensor:
    """Camera-to-world of an OpenCV camera at `eye` looking at the origin, world +Z up in the image.

    Built from OpenCV's own axes, independently of `look_at`: +Z forward, +Y down, +X = Y x Z right."""
    forward = torch.nn.functional.normalize(-eye, dim=-1)
    world_down = torch.tensor([0.0, 0.0, -1.0])
    down = torch.nn.functional.normalize(world_down - (world_down @ forward) * forward, dim=-1)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = torch.linalg.cross(down, forward), down, forward, eye
    return c2w


def test_opencv_camera_looking_at_the_origin_becomes_the_opengl_one():
    eye = torch.tensor([2.0, -1.5, 1.2])
    gl = opencv_to_opengl(opencv_look_at(eye))
    torch.testing.assert_close(gl, look_at(eye, torch.zeros(3)), atol=1e-6, rtol=0)
    rot = gl[:3, :3]
    torch.testing.assert_close(rot @ rot.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.linalg.det(rot) > 0  # still a rotation: right-handed
    torch.testing.assert_close(-gl[:3, 2], -eye / eye.norm())  # OpenGL looks down -Z: at the origin
    assert gl[2, 1] > 0  # +Y is up: world +Z points up in the image
    # the renderer's centre pixel ray through the converted pose hits the origin
    origins, dirs = camera_rays(gl, intrinsics_from_fov(0.8, 33, 33), 33, 33)
    torch.testing.assert_close(origins[16, 16] + eye.norm() * dirs[16, 16], torch.zeros(3), atol=1e-5, rtol=0)


def test_opencv_opengl_round_trip_on_a_batch():
    eyes = torch.tensor([[2.0, -1.5, 1.2], [0.3, 3.0, -0.5], [-1.0, -1.0, 2.5]])
    cv = torch.stack([opencv_look_at(e) for e in eyes])  # [3, 4, 4]
    gl = opencv_to_opengl(cv)
    assert gl.shape == cv.shape
    torch.testing.assert_close(gl[:, :3, 3], eyes)  # positions are kept
    torch.testing.assert_close(opencv_to_opengl(gl), cv)  # the same flip converts back
