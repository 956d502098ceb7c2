"""Safetensors checkpoints: bit-exact round trip and clear errors for bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ln3diff_rt.checkpoint import CheckpointError, load_checkpoint, load_models, save_checkpoint
from ln3diff_rt.config import ModelConfig, get_preset
from ln3diff_rt.random_weights import random_models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    models = random_models("tiny", seed=3)  # no all-zero tensor left by AdaLN-Zero: a mix-up would show
    cfg = models.config.replace(latent_scale=1.234)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(path, cfg, {"vae": models.vae, "dit": models.dit})
    return path, cfg, models.vae, models.dit


def test_config_json_roundtrip():
    for name in ("tiny", "base", "paper"):
        cfg = get_preset(name)
        assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_roundtrip_bit_exact_from_path_alone(saved):
    path, cfg, vae, dit = saved
    models = load_models(path)
    assert models.config == cfg
    for original, loaded in ((vae, models.vae), (dit, models.dit)):
        a, b = original.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(saved, tmp_path):
    path = saved[0]
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_models(bad)


def test_pickle_is_rejected_not_unpickled(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"a": torch.ones(2)}, bad)  # a pickle: must be refused without being loaded
    with pytest.raises(CheckpointError, match=r"model\.pt.*not a readable safetensors"):
        load_checkpoint(bad)


def test_garbage_bytes(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
                    .numpy().tobytes())
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_checkpoint(bad)


def test_wrong_format_version(tmp_path):
    bad = tmp_path / "v9.safetensors"
    save_file({"vae.x": torch.ones(1)}, bad, metadata={"format_version": "9",
                                                       "ln3diff_rt.config": get_preset("tiny").to_json()})
    with pytest.raises(CheckpointError, match=r"v9\.safetensors: format_version '9'"):
        load_checkpoint(bad)


def test_foreign_safetensors_without_config(tmp_path):
    bad = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.ones(3)}, bad)
    with pytest.raises(CheckpointError, match="format_version None"):
        load_checkpoint(bad)
    save_file({"weight": torch.ones(3)}, bad, metadata={"format_version": "1"})
    with pytest.raises(CheckpointError, match="not an ln3diff_rt checkpoint"):
        load_checkpoint(bad)


def test_config_with_unknown_field(tmp_path):
    raw = json.loads(get_preset("tiny").to_json())
    raw["dit"]["flux_capacitor"] = 1
    bad = tmp_path / "future.safetensors"
    save_file({"vae.x": torch.ones(1)}, bad, metadata={"format_version": "1", "ln3diff_rt.config": json.dumps(raw),
                                                       "ln3diff_rt.components": "vae"})
    with pytest.raises(CheckpointError, match="flux_capacitor"):
        load_checkpoint(bad)


def test_weights_that_do_not_match_config(saved, tmp_path):
    _, cfg, _, dit = saved
    wider = cfg.replace(dit=type(cfg.dit)(**{**cfg.dit.__dict__, "width": 192, "heads": 3}))
    bad = tmp_path / "mismatch.safetensors"
    save_checkpoint(bad, wider, {"dit": dit})  # tensors of width 128 under a width-192 config
    with pytest.raises(CheckpointError, match=r"mismatch\.safetensors: component 'dit'.*shape mismatch"):
        load_models(bad)


def test_required_component_missing(saved, tmp_path):
    _, cfg, vae, _ = saved
    only_vae = tmp_path / "vae_only.safetensors"
    save_checkpoint(only_vae, cfg, {"vae": vae})
    assert load_models(only_vae).dit is None
    with pytest.raises(CheckpointError, match="has no 'dit' component"):
        load_models(only_vae, require=("vae", "dit"))
