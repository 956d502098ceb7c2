"""Both training stages on a few generated objects: loss goes down, resume is exact, torchrun keeps replicas equal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import vae_resumes_exactly

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


def test_vae_encoder_and_latent_flags_reach_the_checkpoint(dataset, tmp_path):
    """--latent-channels and --lift-levels change the model trained and are what its checkpoint loads as."""
    path = vae_training.train(small_vae_config(dataset, tmp_path, steps=2, latent_channels=6, lift_levels=2))
    models = load_models(path)
    assert models.config.latent_channels == 6 and models.config.encoder.lift_levels == 2
    assert models.vae.encoder.head[-1].out_features == 12 and len(models.vae.encoder.to_fine) == 1


def test_vae_resume_after_interrupt_is_exact(dataset, tmp_path, monkeypatch):
    _, log = vae_resumes_exactly(monkeypatch, lambda name, resume: small_vae_config(dataset, tmp_path / name,
                                                                                    resume=resume), interrupt_at=3)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the resumed run continued from step 3, not from 0


def test_vae_init_from_continues_a_trained_vae_and_refuses_another_architecture(dataset, tmp_path):
    """--init-from starts at the checkpoint's weights and architecture (not the preset's): with a zero learning rate
    the weights it saves are the checkpoint's bit for bit; the checkpoint says where it came from."""
    first = vae_training.train(small_vae_config(dataset, tmp_path / "a", steps=4, latent_channels=6, lr=1e-3))
    continued = vae_training.train(small_vae_config(dataset, tmp_path / "b", steps=2, init_from=str(first), lr=0.0))
    fresh = vae_training.train(small_vae_config(dataset, tmp_path / "c", steps=2, latent_channels=6, lr=0.0))
    models, before = load_models(continued), load_models(first).vae.state_dict()
    assert models.config.latent_channels == 6 and models.metadata["init_train_steps"] == "4"
    assert models.metadata["init_from"].startswith("vae.safetensors sha256 ")
    assert all(torch.equal(v, before[k]) for k, v in models.vae.state_dict().items())
    assert not all(torch.equal(v, before[k]) for k, v in load_models(fresh).vae.state_dict().items())
    with pytest.raises(SystemExit, match="--latent-channels=8, but the --init-from checkpoint has 6"):
        vae_training.train(small_vae_config(dataset, tmp_path / "d", steps=1, init_from=str(first), latent_channels=8))
    with pytest.raises(SystemExit, match="--geometry sdf, but the --init-from checkpoint's field is density"):
        vae_training.train(small_vae_config(dataset, tmp_path / "e", steps=1, init_from=str(first), geometry="sdf"))


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
    shipped = diffusion.evaluate(models.dit, val, models.config.latent_scale, "cpu", models.image_encoder)
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
        self.field = DensityOf(self.specs)

    def encode(self, images, c2w, intrinsics):
        return images, None

    def decode(self, latent):
        return latent


class DensityOf:
    """The stand-in's field: density 20 - 100 * sdf of the next object spec."""

    def __init__(self, specs):
        self.specs = specs

    def __call__(self, planes, points):
        from training.data.synth import sdf

        return torch.from_numpy(20.0 - 100.0 * sdf(next(self.specs), points[0].numpy()))[None], None

    def surface_density(self, threshold: float) -> float:
        return threshold  # a density field's surface is where the threshold puts it


def test_threshold_calibration_and_geometry_iou_on_a_known_density(dataset):
    from training.data.dataset import MultiViewDataset
    from training.evaluate import calibrate_mesh_threshold, reconstruction_iou

    val = MultiViewDataset(dataset, "val", 2, 1, 64, "skip")
    calibration = calibrate_mesh_threshold(SignedDistanceVAE(val), val)
    assert calibration["threshold"] == 20.0 and calibration["iou"] == pytest.approx(1.0)
    assert all(v < 1.0 for t, v in calibration["iou_by_threshold"].items() if t != "20.0")
    exact = reconstruction_iou(SignedDistanceVAE(val), val, 20.0)
    assert exact["mean"] == pytest.approx(1.0) and set(exact["per_shape"].values()) == {1.0}
    assert exact["shape_named"] == 1.0 and set(exact["shape_named_per_shape"]) == set(exact["per_shape"])
    # A VAE that makes a sphere of everything: the shape test names the spheres' shape only.
    from training.data.synth import ObjectSpec

    spheres = SignedDistanceVAE(val)
    spheres.field = DensityOf(iter([ObjectSpec("sphere", "red", "medium", 0.0)] * len(val.records)))
    blobs = reconstruction_iou(spheres, val, 20.0)
    assert blobs["shape_named_per_shape"] == {s: float(s == "sphere") for s in exact["per_shape"]}
    assert 0.0 <= blobs["shape_named"] < 1.0
    # Off the best threshold both measure the same IoU over the same objects.
    loose = reconstruction_iou(SignedDistanceVAE(val), val, 30.0)
    assert loose["mean"] < 1.0
    assert loose["mean"] == pytest.approx(calibration["iou_by_threshold"]["30.0"], abs=1e-4)


def test_evaluate_vae_only_takes_a_vae_checkpoint(dataset, vae_checkpoint, tmp_path, capsys):
    import training.evaluate as evaluate

    evaluate.main(["--vae-only", "--ckpt", str(vae_checkpoint), "--data", str(dataset), "--json", str(tmp_path / "e")])
    result = json.loads((tmp_path / "e").read_text())
    assert result["geometry"] == "density" and result["val_objects"] >= 1 and 5.0 < result["vae_val_psnr"] < 60.0
    # A density field is judged at its best threshold: the IoU equals calibration's at that threshold.
    val = evaluate.MultiViewDataset(str(dataset), "val", 2, 1, 64, "skip")
    best = evaluate.calibrate_mesh_threshold(load_models(vae_checkpoint).vae, val)
    assert result["threshold"] == best["threshold"]
    assert result["vae_val_iou"]["mean"] == pytest.approx(best["iou"], abs=1e-6)
    # The training objects' PSNR beside it (underfit or overfit), by the same measure on the train split.
    models = load_models(vae_checkpoint)
    train = evaluate.MultiViewDataset(str(dataset), "train", models.config.encoder.num_views, 1, 64, "skip")
    assert result["train_objects"] == len(train) >= 1
    assert result["vae_train_psnr"] == pytest.approx(vae_training.evaluate_psnr(models.vae, train, len(train), "cpu"))
    out = capsys.readouterr().out
    assert "VAE geometry IoU" in out and "VAE PSNR, training objects" in out
    with pytest.raises(SystemExit):
        evaluate.main(["--vae-only", "--data", str(dataset)])  # no --ckpt: a usage error


def test_evaluate_object_renders_every_held_out_view(dataset, vae_checkpoint, tmp_path, capsys):
    import training.evaluate as evaluate

    folder = sorted((dataset / "val").iterdir())[0]
    evaluate.main(["--object", str(folder), "--ckpt", str(vae_checkpoint), "--json", str(tmp_path / "o")])
    result = json.loads((tmp_path / "o").read_text())
    inputs = load_models(vae_checkpoint).config.encoder.num_views
    assert result["input_views"] == inputs and result["held_out_views"] == 8 - inputs  # the fixture's 8 views
    assert 5.0 < result["psnr"] < 60.0 and f"{result['psnr']:.2f} dB" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", str(vae_checkpoint)])  # neither --data nor --object


def test_mesh_figures_count_a_torus_hole_and_the_asset_colour():
    from ln3diff_rt.meshing import extract_mesh
    from training.evaluate import mesh_figures

    def torus(p):  # ring radius 0.5, tube 0.2, plus a separate ball: genus 1 + 0
        ring = torch.stack([p[:, :2].norm(dim=1) - 0.5, p[:, 2]], 1).norm(dim=1) - 0.2
        ball = (p - torch.tensor([0.0, 0.0, 0.75])).norm(dim=1) - 0.12
        return 50.0 * -torch.minimum(ring, ball)

    colour = lambda p: torch.tensor([0.85, 0.12, 0.10]).expand(len(p), 3)  # noqa: E731  red's albedo
    mesh = extract_mesh(torus, 61, threshold=0.0, color_fn=colour, coarse_resolution=61)
    figures = mesh_figures(mesh, "red")
    assert figures["genus"] == 1 and figures["asset_colour_error"] < 1.0
    assert mesh_figures(mesh, "white")["asset_colour_error"] > 200.0
    ball = extract_mesh(lambda p: 50.0 * (0.4 - p.norm(dim=1)), 41, threshold=0.0, color_fn=colour)
    assert mesh_figures(ball, "red")["genus"] == 0


def test_evaluate_command_writes_every_metric(dataset, vae_checkpoint, tmp_path, monkeypatch):
    import training.evaluate as evaluate

    model = diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "dit"))
    # Two colours x two shapes keep this to 8 generated objects; the full run uses every pair.
    monkeypatch.setattr(evaluate, "COLOURS", {k: evaluate.COLOURS[k] for k in ("red", "blue")})
    monkeypatch.setattr(evaluate, "SHAPES", ("sphere", "cube"))
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", str(model), "--data", str(dataset), "--seeds-per-prompt", "2", "--image", "--image-views",
                   "2", "--json", str(out)])
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
    # The assets' colour figure is the rows' (mean vertex colour within 40 of the named albedo); no torus, no hole.
    within = [r["asset_colour_error"] is not None and r["asset_colour_error"] <= 40 for r in rows]
    assert adherence["asset_colour_within"] == pytest.approx(sum(within) / 8) and "tori_with_hole" not in adherence
    assert all(r["genus"] is None or r["genus"] >= 0 for r in rows)
    # The VAE figures cover every held-out object, at the checkpoint's mesh threshold.
    from training.data.dataset import MultiViewDataset

    models = load_models(model)
    cfg = models.config
    val = MultiViewDataset(dataset, "val", cfg.encoder.num_views, 1, cfg.encoder.image_size, "skip", seed=0)
    assert result["vae_val_psnr"] == pytest.approx(vae_training.evaluate_psnr(models.vae, val, len(val), "cpu"))
    assert result["vae_val_iou"] == evaluate.reconstruction_iou(models.vae, val, cfg.renderer.mesh_threshold)
    # Image adherence: two renders of every held-out object, judged against that object's own colour and shape.
    image = result["image_adherence"]
    rows = image["rows"]
    assert image["objects"] == len(val) and len(rows) == 2 * len(val) and len({r["seed"] for r in rows}) == len(rows)
    for record, pair in zip(val.records, zip(rows[::2], rows[1::2], strict=True), strict=True):
        truth = record.meta["ln3diff_synth"]
        assert [(r["object"], r["view"], r["colour"], r["shape"]) for r in pair] == [
            (record.transforms_path.parent.name, v, truth["colour"], truth["shape"]) for v in (0, 1)]
    n = len(rows)
    assert image["colour_accuracy"] == pytest.approx(sum(r["predicted_colour"] == r["colour"] for r in rows) / n)
    assert image["shape_accuracy"] == pytest.approx(sum(r["predicted_shape"] == r["shape"] for r in rows) / n)


@pytest.fixture(scope="module")
def text_model(dataset, vae_checkpoint, tmp_path_factory):
    """A text-only diffusion run (--condition-image-size 0): the kind of model the image runs start from."""
    return diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path_factory.mktemp("text"),
                                                  condition_image_size=0, steps=4, lr=2e-3))


def test_text_only_training_ships_no_image_encoder(text_model):
    models = load_models(text_model, require=("vae", "dit"))
    assert models.config.image_encoder is None and models.config.dit.image_dim == 0
    assert models.image_encoder is None and not any("image" in k for k in models.dit.state_dict())


def test_condition_images_are_views_of_each_latents_object_centred_like_user_images(dataset, vae_checkpoint, tmp_path):
    import numpy as np

    from ln3diff_rt.images import centre_object
    from training.data.dataset import MultiViewDataset, load_image
    from training.latents import CONDITION_VIEWS

    diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path, steps=1))
    latents = load_latents(tmp_path / "latents" / "train.safetensors")
    records = MultiViewDataset(dataset, "train", 4, 1, 64).records
    assert latents.images.shape == (len(records), CONDITION_VIEWS, 3, 64, 64)
    assert len(latents.object_ids) == 2 * len(records)  # encode_passes 2
    for i, j in enumerate(latents.object_ids.tolist()):
        assert latents.captions[latents.caption_ids[i]] == records[j].caption
    # Each stored view is one of the object's own views, centred and scaled as `images.centre_object` does.
    own = [centre_object(load_image(records[0], f), 64) for f in range(len(records[0].image_paths))]
    for k in range(CONDITION_VIEWS):
        stored = latents.images[0, k].float() / 255.0
        assert min(float((stored - view).abs().max()) for view in own) == 0.0
    other = centre_object(load_image(records[1], 0), 64)
    assert float((latents.images[0].float() / 255.0 - other).abs().amax(dim=(1, 2, 3)).min()) > 0.05
    assert np.unique(latents.images[0].reshape(CONDITION_VIEWS, -1).numpy(), axis=0).shape[0] > 1  # not one view


def test_text_and_image_conditions_are_dropped_independently():
    from ln3diff_rt.config import ImageEncoderConfig
    from ln3diff_rt.models.image_encoder import ImageEncoder
    from ln3diff_rt.sampling import Condition

    seen = {}

    def spy(z, t, context, pooled, image):
        seen.update(context=context, pooled=pooled, image=image)
        return z

    encoder = ImageEncoder(ImageEncoderConfig(image_size=16, channels=(4,), width=8))
    objective = diffusion.FlowObjective(spy, encoder, dropout=0.5)
    n = 256
    context, pooled = torch.randn(n, 3, 5), torch.randn(n, 5)
    null = Condition(torch.zeros(1, 3, 5), torch.zeros(1, 5))
    images = torch.rand(n, 3, 16, 16)
    objective(torch.randn(n, 3, 4, 2, 2), context, pooled, images, null, torch.Generator().manual_seed(0))
    text_dropped = (seen["context"] == 0).all(dim=(1, 2)) & (seen["pooled"] == 0).all(dim=1)
    image_dropped = (seen["image"] == 0).all(dim=(1, 2))
    kept_text = ~text_dropped
    assert torch.equal(seen["context"][kept_text], context[kept_text])
    with torch.no_grad():
        assert torch.equal(seen["image"][~image_dropped], encoder(images)[~image_dropped])
    for dropped in (text_dropped, image_dropped):
        assert 0.4 < dropped.float().mean() < 0.6
    both = (text_dropped & image_dropped).float().mean()
    assert 0.15 < both < 0.35  # about 0.5 * 0.5: independent, not the same draw


def test_init_from_a_text_model_starts_at_it_and_generates_from_an_image(dataset, vae_checkpoint, text_model,
                                                                                 tmp_path):
    import numpy as np

    from ln3diff_rt.options import GenerationOptions
    from ln3diff_rt.pipeline import Generator
    from ln3diff_rt.runner import Request, run
    from training.data.dataset import MultiViewDataset, load_image

    start = diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "start", steps=0,
                                                   init_from=str(text_model)))
    text, image = load_models(text_model), load_models(start, require=("vae", "dit", "image_encoder"))
    assert image.config.latent_scale == text.config.latent_scale  # the DiT learned at the init's scale
    assert image.config.image_encoder.image_size == 64 and image.metadata["init_from"].startswith(text_model.name)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *text.config.latent_shape, generator=g), torch.rand(2, generator=g)
    ctx, pooled = torch.randn(2, 32, 384, generator=g), torch.randn(2, 384, generator=g)
    with torch.no_grad():
        tokens = image.image_encoder(torch.rand(2, 3, 64, 64, generator=g))
        assert torch.equal(image.dit(x, t, ctx, pooled, torch.zeros_like(tokens)), text.dit(x, t, ctx, pooled))
        assert not torch.equal(image.dit(x, t, ctx, pooled, tokens), text.dit(x, t, ctx, pooled))
    # A few steps on: the image now matters, and the pipeline generates from one (the prompt may be empty).
    tuned = diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "tuned", steps=4, lr=2e-3,
                                                   init_from=str(text_model), freeze_dit=True))
    tuned_dit = load_models(tuned).dit.state_dict()
    for name, value in text.dit.state_dict().items():  # --freeze-dit: only the image paths trained
        assert torch.equal(tuned_dit[name], value), name
    assert any(not torch.equal(tuned_dit[name], value) for name, value in image.dit.state_dict().items()
               if "image" in name)
    train = records(tmp_path / "tuned" / "log.jsonl", "train")
    assert all(r["loss"] == pytest.approx(r["flow"] + r["distill"], abs=2e-5) for r in train)  # distillation weight 1
    generator = Generator.from_checkpoint(tuned)
    record = MultiViewDataset(dataset, "val", 4, 1, 64).records[0]
    options = GenerationOptions(steps=2, preview_views=0)
    requests = [Request("", 0, options, mesh=False, image=load_image(record, 0)), Request("a red cube", 0, options,
                                                                                           mesh=False)]
    with_image, without = (r.triplane for r in run(generator, requests))
    assert with_image.shape == without.shape and np.isfinite(with_image.numpy()).all()
    assert not torch.equal(with_image, without)
    # The model card's figure: per image, the image as the encoder sees it, the turntable and the mesh drawing.
    from training.figures import held_out_renders, image_samples

    renders = held_out_renders(str(dataset))
    shapes = {r.meta["ln3diff_synth"]["shape"] for r in MultiViewDataset(dataset, "val", 1, 1).records}
    assert len(renders) == len(shapes)
    row = image_samples(generator, renders[:1], seed=0, views=2)[0]
    assert [tile.shape for tile in row[:3]] == [(64, 64, 3), (128, 128, 3), (128, 128, 3)] and row[3].ndim == 3
    with pytest.raises(Exception, match="does not fit"):
        diffusion.train(small_diffusion_config(dataset, vae_checkpoint, tmp_path / "bad", steps=0,
                                               condition_image_size=0, init_from=str(tuned)))


def test_geometry_losses_are_zero_when_exact_positive_when_wrong_and_carry_gradients():
    from training.geometry_losses import depth_loss, mask_loss, normal_loss

    g = torch.Generator().manual_seed(0)
    weights = torch.rand(2, 50, generator=g) * (torch.rand(2, 50, generator=g) > 0.3)
    depth = (3.0 + torch.rand(2, 50, generator=g)).requires_grad_()
    normals = torch.nn.functional.normalize(torch.randn(2, 50, 3, generator=g), dim=-1).requires_grad_()
    alpha = (torch.rand(2, 50, generator=g) > 0.5).float()
    opacity = torch.rand(2, 50, generator=g).requires_grad_()
    assert depth_loss(depth, depth.detach(), weights).item() == 0.0
    assert normal_loss(normals, normals.detach(), weights).item() == pytest.approx(0.0, abs=1e-6)
    assert mask_loss(alpha, alpha).item() == 0.0
    wrong_normals = torch.nn.functional.normalize(torch.randn(2, 50, 3, generator=g), dim=-1)
    for loss, value in ((depth_loss(depth, depth.detach() + 0.1, weights), depth),
                        (normal_loss(normals, wrong_normals, weights), normals), (mask_loss(opacity, alpha), opacity)):
        assert loss.item() > 0.0
        grad, = torch.autograd.grad(loss, value)
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    # A ray of weight 0 neither counts nor receives gradient; all weights 0 is a loss of 0, not NaN.
    grad, = torch.autograd.grad(depth_loss(depth, depth.detach() + 0.1, weights), depth)
    assert torch.equal(grad[weights == 0], torch.zeros_like(grad[weights == 0]))
    assert depth_loss(depth, depth.detach() + 1.0, torch.zeros_like(weights)).item() == 0.0


def test_field_normals_are_the_outward_normals_and_train_the_field():
    from ln3diff_rt.config import RendererConfig
    from ln3diff_rt.models.field import TriplaneField
    from training.geometry_losses import field_normals, normal_loss

    def ball(planes, points):  # density rises inward through the sphere of radius 0.5
        return torch.nn.functional.softplus(20.0 * (0.5 - points.norm(dim=-1))), None

    g = torch.Generator().manual_seed(1)
    outward = torch.nn.functional.normalize(torch.randn(1, 40, 3, generator=g), dim=-1)
    normals = field_normals(ball, None, 0.5 * outward, step=1.0 / 32)
    torch.testing.assert_close(normals, outward, atol=5e-3, rtol=0)  # central differences: error ~ (step / 0.5)^2
    # On a tri-plane field the loss reaches the planes and the MLP.
    field = TriplaneField(8, RendererConfig(hidden=16))
    planes = torch.randn(1, 3, 8, 16, 16, generator=g).requires_grad_()
    loss = normal_loss(field_normals(field, planes, 0.5 * outward, 1.0 / 16), outward, torch.ones(1, 40))
    loss.backward()
    assert loss.item() > 0.0 and planes.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.parameters())


@pytest.fixture(scope="module")
def mixed_dataset(dataset, tmp_path_factory):
    """The dataset with the depth + normal files of one training object dropped (its albedo kept)."""
    import shutil

    root = tmp_path_factory.mktemp("mixed") / "synth"
    shutil.copytree(dataset, root)
    transforms = sorted((root / "train").glob("*/transforms.json"))[1]
    data = json.loads(transforms.read_text())
    for frame in data["frames"]:
        del frame["normal_depth_path"]
    transforms.write_text(json.dumps(data))
    return root


def test_target_rays_carry_depth_and_normals_of_the_same_pixels_per_object(mixed_dataset):
    from training.data.dataset import MultiViewDataset

    ds = MultiViewDataset(mixed_dataset, "train", 2, 3, 32, "raise", channels=("depth", "normal"),
                          partial_channels=True)
    assert ds.channels == ("depth", "normal")
    with pytest.raises(Exception, match="no depth, normal files"):  # without partial_channels: not accepted
        MultiViewDataset(mixed_dataset, "train", 2, 3, 32, "raise", channels=("depth", "normal"))
    batch = vae_training.collate(ds, [0, 1, 2], epoch=0)
    assert batch["has_depth"].tolist() == batch["has_normal"].tolist() == [True, False, True]
    assert batch["target_depths"][1].abs().sum() == 0 and batch["target_normals"][1].abs().sum() == 0
    rays = vae_training.sample_target_rays(batch, 400, torch.Generator().manual_seed(0), 0.5)
    assert rays["depth"].shape == (3, 400) and rays["normal"].shape == (3, 400, 3)
    assert rays["has_depth"][:, 0].tolist() == [1.0, 0.0, 1.0]
    # Same pixels as the colour: a hit pixel's depth puts its point on the surface the normal belongs to, so
    # target depth and normal agree with the rays (the normal faces the camera, points lie in the scene box).
    hit = (rays["mask"] > 0.99) & (rays["has_depth"] > 0)
    points = rays["origins"] + rays["dirs"] * rays["depth"][..., None]
    assert hit.sum() > 100
    assert (points[hit].abs() <= 0.95).all()
    assert ((rays["normal"] * rays["dirs"]).sum(-1)[hit] < 0).float().mean() > 0.99
    # The same indices as the colour: channels made from the colour come back as that colour's pixels.
    batch.update(target_depths=7.0 * batch["target_images"][:, :, :1], target_normals=batch["target_images"])
    rays = vae_training.sample_target_rays(batch, 400, torch.Generator().manual_seed(0), 0.5)
    assert torch.equal(rays["depth"], 7.0 * rays["rgb"][..., 0]) and torch.equal(rays["normal"], rays["rgb"])


def test_vae_trains_on_mixed_geometry_logs_each_loss_and_resumes_exactly(mixed_dataset, tmp_path, monkeypatch):
    cfg = dict(steps=4, rays_per_object=96, batch_size=3)
    _, log_a = vae_resumes_exactly(monkeypatch, lambda name, resume: small_vae_config(
        mixed_dataset, tmp_path / name, resume=resume, **cfg))

    start = records(tmp_path / "straight" / "log.jsonl", "start")[0]
    assert start["geometry_channels"] == ["depth", "normal"]
    train_objects = start["train_objects"]
    assert start["objects_with"] == {"depth": train_objects - 1, "normal": train_objects - 1}
    assert all(r["mask"] > 0 and r["depth"] > 0 and r["normal"] > 0 for r in log_a)
    assert [r["step"] for r in log_a] == [1, 2, 3, 4]
    c = vae_training.VAETrainConfig(data="")  # the default weights
    for r in log_a:  # the logged total is the weighted sum of the logged parts
        total = r["l1"] + c.mask_weight * r["mask"] + c.kl_weight * r["kl"] + c.depth_weight * r["depth"] + \
            c.normal_weight * r["normal"]
        assert r["loss"] == pytest.approx(total, abs=1e-4)
    # Weights 0 turn the terms off: no channel is read and none is logged, the rest of the step is unchanged.
    vae_training.train(small_vae_config(mixed_dataset, tmp_path / "colour", depth_weight=0.0, normal_weight=0.0,
                                        **{**cfg, "steps": 1}))
    assert records(tmp_path / "colour" / "log.jsonl", "start")[0]["geometry_channels"] == []
    first = records(tmp_path / "colour" / "log.jsonl", "train")[0]
    assert "depth" not in first and "normal" not in first
    assert [first[k] for k in ("l1", "mask", "kl")] == [log_a[0][k] for k in ("l1", "mask", "kl")]


def test_vae_gaps_fits_gain_over_the_encoder(dataset, vae_checkpoint, capsys):
    """The diagnostic's fits start where the encoder's reconstruction is and optimise the views they are measured on,
    so on a barely trained VAE each fit gains PSNR over the stage before it; the command prints every object."""
    from training.vae_gaps import STAGES, gaps, main

    rows = gaps(str(vae_checkpoint), str(dataset), objects=1, steps=25, lr=5e-2, rays=256)
    assert len(rows) == 1 and rows[0]["shape"] is not None
    r = rows[0]
    assert r["latent fit"] > r["encoder"] + 0.1 and r["tri-plane fit"] > r["encoder"] + 0.1, r
    main(["--ckpt", str(vae_checkpoint), "--data", str(dataset), "--objects", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert all(s in out for s in STAGES) and "mean of 1" in out


def test_a_signal_inside_the_optimizer_update_waits_for_it_to_finish():
    """SIGTERM while the weights belong to no step (inside `Interrupts.held`) is raised when the update ends, so the
    loop always has a step to save; outside it, at once. The previous handler comes back."""
    import signal

    from training.common import Interrupts, Terminated

    before = signal.getsignal(signal.SIGTERM)
    interrupts = Interrupts()
    finished = []
    with pytest.raises(Terminated):
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            finished.append("update")  # runs: the signal waited
    assert finished == ["update"]
    with pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    interrupts.restore()
    assert signal.getsignal(signal.SIGTERM) is before
