"""Settings are defined once: every settings dataclass's defaults equal its base YAML file's values, every field is
in the YAML (or excluded here with a reason), every YAML key is a field (or a run-level key listed here), and the
shipped checkpoints store every field explicitly (so changing a dataclass default never changes their meaning)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ghil.data.policy_dataset import PolicyDataConfig
from ghil.nn.encoders import ClipTextConfig, HashTextConfig, MiniLMConfig
from ghil.paths import CONFIG_DIR
from ghil.train import TrainConfig
from policies.ddim import DDIMConfig
from policies.dit import DiTConfig
from policies.shortcut import ShortcutConfig
from sim_eval.demonstrations.collect import CollectSettings
from sim_eval.evaluation.evaluate import EvalSettings

SHIPPED = Path(__file__).resolve().parents[1] / "ghil" / "checkpoints"


@dataclasses.dataclass
class Case:
    cls: type
    file: str  # under ghil/configs/
    node: str | None  # the key holding the settings (None: the whole file)
    not_compared: dict[str, str] = dataclasses.field(default_factory=dict)  # in the YAML, value not compared: why
    not_in_yaml: dict[str, str] = dataclasses.field(default_factory=dict)  # fields the YAML leaves out: why
    yaml_only: dict[str, str] = dataclasses.field(default_factory=dict)  # YAML keys that are no field: why


CASES = [
    Case(TrainConfig, "train.yaml", "train",
         not_compared={"out_dir": "required in code; the YAML derives it from run_name (runs/${run_name})"}),
    Case(PolicyDataConfig, "recipe/policy.yaml", "data",
         not_compared={"root": "required in code (where the data is); the YAML names `ghil collect`'s default "
                               "output"}),
    Case(DiTConfig, "policy/dit_small.yaml", "config",
         not_compared={"text_encoder": "the YAML interpolates the text_encoder group (checked separately below)"}),
    Case(DDIMConfig, "sampler/ddim.yaml", None),
    Case(ShortcutConfig, "sampler/shortcut.yaml", None),
    Case(MiniLMConfig, "text_encoder/minilm.yaml", None),
    Case(ClipTextConfig, "text_encoder/clip.yaml", None),
    Case(HashTextConfig, "text_encoder/hash.yaml", None),
    Case(EvalSettings, "eval.yaml", "eval",
         not_compared={"out_dir": "the YAML names the folder after the agent/env/mode choices (${hydra:...}); "
                                  "the code default is a placeholder for direct use"}),
    Case(CollectSettings, "collect.yaml", "collect",
         yaml_only={k: "a run-level setting read by collect.run, not sent to the episode workers"
                    for k in ("out_dir", "episodes", "workers", "overwrite")}),
]


def _load(case: Case) -> dict:
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / case.file), resolve=False)
    node = raw[case.node] if case.node else raw
    return {k: v for k, v in node.items() if k != "defaults"}


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _differences(cls: type, yaml_node: dict, case: Case, prefix: str = "") -> list[str]:
    problems = []
    names = {f.name for f in dataclasses.fields(cls)}
    target = yaml_node.get("_target_")
    if target is not None and target != f"{cls.__module__}.{cls.__qualname__}":
        problems.append(f"{prefix}_target_ {target} is not {cls.__module__}.{cls.__qualname__}")
    for key in sorted(set(yaml_node) - names - {"_target_"}):
        if not prefix and key in case.yaml_only:
            continue
        problems.append(f"{prefix}{key}: in the YAML but not a field of {cls.__qualname__}")
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if f.name not in yaml_node:
            if not (not prefix and f.name in case.not_in_yaml):
                problems.append(f"{path}: a field of {cls.__qualname__} missing from the YAML")
            continue
        if not prefix and f.name in case.not_compared:
            continue
        default, value = _default(f), yaml_node[f.name]
        if default is dataclasses.MISSING:
            continue  # required: the YAML supplies it
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                problems.append(f"{path}: the YAML has {value!r}, the default is a {type(default).__qualname__}")
            else:
                problems += _differences(type(default), value, case, prefix=f"{path}.")
            # the nested dataclass's own defaults must equal the outer default too
            problems += [f"{path}.{g.name}: {cls.__qualname__}'s default {getattr(default, g.name)!r} differs from "
                         f"{type(default).__qualname__}'s {_default(g)!r}"
                         for g in dataclasses.fields(default) if _default(g) is not dataclasses.MISSING
                         and _plain(getattr(default, g.name)) != _plain(_default(g))]
            continue
        if _plain(default) != _plain(value) or isinstance(default, bool) != isinstance(value, bool):
            problems.append(f"{path}: dataclass default {default!r} != YAML {value!r}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.cls.__name__ for c in CASES])
def test_dataclass_defaults_equal_the_yaml(case):
    problems = _differences(case.cls, _load(case), case)
    assert not problems, f"{case.file} vs {case.cls.__qualname__}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("case", CASES, ids=[c.cls.__name__ for c in CASES])
def test_exclusions_are_current(case):
    """Every exclusion names a real field (or key) and states a reason; not_in_yaml fields really are absent."""
    names = {f.name for f in dataclasses.fields(case.cls)}
    node = _load(case)
    for key, reason in {**case.not_compared, **case.not_in_yaml}.items():
        assert key in names and reason, key
    for key in case.not_compared:
        assert key in node, key
    for key in case.not_in_yaml:
        assert key not in node, key
    for key, reason in case.yaml_only.items():
        assert key in node and key not in names and reason, key


def test_dit_text_encoder_default_is_the_recipe_default():
    """DiTConfig.text_encoder defaults to the text_encoder group option the policy recipe picks."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "recipe" / "policy.yaml"), resolve=False)
    chosen = next(entry["/text_encoder"] for entry in raw["defaults"] if isinstance(entry, dict)
                  and "/text_encoder" in entry)
    target = OmegaConf.load(CONFIG_DIR / "text_encoder" / f"{chosen}.yaml")["_target_"]
    default = DiTConfig().text_encoder
    assert target == f"{type(default).__module__}.{type(default).__qualname__}"
    assert _load(CASES[2])["text_encoder"] == "${text_encoder}"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "policy").glob("*.yaml")))
def test_presets_override_only_real_fields(preset):
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "policy" / f"{preset}.yaml"), resolve=False)
    config = node.get("config", {})
    fields = {f.name: _default(f) for f in dataclasses.fields(DiTConfig)}
    for key, value in config.items():
        assert key == "_target_" or key in fields, f"{preset}: {key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(fields.get(key)):
            inner = {f.name for f in dataclasses.fields(fields[key])}
            assert set(value) <= inner, f"{preset}: {key}.{sorted(set(value) - inner)}"


@pytest.mark.parametrize("name", ["dit_small", "dit_lang"])
def test_shipped_checkpoints_store_every_field(name):
    """config.json holds every field of every config explicitly, so dataclass defaults do not change its meaning;
    the checkpoint loads with the same configuration it stores."""
    from ghil.checkpoint import config_to_dict, load_pretrained

    stored = json.loads((SHIPPED / name / "config.json").read_text())["init"]

    def check(cls_value, data, path):
        for f in dataclasses.fields(cls_value):
            assert f.name in data, f"{name}: {path}{f.name} not stored"
            if dataclasses.is_dataclass(getattr(cls_value, f.name)):
                check(getattr(cls_value, f.name), data[f.name], f"{path}{f.name}.")

    policy = load_pretrained(SHIPPED / name)
    for key, value in policy.init_kwargs().items():
        check(value, stored[key], f"{key}.")
        assert config_to_dict(value) == stored[key]
