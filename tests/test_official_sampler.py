"""The official samplers: the t23d DDPM path against `sampler-t23d.safetensors`, DPM-Solver++(2M) and the i23d flow.

The fixture is a 10-step run of the official Euler sampler with CFG 6.5 on the small t23d DiT (see
../shared/official-ln3diff/README.md); trajectory tolerance is its suggested rtol 1e-5 of max|x|.
"""

import math

import pytest
import torch
from conftest import shared_path
from safetensors.torch import load_file

from ln3diff_rt.official.ddpm import (
    ddpm_schedule,
    ddpm_sigmas,
    ddpm_timesteps,
    dpmpp_2m_step,
    euler_step,
    guided_denoise,
    sample_ddpm,
    snap_sigma,
    zero_condition,
)
from ln3diff_rt.official.dit import build_official_dit, dit_state_from_official, infer_dit_config
from ln3diff_rt.official.flow import sample_flow
from ln3diff_rt.official.layout import official_to_project_latent, project_to_official_latent
from ln3diff_rt.sampling import Condition


@pytest.fixture(scope="module")
def run() -> dict[str, torch.Tensor]:
    return load_file(shared_path("official-ln3diff", "sampler-t23d.safetensors"))


def small_dit(kind: str):
    state = dit_state_from_official(load_file(shared_path("official-ln3diff", f"dit-{kind}-small.safetensors")))
    dit = build_official_dit(infer_dit_config({k: v.shape for k, v in state.items()}))
    dit.load_state_dict(state, strict=True)
    return dit.eval()


@pytest.fixture(scope="module")
def t23d():
    return small_dit("t23d")  # the sampler fixture's network (same weights_sha256)


@pytest.fixture(scope="module")
def cond(run) -> Condition:
    return Condition(run["sampler.cond.crossattn"], run["sampler.cond.vector"])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_schedule_is_exact(run):
    schedule = ddpm_schedule()
    assert torch.equal(schedule.betas, run["sampler.betas_f64"])
    assert torch.equal(schedule.alphas_cumprod, run["sampler.alphas_cumprod_f64"])
    assert torch.equal(schedule.sigmas, run["sampler.ddpm_sigmas_1000"])
    assert torch.equal(ddpm_timesteps(10), run["sampler.timesteps"])
    assert torch.equal(ddpm_timesteps(250), run["sampler.timesteps_250"])
    assert torch.equal(ddpm_sigmas(schedule, 10), run["sampler.sigmas"])
    assert torch.equal(ddpm_sigmas(schedule, 250), run["sampler.sigmas_250"])
    assert torch.equal(ddpm_timesteps(1000), torch.arange(999, -1, -1))
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        ddpm_timesteps(1001)


def test_sigmas_snap_to_the_official_indices(run):
    schedule = ddpm_schedule()
    sigmas = run["sampler.sigmas"][:-1]
    quantized, idx = snap_sigma(schedule, sigmas)
    assert torch.equal(idx, run["sampler.c_noise"][:, 0]) and (run["sampler.c_noise"] == idx[:, None]).all()
    assert torch.equal(quantized, run["sampler.sigma_quantized"][:, 0])
    off_grid, idx = snap_sigma(schedule, sigmas * 1.001)  # between table entries: the nearest one
    assert torch.equal(idx, run["sampler.c_noise"][:, 0])
    assert torch.equal(off_grid, quantized)


@torch.no_grad()
def test_each_guided_euler_step_matches_official(run, t23d, cond):
    """Teacher-forced: from the official x_i, our guided x0 estimate and Euler step give the official values."""
    schedule = ddpm_schedule()
    trajectory = run["sampler.trajectory"]  # [11, B, 12, 32, 32]
    tol = 1e-5 * trajectory.abs().max().item()
    sigmas = run["sampler.sigmas"]
    expected_start = run["sampler.noise"] * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    assert (trajectory[0] - expected_start).abs().max().item() < tol
    for i in range(10):
        x = official_to_project_latent(trajectory[i])
        denoised = guided_denoise(t23d, schedule, x, sigmas[i], cond, zero_condition(cond), 6.5)
        assert (project_to_official_latent(denoised) - run["sampler.denoised_cfg"][i]).abs().max() < tol, i
        x_next = euler_step(trajectory[i], run["sampler.denoised_cfg"][i], sigmas[i], sigmas[i + 1])
        assert (x_next - trajectory[i + 1]).abs().max() < tol, i


def test_sample_ddpm_reproduces_the_official_10_step_run(run, t23d, cond):
    steps = []
    final = sample_ddpm(t23d, official_to_project_latent(run["sampler.noise"]), cond, steps=10,
                        callback=lambda i, n: steps.append((i, n)))
    tol = 1e-5 * run["sampler.trajectory"].abs().max().item()
    assert (project_to_official_latent(final) - run["sampler.final"]).abs().max() < tol
    assert steps == [(i, 10) for i in range(1, 11)]
    with pytest.raises(ValueError, match="dpmpp_2m"):
        sample_ddpm(t23d, run["sampler.noise"], cond, steps=10, method="ddim")


def solve_analytic(steps: int, method: str) -> float:
    """|error| at sigma = 0.1 of dx/dsigma = (x - D) / sigma, D = a + b sigma, from sigma = 10 on a grid uneven in
    lambda = -log sigma; exact: x = a + (sigma / 10) (x_10 - a) + b sigma log(10 / sigma)."""
    a, b, x = 0.3, 2.0, torch.tensor([5.0], dtype=torch.float64)
    lam = -math.log(10.0) + math.log(100.0) * (torch.arange(steps + 1, dtype=torch.float64) / steps) ** 1.5
    sigmas = torch.exp(-lam)
    exact = a + 0.01 * (x - a) + b * 0.1 * math.log(100.0)
    previous = None
    for i in range(steps):
        denoised = a + b * sigmas[i]
        if method == "euler":
            x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        else:
            x = dpmpp_2m_step(x, denoised, sigmas[i], sigmas[i + 1], previous)
            previous = (denoised, float(sigmas[i]))
    return (x - exact).abs().item()


def test_dpmpp_2m_converges_at_second_order():
    euler = [solve_analytic(n, "euler") for n in (10, 20, 40)]
    dpm = [solve_analytic(n, "dpmpp_2m") for n in (10, 20, 40)]  # measured ratios 4.8, 4.4 (Euler 2.2, 2.1)
    assert all(e / e_fine < 2.5 for e, e_fine in zip(euler, euler[1:], strict=False))
    assert all(e / e_fine > 3.5 for e, e_fine in zip(dpm, dpm[1:], strict=False))
    assert dpm[0] < 0.5 * euler[0]


def test_dpmpp_2m_step_weighs_the_previous_estimate_by_the_step_ratio():
    """D linear in lambda, previous step 3x the current: the 2M step is exact to O(h^3), far below first order."""
    a, c = 0.3, 1.0
    s_prev, s = 1.0, math.exp(-0.3)
    s_next = s * math.exp(-0.1)

    def den(sigma: float) -> float:
        return a + c * -math.log(sigma)

    def antiderivative(lam: float) -> float:  # of e^lam (a + c lam)
        return math.exp(lam) * (a + c * (lam - 1))

    x = torch.tensor([2.0], dtype=torch.float64)
    exact = (s_next / s) * x + s_next * (antiderivative(-math.log(s_next)) - antiderivative(-math.log(s)))
    first = (dpmpp_2m_step(x, den(s), s, s_next, None) - exact).abs().item()
    second = (dpmpp_2m_step(x, den(s), s, s_next, (den(s_prev), s_prev)) - exact).abs().item()
    assert second < 0.05 * first  # measured 7.9e-5 vs 4.8e-3; r inverted would give 3.8e-2


def test_dpmpp_2m_at_25_steps_is_closer_to_250_euler_than_10_euler(run, t23d, cond):
    """The few-step solver on the official schedule, CFG 6.5, one sample (measured: 0.063 vs 0.11 and 0.23)."""
    noise = official_to_project_latent(run["sampler.noise"][:1])
    one = Condition(cond.context[:1], cond.pooled[:1])
    reference = sample_ddpm(t23d, noise, one, steps=250)
    dpm_25 = rel_l2(sample_ddpm(t23d, noise, one, steps=25, method="dpmpp_2m"), reference)
    euler_25 = rel_l2(sample_ddpm(t23d, noise, one, steps=25), reference)
    euler_10 = rel_l2(sample_ddpm(t23d, noise, one, steps=10), reference)
    assert dpm_25 < 0.75 * euler_25 and dpm_25 < 0.4 * euler_10, (dpm_25, euler_25, euler_10)


def test_flow_runs_in_the_official_time_convention():
    """For one data point d the official field is v(x, s) = (d - x) / (1 - s); Euler and Heun land on d."""
    data = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def velocity(x, s, context, pooled):
        seen.append((s.clone(), context[:, 0, 0].clone()))
        return (data.repeat(x.shape[0] // 2, 1, 1, 1, 1) - x) / (1 - s).view(-1, 1, 1, 1, 1)

    noise = torch.randn(data.shape, generator=torch.Generator().manual_seed(1))
    cond = Condition(torch.ones(2, 3, 5), torch.ones(2, 7))
    for method in ("euler", "heun"):
        assert (sample_flow(velocity, noise, cond, steps=6, method=method) - data).abs().max() < 1e-5
    s, ctx = seen[0]
    assert torch.equal(s, torch.zeros(4))  # noise is s = 0; the model sees the official time, not 1 - s
    assert torch.equal(ctx, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # CFG batch [cond; all-zero uncond]


@torch.no_grad()
def test_heun_beats_euler_on_the_small_i23d_dit():
    """On the official i23d field (CFG 4), Heun at 10 steps is far closer to a fine solution than Euler at 10."""
    dit = small_dit("i23d")
    run = load_file(shared_path("official-ln3diff", "dit-i23d-small.safetensors"))
    cond = Condition(run["fixture.cond.crossattn"][:1], run["fixture.cond.vector"][:1])
    noise = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = sample_flow(dit, noise, cond, steps=40, method="heun")
    heun_10 = rel_l2(sample_flow(dit, noise, cond, steps=10, method="heun"), reference)
    euler_10 = rel_l2(sample_flow(dit, noise, cond, steps=10, method="euler"), reference)
    assert heun_10 < 0.3 * euler_10, (heun_10, euler_10)
