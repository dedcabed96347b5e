"""The `ghil` console entry point: `ghil <command> [hydra overrides ...]`.

Each command is a Hydra application whose primary config is ``configs/<command>.yaml``, so every setting can be
overridden on the command line and multirun (``-m``) works unchanged::

    ghil demo                                   # scripted expert rollout -> outputs/demo/*.mp4
    ghil collect env=playtable collect.episodes=200 collect.workers=2
    ghil collect --cfg job                      # print the resolved config and exit
    ghil eval agent=expert eval.n_chains=100    # CALVIN evaluation (first 100 official chains)
    ghil eval merge outputs/eval/<run> out=outputs/eval/<run>/merged    # merge shards (plain argparse)
    ghil train policy=dit_small sampler=shortcut data.root=data/playtable_play    # resumes when re-run
"""

from __future__ import annotations

import importlib
import sys

import hydra
from omegaconf import DictConfig

from ghil.paths import CONFIG_DIR

# command -> "module:function" taking the composed DictConfig; imported lazily so `ghil --help` stays fast.
COMMANDS = {
    "demo": ("sim_eval.evaluation.evaluate:run", "scripted expert on the first official chains, with videos (outputs/demo)"),
    "collect": ("sim_eval.demonstrations.collect:run", "collect CALVIN-format demonstration data with the scripted expert"),
    "eval": ("sim_eval.evaluation.evaluate:run", "CALVIN long-horizon evaluation of an agent (results.json, report.md)"),
    "train": ("ghil.train:run", "train a low-level policy (policy=dit_small sampler=ddim|shortcut data.root=...)"),
}

# (command, subcommand) -> "module:function" taking the remaining argv; plain argparse programs, not Hydra apps.
SUBCOMMANDS = {
    ("eval", "merge"): ("sim_eval.evaluation.evaluate:merge_main", "merge the shard folders of one evaluation"),
}


def _usage() -> str:
    lines = ["usage: ghil <command> [hydra overrides ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  {' '.join(name):<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Overrides use Hydra syntax, e.g. `ghil collect collect.episodes=10 env.camera.static_size=128`."]
    return "\n".join(lines)


def _load(target: str):
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return
    command, overrides = argv[0], argv[1:]
    if overrides and (command, overrides[0]) in SUBCOMMANDS:
        _load(SUBCOMMANDS[(command, overrides[0])][0])(overrides[1:])
        return
    if command not in COMMANDS:
        sys.exit(f"ghil: unknown command {command!r}\n\n{_usage()}")
    func = _load(COMMANDS[command][0])

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=command)
    def _app(cfg: DictConfig) -> None:
        func(cfg)

    # Hydra reads sys.argv; present it the overrides as if `python -m <command>` had been run.
    sys.argv = [f"ghil {command}", *overrides]
    _app()


if __name__ == "__main__":
    main()
