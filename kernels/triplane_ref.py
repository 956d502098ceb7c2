"""Reference tri-plane sampling: the maths the Triton kernel must reproduce."""

import torch
import torch.nn.functional as F

from ln3diff_rt.conventions import PLANE_AXES


def triplane_sample_ref(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of the three planes at `points`, summed.

    planes: [B, 3, C, R, R]; points: [B, N, 3] in [-1, 1]^3 -> features [B, N, C].
    Plane xy is sampled at (x, y), xz at (x, z), yz at (y, z); the first coordinate indexes the
    plane's width (last) axis, as in `grid_sample`. align_corners=False, zero padding outside.
    """
    b, _, c, r, _ = planes.shape
    out = None
    for i, (u, v) in enumerate(PLANE_AXES):
        grid = torch.stack([points[..., u], points[..., v]], dim=-1).unsqueeze(1)  # [B, 1, N, 2]
        feat = F.grid_sample(planes[:, i], grid.to(planes.dtype), mode="bilinear", padding_mode="zeros",
                             align_corners=False)  # [B, C, 1, N]
        out = feat if out is None else out + feat
    return out.squeeze(2).transpose(1, 2)
