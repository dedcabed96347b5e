"""Every primary config composes, every group option composes into it, and every `_target_` imports."""

from __future__ import annotations

import importlib

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ghil.cli import COMMANDS, CONFIG_DIR, main

PRIMARY = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name != "hydra")


def _targets(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            found.append(node["_target_"])
        for value in node.values():
            found += _targets(value)
    elif isinstance(node, list):
        for value in node:
            found += _targets(value)
    return found


def _import_target(target: str) -> None:
    module, _, attr = target.rpartition(".")
    assert hasattr(importlib.import_module(module), attr), target


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes_and_targets_import(name):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(name)
    for target in _targets(OmegaConf.to_container(cfg, resolve=False)):
        _import_target(target)


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_group_option_targets_import(group, option):
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml"), resolve=False)
    for target in _targets(node):
        _import_target(target)


def test_every_command_has_a_config_and_a_function():
    for command, (target, _) in COMMANDS.items():
        assert (CONFIG_DIR / f"{command}.yaml").exists(), command
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_cli_help_and_unknown_command(capsys):
    main(["--help"])
    assert "collect" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'colect'"):
        main(["colect"])
