"""Reference volume compositing along rays (alpha compositing, NeRF quadrature)."""

import torch


def composite_rays_ref(
    sigmas: torch.Tensor, rgbs: torch.Tensor, t_vals: torch.Tensor, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Composite S samples along each of N rays, samples sorted by t.

    sigmas [N, S] (non-negative densities), rgbs [N, S, 3], t_vals [N, S], deltas [N, S] ->
    rgb [N, 3], depth [N] (expected t, not normalised by opacity), opacity [N], weights [N, S].
    alpha_i = 1 - exp(-sigma_i delta_i); T_i = prod_{j<i} (1 - alpha_j); w_i = T_i alpha_i.
    """
    tau = sigmas * deltas
    alpha = 1.0 - torch.exp(-tau)
    # Transmittance from an exclusive cumulative sum of optical depth: stable, no product of (1 - alpha).
    trans = torch.exp(-(torch.cumsum(tau, dim=-1) - tau))
    weights = alpha * trans
    rgb = (weights.unsqueeze(-1) * rgbs).sum(dim=-2)
    depth = (weights * t_vals).sum(dim=-1)
    opacity = weights.sum(dim=-1)
    return rgb, depth, opacity, weights
