"""Every registered stage, built from its tiny config, satisfies its Protocol (ghil.interfaces).

Registered model types are the ``ghil.models`` entry points; each must have a ``<type>_tiny.yaml`` option in the
config group of its stage (``policy/`` for chunk policies; ``reasoner/``, ``generator/`` and ``filter/`` as those
stages arrive). Built from it, a stage must pass its stage's contract: a chunk policy returns an in-range chunk for
a fake observation without touching its inputs, trains (finite loss, gradients), and predicts identically after a
save/load round trip.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ghil.checkpoint import MODEL_ENTRY_POINTS, load_pretrained
from ghil.interfaces import ChunkPolicy, Learnable, Reasoner, SubgoalFilter, SubgoalGenerator
from ghil.paths import CONFIG_DIR
from ghil.types import ActionChunk, Observation, PolicyBatch

# config group -> the Protocols its stages satisfy
STAGE_GROUPS = {"policy": (ChunkPolicy, Learnable), "reasoner": (Reasoner,), "generator": (SubgoalGenerator,),
                "filter": (SubgoalFilter,),
                "autoencoder": (Learnable,)}  # shared frozen perception (ghil/nn/autoencoder.py), not a stage
MODEL_TYPES = sorted(e.name for e in entry_points(group=MODEL_ENTRY_POINTS))


def _tiny_options() -> list[tuple[str, str]]:
    return [(group, path.stem) for group in STAGE_GROUPS if (CONFIG_DIR / group).is_dir()
            for path in sorted((CONFIG_DIR / group).glob("*_tiny.yaml"))]


def _build(group: str, option: str):
    # A stage's group is in the defaults list of the recipe that trains it (recipe/<group>.yaml; policy otherwise).
    recipe = group if (CONFIG_DIR / "recipe" / f"{group}.yaml").is_file() else "policy"
    text = ["text_encoder=hash"] if "/text_encoder" in (CONFIG_DIR / "recipe" / f"{recipe}.yaml").read_text() else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"recipe={recipe}", f"{group}={option}", *text])
    torch.manual_seed(0)
    return instantiate(cfg[group], _convert_="all")


def test_every_registered_model_type_has_a_tiny_config():
    assert MODEL_TYPES, "no ghil.models entry points: is the package installed (pip install -e .)?"
    tiny = {option.removesuffix("_tiny") for _, option in _tiny_options()}
    missing = [name for name in MODEL_TYPES if name not in tiny]
    assert not missing, f"model types without a <type>_tiny.yaml config in {sorted(STAGE_GROUPS)}: {missing}"


@pytest.mark.parametrize("group, option", _tiny_options())
def test_tiny_stage_satisfies_its_protocols(group, option):
    stage = _build(group, option)
    for protocol in STAGE_GROUPS[group]:
        assert isinstance(stage, protocol), f"{group}={option} builds a {type(stage).__name__}, not a {protocol.__name__}"


def _fake_observation(policy, rng: np.random.Generator) -> Observation:
    images = {cam: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
              for cam, size in zip(policy.cameras, policy.image_sizes)}
    return Observation(images=images, proprio=rng.normal(size=15).astype(np.float32), t=3,
                       instruction="open the drawer")


def _fake_goal(policy, obs: Observation):
    return obs.images[policy.goal_camera].copy() if policy.uses_goal else None


def _fit(policy) -> None:
    from ghil.normalizer import VectorStats

    rng = np.random.default_rng(0)
    policy.fit_normalizer({"robot_obs": VectorStats.of(rng.normal(size=(64, 15))),
                           policy.space.dataset_key: VectorStats.of(rng.uniform(-1, 1, size=(64, policy.space.dim)))})


@pytest.mark.parametrize("option", [o for g, o in _tiny_options() if g == "policy"])
def test_tiny_chunk_policy_contract(option, tmp_path):
    policy = _build("policy", option)
    _fit(policy)
    rng = np.random.default_rng(0)
    obs = _fake_observation(policy, rng)
    goal = _fake_goal(policy, obs)
    before = {cam: np.array(img) for cam, img in obs.images.items()}
    chunk = policy.predict_chunk(obs, goal, generator=torch.Generator().manual_seed(0))
    assert isinstance(chunk, ActionChunk) and chunk.t0 == obs.t and chunk.space == policy.space.name
    assert chunk.actions.shape[1] == policy.space.dim and len(chunk.actions) >= policy.exec_len
    assert torch.isfinite(chunk.actions).all()
    if policy.space.low is not None:
        assert (chunk.actions >= torch.tensor(policy.space.low)).all()
        assert (chunk.actions <= torch.tensor(policy.space.high)).all()
    assert set(chunk.actions[:, policy.space.gripper_index].tolist()) <= {-1.0, 1.0}
    assert all(np.array_equal(before[cam], obs.images[cam]) for cam in before)  # inputs untouched

    # trains: a finite loss with gradients on a fake batch
    b = 2
    batch = PolicyBatch(images={cam: torch.as_tensor(np.stack([obs.images[cam]] * b)) for cam in policy.cameras},
                        proprio=torch.randn(b, 15), actions=torch.rand(b, len(chunk.actions), policy.space.dim) * 2 - 1,
                        action_mask=torch.ones(b, len(chunk.actions), dtype=torch.bool),
                        goal=torch.as_tensor(np.stack([goal] * b)) if goal is not None else None,
                        instructions=("open the drawer",) * b if policy.uses_language else None)
    policy.train()
    loss, metrics = policy.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    policy.eval()

    # save -> load predicts identically (same noise)
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    again = loaded.predict_chunk(obs, goal, generator=torch.Generator().manual_seed(0))
    first = policy.predict_chunk(obs, goal, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.actions, again.actions)
