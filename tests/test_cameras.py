"""Camera conventions: OpenCV poses (as G-Objaverse stores them) convert to the OpenGL axes used here."""

import torch

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, look_at, opencv_to_opengl, project_points


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


def test_project_points_inverts_camera_rays():
    c2w = torch.stack([look_at(torch.tensor([2.0, -1.5, 1.2]), torch.zeros(3)),
                       look_at(torch.tensor([0.3, 3.0, -0.5]), torch.tensor([0.1, 0.0, 0.2]))])  # [2, 4, 4]
    intrinsics = torch.tensor([[30.0, 32.0, 10.0, 6.5], [25.0, 25.0, 9.0, 7.0]])
    origins, dirs = camera_rays(c2w, intrinsics, 13, 19)  # [2, 13, 19, 3]
    distance = torch.linspace(1.0, 4.0, 13 * 19).reshape(1, 13, 19, 1)
    points = (origins + distance * dirs).reshape(2, -1, 3)
    uv, depth = project_points(points, c2w, intrinsics)
    v, u = torch.meshgrid(torch.arange(13) + 0.5, torch.arange(19) + 0.5, indexing="ij")
    torch.testing.assert_close(uv, torch.stack([u, v], dim=-1).reshape(1, -1, 2).expand(2, -1, -1), atol=1e-4, rtol=0)
    forward = -c2w[:, None, :3, 2]  # the view axis
    torch.testing.assert_close(depth, ((points - origins.reshape(2, -1, 3)) * forward).sum(-1))
    assert (depth > 0).all()
