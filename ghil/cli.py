"""The `ghil` console entry point: `ghil <command> [hydra overrides ...]`.

Each command is a Hydra application whose primary config is ``ghil/configs/<command>.yaml`` (found through the
installed package, so it runs from any folder), so every setting can be overridden on the command line and multirun
(``-m``) works unchanged::

    ghil run "open the drawer"                  # one instruction -> outputs/run/<name>/rollout.mp4, verdict.json
    ghil bench agent=oracle_subgoal_policy --json    # per-stage latency percentiles, actions/s
    ghil demo                                   # scripted expert rollout -> outputs/demo/*.mp4
    ghil collect env=playtable collect.episodes=200 collect.workers=2
    ghil collect --cfg job                      # print the resolved config and exit
    ghil eval agent=expert eval.n_chains=100    # CALVIN evaluation (first 100 official chains)
    ghil eval merge outputs/eval/<run> out=outputs/eval/<run>/merged    # merge shards (plain argparse)
    ghil dagger dagger.policy=checkpoints/dit_small dagger.out_dir=data/dagger/round_1    # expert-labelled rollouts
    ghil pack data.root=data/playtable_play     # memory-mapped training cache -> data/playtable_play/packed
    ghil featurize data.root=data/playtable_play encoder.path=ghil/checkpoints/dit_small featurize.n_views=4
    ghil train policy=dit_small sampler=shortcut data.root=data/playtable_play    # resumes when re-run

A command whose module needs a missing optional dependency (torch for ``ghil train``) stops with one line naming
the extra to install (``ghil.extras``), not a traceback. ``EXAMPLES`` are the command lines ``ghil --help`` shows;
a test composes each of them.
"""

from __future__ import annotations

import importlib
import sys

import hydra
from omegaconf import DictConfig

from ghil.extras import check_config, missing_extra
from ghil.paths import CONFIG_DIR

# command -> "module:function" taking the composed DictConfig; imported lazily so `ghil --help` stays fast.
COMMANDS = {
    "run": ("sim_eval.evaluation.instruction_run:run", 'one instruction in the playtable: video + verdict (ghil run "open the drawer")'),
    "demo": ("sim_eval.evaluation.evaluate:run", "scripted expert on the first official chains, with videos (outputs/demo)"),
    "collect": ("sim_eval.demonstrations.collect:run", "collect CALVIN-format demonstration data with the scripted expert"),
    "eval": ("sim_eval.evaluation.evaluate:run", "CALVIN long-horizon evaluation of an agent (results.json, report.md)"),
    "dagger": ("sim_eval.demonstrations.dagger:run", "on-policy rollouts labelled by the scripted expert, rounds that retrain (dagger.policy=...)"),
    "bench": ("sim_eval.evaluation.bench:run", "per-stage latency (p50/p95) and actions/s of an agent in the playtable (--json)"),
    "pack": ("ghil.data.packed:run", "repack a dataset's splits into the memory-mapped training cache (data.root=...)"),
    "featurize": ("ghil.data.features:run", "cache a frozen checkpoint's image-encoder tokens beside a pack (encoder.path=...)"),
    "launch": ("ros_nodes.launch:run", "the ROS 2 graph from the agent config (robot=sim adds the simulated robot)"),
    "train": ("ghil.train:run", "train a model through a recipe (recipe=policy: policy=dit_small sampler=shortcut|ddim data.root=...)"),
}

# (command, subcommand) -> "module:function" taking the remaining argv; plain argparse programs, not Hydra apps.
SUBCOMMANDS = {
    ("eval", "merge"): ("sim_eval.evaluation.evaluate:merge_main", "merge the shard folders of one evaluation"),
}

# command -> "module:function" taking the remaining argv and returning the exit code; plain argparse programs.
PROGRAMS = {
    "say": ("ros_nodes.say:main", 'publish an instruction to a running graph (ghil say "open the drawer" --wait)'),
}

# command -> the setting its first bare argument sets (`ghil run "open the drawer"`).
POSITIONAL = {"run": "run.instruction"}
# (command, flag) -> the override it stands for (Hydra itself takes no such flags).
FLAGS = {("bench", "--json"): "bench.json=true"}


def _hydra_string(text: str) -> str:
    """``text`` as one quoted Hydra override value (any quotes and backslashes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_overrides(command: str, args: list[str]) -> list[str]:
    """The command line after ``ghil <command>`` as Hydra overrides: a first bare argument becomes its
    ``POSITIONAL`` setting, ``FLAGS`` become their overrides, the rest passes unchanged."""
    if command in POSITIONAL and args and "=" not in args[0] and not args[0].startswith("-"):
        args = [f"{POSITIONAL[command]}={_hydra_string(args[0])}", *args[1:]]
    return [FLAGS.get((command, arg), arg) for arg in args]


# What `ghil --help` shows (tests/test_install.py composes every one of them).
EXAMPLES = (
    'ghil run "open the drawer" agent=oracle_subgoal_policy',
    "ghil bench agent=oracle_subgoal_policy bench.n_steps=100",
    "ghil demo eval.n_chains=2",
    "ghil collect collect.episodes=10 env.static_size=128 env.gripper_size=64",
    "ghil eval agent=oracle_subgoal_policy agent.n_steps=1 eval.n_chains=10 eval.workers=2",
    "ghil pack data.root=data/play",
    "ghil train policy=dit_small sampler=shortcut data.root=data/play run_name=dit_small",
    "ghil launch robot=sim",
    'ghil say "open the drawer" --wait',
)


def _usage() -> str:
    lines = ["usage: ghil <command> [hydra overrides ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  {' '.join(name):<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in PROGRAMS.items()]
    lines += ["", "Overrides use Hydra syntax (`--cfg job` prints the resolved config, `-m` sweeps), e.g.:"]
    lines += [f"  {example}" for example in EXAMPLES]
    return "\n".join(lines)


def _load(target: str, command: str):
    """The command's function; SystemExit with one line when its module needs a missing optional dependency."""
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        message = missing_extra(exc, f"ghil {command}")
        if message is None:
            raise
        raise SystemExit(message) from None
    return getattr(module, func_name)


# Hydra flags after which nothing runs (so nothing to check) or that change what is composed.
_NO_RUN_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc",
                 "--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--package", "-p"}


def _check_extras_first(command: str, overrides: list[str]) -> None:
    """Compose the command's config and check its ``_target_`` imports (``ghil.extras``) before Hydra runs the
    job, because Hydra makes the job's folder (``hydra.run.dir``, inside the output folder) before the command's own
    check can run. Skipped where composing here cannot stand for what Hydra will run (sweeps, flags); the command's
    own check then still reports the same line."""
    from hydra import compose, initialize_config_dir

    if any(arg in _NO_RUN_FLAGS for arg in overrides):
        return
    plain = [arg for arg in overrides if arg not in {"-m", "--multirun"}]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=command, overrides=plain, return_hydra_config=True)
    except Exception:  # sweeps, bad overrides: Hydra reports those itself
        return
    choices = dict(cfg.hydra.runtime.choices)
    del cfg.hydra
    check_config(cfg, f"ghil {command}", choices)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return
    command, overrides = argv[0], argv[1:]
    if command in PROGRAMS:
        sys.exit(_load(PROGRAMS[command][0], command)(overrides))
    overrides = hydra_overrides(command, overrides)
    if overrides and (command, overrides[0]) in SUBCOMMANDS:
        _load(SUBCOMMANDS[(command, overrides[0])][0], command)(overrides[1:])
        return
    if command not in COMMANDS:
        sys.exit(f"ghil: unknown command {command!r}\n\n{_usage()}")
    func = _load(COMMANDS[command][0], command)
    _check_extras_first(command, overrides)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=command)
    def _app(cfg: DictConfig) -> None:
        try:
            func(cfg)
        except ImportError as exc:  # an optional dependency imported late (the config check catches most first)
            message = missing_extra(exc, f"ghil {command}")
            if message is None:
                raise
            raise SystemExit(message) from None

    # Hydra reads sys.argv; present it the overrides as if `python -m <command>` had been run.
    sys.argv = [f"ghil {command}", *overrides]
    _app()


if __name__ == "__main__":
    main()
