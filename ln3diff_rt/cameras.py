"""Cameras and rays in one convention: 4x4 camera-to-world matrices, OpenGL/Blender camera axes
(the camera looks down -Z, +Y is up in the image), world +Z up (as Blender and NeRF-synthetic),
intrinsics as (fx, fy, cx, cy) in pixels with pixel centres at +0.5.
"""

from __future__ import annotations

import math

import torch

WORLD_UP = (0.0, 0.0, 1.0)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world [..., 4, 4] for a camera at `eye` [..., 3] looking at `target` [..., 3]."""
    if up is None:
        up = torch.tensor(WORLD_UP, dtype=eye.dtype, device=eye.device).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = cam_up
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def orbit_camera(azimuth_deg: float, elevation_deg: float, radius: float) -> torch.Tensor:
    """Camera-to-world [4, 4] on a sphere around the origin, looking at it."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = torch.tensor([radius * math.cos(el) * math.cos(az), radius * math.cos(el) * math.sin(az),
                        radius * math.sin(el)])
    return look_at(eye, torch.zeros(3))


def intrinsics_from_fov(fov_x: float, width: int, height: int) -> torch.Tensor:
    """(fx, fy, cx, cy) for a horizontal field of view `fov_x` in radians and square pixels."""
    fx = 0.5 * width / math.tan(0.5 * fov_x)
    return torch.tensor([fx, fx, width / 2.0, height / 2.0])


def opencv_to_opengl(c2w: torch.Tensor) -> torch.Tensor:
    """Convert OpenCV camera-to-world (looks down +Z, +Y down) to the OpenGL convention used here."""
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=c2w.dtype, device=c2w.device))
    return c2w @ flip


def camera_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel rays: c2w [..., 4, 4], intrinsics [..., 4] -> origins, unit directions [..., H, W, 3]."""
    dtype, device = c2w.dtype, c2w.device
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device) + 0.5,
                          torch.arange(width, dtype=dtype, device=device) + 0.5, indexing="ij")
    fx, fy, cx, cy = (intrinsics[..., i, None, None] for i in range(4))
    dirs_cam = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u).expand_as((u - cx) / fx)], dim=-1)
    rot = c2w[..., None, None, :3, :3]  # [..., 1, 1, 3, 3]
    dirs = torch.nn.functional.normalize((rot @ dirs_cam.unsqueeze(-1)).squeeze(-1), dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def project_points(points: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """World points [..., P, 3] seen by cameras c2w [..., 4, 4], intrinsics [..., 4] -> pixel coordinates
    (u, v) [..., P, 2] (pixel centres at +0.5, as `camera_rays`) and depth along the view axis [..., P]
    (positive in front of the camera)."""
    cam = (points - c2w[..., None, :3, 3]) @ c2w[..., :3, :3]  # [..., P, 3] in camera axes
    depth = -cam[..., 2]
    fx, fy, cx, cy = (intrinsics[..., i, None] for i in range(4))
    return torch.stack([cx + fx * cam[..., 0] / depth, cy - fy * cam[..., 1] / depth], dim=-1), depth


def plucker_rays(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Plücker embedding (d, o x d) [..., 6] of rays with unit directions."""
    return torch.cat([dirs, torch.cross(origins, dirs, dim=-1)], dim=-1)


def ray_box_intersect(origins: torch.Tensor, dirs: torch.Tensor, bound: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays [..., 3] through the box [-bound, bound]^3, and a hit mask.

    Rays that miss get near = far = 0 so that callers can march them harmlessly.
    """
    return ray_aabb_intersect(origins, dirs, torch.full((3,), -bound), torch.full((3,), bound))


def ray_aabb_intersect(origins: torch.Tensor, dirs: torch.Tensor, box_min: torch.Tensor, box_max: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays [..., 3] through the box [box_min, box_max] ([3] each), and a hit mask.

    Rays that miss get near = far = 0 so that callers can march them harmlessly.
    """
    box_min, box_max = box_min.to(origins), box_max.to(origins)
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (box_min - origins) / safe
    t1 = (box_max - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    near = torch.where(hit, near, torch.zeros_like(near))
    far = torch.where(hit, far, torch.zeros_like(far))
    return near, far, hit
