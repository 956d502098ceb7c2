"""Both training stages on a few generated objects: loss goes down, resume is exact, torchrun keeps replicas equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training.diffusion as diffusion
import training.vae as vae_training
from ln3diff_rt.checkpoint import load_models
from training.data.synth import generate
from training.latents import load_latents

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, objects=7, views=8, size=64, seed=3, val_fraction=0.3)
    return root


def small_vae_config(data, out, **overrides):
    base = dict(data=str(data), out=str(out), steps=6, batch_size=2, rays_per_object=128, target_views=2,
                eval_every=1000, eval_objects=1, warmup=2, seed=5)
    base.update(overrides)
    return vae_training.VAETrainConfig(**base)


def records(log: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == event]


def test_vae_steps_lower_the_loss(dataset, tmp_path):
    cfg = small_vae_config(dataset, tmp_path, steps=40, lr=1e-3, warmup=5)
    path = vae_training.train(cfg)
    losses = [r["loss"] for r in records(tmp_path / "log.jsonl", "train")]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert load_models(path).vae is not None
    assert records(tmp_path / "log.jsonl", "eval")  # held-out PSNR at the last step


def test_vae_resume_after_interrupt_is_exact(dataset, tmp_path, monkeypatch):
    straight = vae_training.train(small_vae_config(dataset, tmp_path / "straight"))

    real_collate = vae_training.collate

    def interrupt_at_step_3(ds, idx, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return real_collate(ds, idx, epoch)

    monkeypatch.setattr(vae_training, "collate", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        vae_training.train(small_vae_config(dataset, tmp_path / "resumed"))
    monkeypatch.setattr(vae_training, "collate", real_collate)
    resumed = vae_training.train(small_vae_config(dataset, tmp_path / "resumed", resume=True))

    log_a = records(tmp_path / "straight" / "log.jsonl", "train")
    log_b = records(tmp_path / "resumed" / "log.jsonl", "train")
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]  # continues from step 3, not from 0
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    a, b = load_models(straight).vae.state_dict(), load_models(resumed).vae.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def vae_checkpoint(dataset, tmp_path_factory):
    return vae_training.train(small_vae_config(dataset, tmp_path_factory.mktemp("vae"), steps=3))


def small_diffusion_config(data, vae, out, **overrides):
    base = dict(data=str(data), vae=str(vae), out=str(out), steps=6, batch_size=4, encode_passes=2, eval_every=1000,
                warmup=2, seed=2)
    base.update(overrides)
    return diffusion.DiffusionTrainConfig(**base)


def test_diffusion_steps_lower_the_loss_and_ship_a_model(dataset, vae_checkpoint, tmp_path):
    path = diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path, steps=60, lr=2e-3, batch_size=16))
    losses = [r["loss"] for r in records(tmp_path / "log.jsonl", "train")]
    assert sum(losses[-15:]) / 15 < 0.9 * sum(losses[:15]) / 15
    models = load_models(path, require=("vae", "dit"))
    start = records(tmp_path / "log.jsonl", "start")[0]
    assert models.config.latent_scale == pytest.approx(start["latent_scale"]) and models.config.latent_scale > 0
    # The last held-out loss was measured on the EMA weights, and those are the weights shipped.
    val = load_latents(tmp_path / "latents" / "val.safetensors")
    shipped = diffusion.evaluate(models.dit, val, models.config.latent_scale, "cpu")
    assert records(tmp_path / "log.jsonl", "eval")[-1]["val_flow_loss"] == pytest.approx(shipped, abs=1e-5)


def test_diffusion_resume_is_exact(dataset, vae_checkpoint, tmp_path, monkeypatch):
    straight = diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "a"))
    real_draw = diffusion.draw_batch
    calls = {"n": 0}

    def interrupt_on_fourth_batch(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_draw(*args)

    monkeypatch.setattr(diffusion, "draw_batch", interrupt_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "b"))
    monkeypatch.setattr(diffusion, "draw_batch", real_draw)
    resumed = diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "b", resume=True))
    log_a = records(tmp_path / "a" / "log.jsonl", "train")
    log_b = records(tmp_path / "b" / "log.jsonl", "train")
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    a, b = load_models(straight).dit.state_dict(), load_models(resumed).dit.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_torchrun_two_cpu_processes_keep_identical_replicas(dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.vae",
           "--data", str(dataset), "--out", str(out), "--steps", "3", "--batch-size", "1", "--rays-per-object", "64",
           "--target-views", "2", "--eval-every", "1000", "--eval-objects", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = records(out / "log.jsonl", "done")[0]
    assert done["world"] == 2
    assert done["replica_divergence"] == 0.0
    assert (out / "vae.safetensors").is_file()


def test_torchrun_diffusion_keeps_identical_replicas(dataset, vae_checkpoint, tmp_path):
    """Rank 0 encodes the latent cache while the other waits at a barrier, then both train."""
    out = tmp_path / "ddp-dit"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "training.diffusion", "--data", str(dataset), "--vae", str(vae_checkpoint), "--out", str(out),
           "--steps", "3", "--batch-size", "2", "--encode-passes", "1", "--eval-every", "1000"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = records(out / "log.jsonl", "done")[0]
    assert done["world"] == 2 and done["replica_divergence"] == 0.0
    assert load_models(out / "model.safetensors", require=("vae", "dit")).dit is not None


def test_sigterm_saves_the_state_and_resume_continues(dataset, tmp_path):
    import signal
    import time

    from safetensors import safe_open

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.vae", "--data", str(dataset), "--out", str(out), "--steps", "1000",
           "--batch-size", "1", "--rays-per-object", "64", "--target-views", "2", "--eval-every", "1000",
           "--save-every", "100000"]  # no periodic save: only the signal handler can write the state
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(records(log, "train")) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    last_logged = records(log, "train")[-1]["step"]
    with safe_open(str(out / "train_state.safetensors"), "pt") as f:
        saved = int(f.metadata()["step"])
    assert 3 <= saved and saved in (last_logged, last_logged + 1)  # the step in flight may have finished
    resumed = vae_training.train(small_vae_config(dataset, out, steps=saved + 2, resume=True, batch_size=1,
                                                  rays_per_object=64))
    assert records(log, "train")[-1]["step"] == saved + 2
    assert load_models(resumed).vae is not None


def test_threshold_calibration_rewrites_the_checkpoint(dataset, vae_checkpoint, tmp_path):
    import shutil

    from training.evaluate import calibrate_checkpoint

    copy = tmp_path / "vae.safetensors"
    shutil.copy(vae_checkpoint, copy)
    result = calibrate_checkpoint(str(copy), str(dataset))
    reloaded = load_models(copy)
    assert reloaded.config.renderer.mesh_threshold == result["threshold"]
    assert reloaded.metadata["mesh_threshold_iou"] == f"{result['iou']:.4f}"
    assert reloaded.metadata["train_steps"] == "3"  # the training metadata survives the rewrite
    original = load_models(vae_checkpoint).vae.state_dict()
    for k, v in reloaded.vae.state_dict().items():
        assert torch.equal(v, original[k])  # only the config changed


class SignedDistanceVAE:
    """A stand-in VAE whose density is 20 - 100 * sdf of each held-out object in turn (in dataset order):
    {density > 20} is exactly the object, so 20 is the best threshold, with IoU 1, and the others score less."""

    def __init__(self, dataset):
        from training.data.synth import ObjectSpec

        self.specs = iter([ObjectSpec.from_meta(r.meta["ln3diff_synth"]) for r in dataset.records])

    def encode(self, images, c2w, intrinsics):
        return images, None

    def decode(self, latent):
        return latent

    def field(self, planes, points):
        from training.data.synth import sdf

        return torch.from_numpy(20.0 - 100.0 * sdf(next(self.specs), points[0].numpy()))[None], None


def test_threshold_calibration_and_geometry_iou_on_a_known_density(dataset):
    from training.data.dataset import MultiViewDataset
    from training.evaluate import calibrate_mesh_threshold, reconstruction_iou

    val = MultiViewDataset(dataset, "val", 2, 1, 64, "skip")
    calibration = calibrate_mesh_threshold(SignedDistanceVAE(val), val)
    assert calibration["threshold"] == 20.0 and calibration["iou"] == pytest.approx(1.0)
    assert all(v < 1.0 for t, v in calibration["iou_by_threshold"].items() if t != "20.0")
    exact = reconstruction_iou(SignedDistanceVAE(val), val, 20.0)
    assert exact["mean"] == pytest.approx(1.0) and set(exact["per_shape"].values()) == {1.0}
    # Off the best threshold both measure the same IoU over the same objects.
    loose = reconstruction_iou(SignedDistanceVAE(val), val, 30.0)
    assert loose["mean"] < 1.0
    assert loose["mean"] == pytest.approx(calibration["iou_by_threshold"]["30.0"], abs=1e-4)


def test_evaluate_command_writes_every_metric(dataset, vae_checkpoint, tmp_path, monkeypatch):
    import training.evaluate as evaluate

    model = diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "dit"))
    # Two colours x two shapes keep this to 8 generated objects; the full run uses every pair.
    monkeypatch.setattr(evaluate, "COLOURS", {k: evaluate.COLOURS[k] for k in ("red", "blue")})
    monkeypatch.setattr(evaluate, "SHAPES", ("sphere", "cube"))
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", str(model), "--data", str(dataset), "--seeds-per-prompt", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    adherence = result["adherence"]
    assert adherence["prompts"] == 4 and adherence["seeds_per_prompt"] == 2 and len(adherence["rows"]) == 8
    assert len({r["seed"] for r in adherence["rows"]}) == 8  # every object its own seed
    assert sorted(r["prompt"] for r in adherence["rows"][:4]) == sorted(r["prompt"] for r in adherence["rows"][4:])
    # The summary figures are the rows' figures, over every seed of every prompt.
    rows = adherence["rows"]
    assert adherence["shape_accuracy"] == pytest.approx(sum(r["predicted_shape"] == r["shape"] for r in rows) / 8)
    assert adherence["colour_accuracy"] == pytest.approx(sum(r["predicted_colour"] == r["colour"] for r in rows) / 8)
    per_shape = {s: sum(r["predicted_shape"] == s for r in rows if r["shape"] == s) / 4 for s in ("sphere", "cube")}
    assert adherence["shape_accuracy_per_shape"] == pytest.approx(per_shape)
    # The VAE figures cover every held-out object, at the checkpoint's mesh threshold.
    from training.data.dataset import MultiViewDataset

    models = load_models(model)
    cfg = models.config
    val = MultiViewDataset(dataset, "val", cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed=0)
    assert result["vae_val_psnr"] == pytest.approx(vae_training.evaluate_psnr(models.vae, val, len(val), "cpu"))
    assert result["vae_val_iou"] == evaluate.reconstruction_iou(models.vae, val, cfg.renderer.mesh_threshold)
