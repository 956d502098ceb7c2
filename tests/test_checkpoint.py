"""Safetensors checkpoints: bit-exact round trip and clear errors for bad files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ln3diff_rt.checkpoint import (
    TENSOR_SHA256_KEY,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    load_models,
    save_checkpoint,
)
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


# -- integrity: the tensor digest written by every writer, dtypes, finite weights (issue 17) ------------------------


def tensor_span(path, name: str) -> tuple[int, int]:
    """File offsets [start, stop) of tensor `name`'s bytes, from the safetensors header."""
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + header_size])[name]["data_offsets"]
    return 8 + header_size + begin, 8 + header_size + end


def test_a_flipped_data_byte_is_refused_naming_the_tensor(saved, tmp_path):
    path = saved[0]
    raw = bytearray(path.read_bytes())
    start, stop = tensor_span(path, "dit.blocks.0.attn.to_kv.weight")
    raw[(start + stop) // 2] ^= 0x10  # one bit of one weight
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"flipped.safetensors: tensor dit.blocks.0.attn.to_kv.weight: sha256"):
        load_models(bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int64, torch.bool])
def test_a_tensor_stored_in_another_dtype_is_refused(saved, tmp_path, dtype):
    _, cfg, vae, dit = saved
    state = dict(dit.state_dict())
    state["final.weight"] = state["final.weight"].to(dtype)
    bad = tmp_path / "dtype.safetensors"
    save_checkpoint(bad, cfg, {"vae": vae, "dit": state})  # a valid digest of the wrong thing
    with pytest.raises(CheckpointError, match=rf"'dit'.*final\.weight.*{str(dtype).removeprefix('torch.')}"):
        load_models(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_naming_the_tensor(saved, tmp_path, value):
    _, cfg, vae, dit = saved
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    state["field.mlp.0.weight"][3, 1] = value
    bad = tmp_path / "nan.safetensors"
    save_checkpoint(bad, cfg, {"vae": state, "dit": dit})
    with pytest.raises(CheckpointError, match=r"nan.safetensors: vae tensor field.mlp.0.weight holds NaN or infinite"):
        load_models(bad)


def test_the_digest_covers_the_tensors_not_the_file(saved, tmp_path):
    """The same weights with other metadata have the same digest; a file written before digests loads, its
    digest computed from what it holds."""
    path, cfg, vae, dit = saved
    digest = load_models(path).sha256
    assert len(digest) == 64 and digest != file_sha256(path)
    renamed = tmp_path / "other-metadata.safetensors"
    save_checkpoint(renamed, cfg, {"vae": vae, "dit": dit}, {"train_steps": "123"})
    assert load_models(renamed).sha256 == digest
    old = tmp_path / "before-digests.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != TENSOR_SHA256_KEY}
        save_file({k: f.get_tensor(k) for k in f.keys()}, old, metadata=meta)
    models = load_models(old)
    assert models.sha256 == digest and not models.sha256_verified
    assert load_models(path).sha256_verified


def test_every_writer_records_the_digest(saved, tmp_path):
    from ln3diff_rt.checkpoint import atomic_save_safetensors

    other = tmp_path / "shard.safetensors"
    atomic_save_safetensors({"x": torch.arange(6.0).reshape(2, 3)}, other, {"kind": "latents"})
    for path in (saved[0], other):
        with safe_open(str(path), "pt") as f:
            digests = json.loads(f.metadata()[TENSOR_SHA256_KEY])
            assert set(digests) == set(f.keys())


def test_stale_temporary_files_of_a_killed_save_are_removed(tmp_path):
    from ln3diff_rt.checkpoint import atomic_save_safetensors, remove_stale_temporaries

    stale = tmp_path / ".model.safetensors.k3j2h1.tmp"  # what a save killed before its rename leaves
    stale.write_bytes(b"half a file")
    keep = tmp_path / "notes.tmp"
    keep.write_text("not ours")
    atomic_save_safetensors({"x": torch.ones(1)}, tmp_path / "model.safetensors", {})
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and keep.exists() and (tmp_path / "model.safetensors").exists()
