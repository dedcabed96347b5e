"""Checkpoints: config.json + model.safetensors, strict loading with named keys, clear errors, nothing pickled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _policy_fixtures import fake_stats, tiny_config

from ghil.checkpoint import CONFIGS, MODELS, CheckpointError, config_from_dict, config_to_dict, load_pretrained
from policies.ddim import DDIMConfig
from policies.dit import DiTPolicy
from policies.shortcut import ShortcutConfig

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path) -> Path:
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    policy.fit_normalizer(fake_stats())
    return policy.save_pretrained(tmp_path / "ckpt")


def test_layout_and_config_round_trip(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((saved / "config.json").read_text())
    assert meta["type"] == "dit" and meta["format_version"] == 1 and len(meta["weights_sha256"]) == 64
    assert meta["init"]["sampler"]["type"] == "shortcut" and meta["init"]["config"]["type"] == "dit_config"
    config = tiny_config()
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    assert "dit" in MODELS and {"ddim", "shortcut", "dit_config", "minilm", "augment"} <= set(CONFIGS)


def test_wrong_type_newer_format_and_missing_files(saved, tmp_path):
    meta = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**meta, "type": "susie"}))
    with pytest.raises(CheckpointError, match="'susie' checkpoint, not 'dit'"):  # another registered kind
        DiTPolicy.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**meta, "type": "teleporter"}))
    with pytest.raises(CheckpointError, match="unknown type 'teleporter'"):
        load_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        DiTPolicy.from_pretrained(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        DiTPolicy.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="does not exist"):
        DiTPolicy.from_pretrained(tmp_path / "nowhere")


def test_corrupted_or_truncated_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="modified or corrupted"):  # the content hash catches it first
        DiTPolicy.from_pretrained(saved)
    meta = json.loads((saved / "config.json").read_text())
    del meta["weights_sha256"]  # an older checkpoint without a hash: the safetensors reader still refuses it
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        DiTPolicy.from_pretrained(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        DiTPolicy.from_pretrained(saved)


def test_other_architecture_names_the_keys(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["init"]["sampler"] = config_to_dict(DDIMConfig())  # no step-size embedding in a DDIM network
    del meta["init_sha256"]  # an older, unhashed config (a hashed one is refused as modified before this check)
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unexpected keys: net\.step_size\.weight"):
        DiTPolicy.from_pretrained(saved)


def test_unknown_config_fields_are_refused(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["init"]["config"]["warp_drive"] = True
    del meta["init_sha256"]  # an older, unhashed config (a hashed one is refused as modified before this check)
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="warp_drive"):
        DiTPolicy.from_pretrained(saved)


def test_nothing_is_unpickled_anywhere():
    pattern = re.compile(r"torch\.load\((?![^)]*weights_only=True)")
    offenders = [str(p.relative_to(REPO)) for folder in ("ghil", "policies", "planners", "sim_eval", "ros_nodes")
                 for p in (REPO / folder).rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
