"""`ghil eval`: CALVIN's long-horizon evaluation (protocol §5) of any ``CalvinAgent`` on any env, resumable,
parallel and shardable, with results.json, report.md, a console table and rollout videos.

    ghil eval                                            # agent=expert env=playtable, first 100 official chains
    ghil eval agent=expert env=calvin env.cameras=[] eval.n_videos=0
    ghil eval eval.n_chains=1000 eval.workers=2          # the full official protocol
    ghil eval eval.mode=heldout_phrasings                # or long_horizon
    ghil eval -m eval.shard=0,1,2,3 eval.n_shards=4 hydra/launcher=joblib      # shards, then:
    ghil eval merge outputs/eval/<run> out=outputs/eval/<run>/merged

Run folder (``eval.out_dir``, or ``<out_dir>/shard_KKK-of-NNN`` for a shard):

* ``run.json``: the configuration fingerprint, the full resolved config and this folder's chain indices, written
  before the first chain; a later run into the same folder resumes only if its fingerprint matches.
* ``chains.jsonl``: one ``ChainRecord`` per finished chain, appended and fsynced as each finishes (a torn last
  line from a kill is dropped on resume, so no chain is lost or counted twice).
* ``status.json``: ``running`` / ``complete`` / ``failed`` (with the error) / ``interrupted`` (Ctrl-C or SIGTERM).
* ``results.json``, ``report.md``, ``per_task.svg``, ``sr_curve.svg``, ``videos/chain_NNNN.mp4``.

Chains are independent: each is seeded from ``(eval.seed, chain index)`` and starts with an env reset, so a
chain's record never depends on the worker count, the shard or what ran before it.

With the watchdog (``eval.step_timeout_s``, default 60 s) chains run in supervised worker processes, also for
``eval.workers=1``: a step that does not return in time is recorded as failure ``stuck`` and its worker killed and
replaced (see "worker processes" below).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ghil.config_diff import config_diff
from ghil.interfaces import CalvinAgent
from sim_eval.protocol.chains import NUM_OFFICIAL_CHAINS, load_official_chains
from sim_eval.protocol.instructions import MODES, load_phrasings
from sim_eval.evaluation.metrics import EvalMetrics, summarize
from sim_eval.evaluation.records import (FAILURE_AGENT_ERROR, FAILURE_STUCK, ChainRecord, RecordError,
                                         SubtaskRecord)
from sim_eval.evaluation.report import console_table, write_report
from sim_eval.evaluation.rollout import EP_LEN, Chain, chain_seed, instructions_for, run_chain

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RUN_FILE, CHAINS_FILE, STATUS_FILE = "run.json", "chains.jsonl", "status.json"
RESULTS_FILE, LOCK_FILE = "results.json", ".lock"
# Everything ghil eval writes in a run folder: eval.overwrite deletes these names and nothing else.
GHIL_FILES = (RUN_FILE, CHAINS_FILE, STATUS_FILE, RESULTS_FILE, "report.md", "per_task.svg", "sr_curve.svg")
VIDEO_NAME = re.compile(r"chain_\d{4}(\.partial)?\.mp4")
# A run stops as misconfigured when its first min(MISCONFIGURED_CHAINS, chains in the folder) chains all failed
# their first subtask with the same agent error.
MISCONFIGURED_CHAINS = 3


class EvaluationError(RuntimeError):
    """A run that cannot start or did not finish: bad settings, a locked or mismatched folder, a failed chain."""


class ConfigMismatchError(EvaluationError):
    """The results folder was made with a different configuration (resuming would mix two experiments)."""


class AgentMisconfiguredError(EvaluationError):
    """The first chains all failed at once with the same agent error: the agent cannot act in this setup."""


class EvaluationInterrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: workers stopped, ``status.json: interrupted``, a non-zero exit."""


@dataclass(frozen=True)
class EvalSettings:
    """``cfg.eval``: which chains, which protocol variant, and how to run them."""

    n_chains: int = 100  # evaluate official chains [chain_start, chain_start + n_chains)
    chain_start: int = 0  # 0: "the first N of the official 1000", what reports use
    mode: str = "standard"  # standard | heldout_phrasings | long_horizon
    # A YAML file (task name -> list of instructions): the user's phrasings replace the mode's wording for the tasks
    # it lists, one seeded choice per subtask (sim_eval.protocol.instructions.load_phrasings).
    phrasings: str | None = None
    ep_len: int = EP_LEN  # env steps per subtask; CALVIN's 360, anything else is not the protocol
    seed: int = 0  # base seed; chain i is seeded with chain_seed(seed, i)
    workers: int = 1  # worker processes on this machine (1: run in this process)
    threads: int | None = None  # torch threads per process running chains (null: torch's default); 1 with workers
    shard: int = 0  # this job runs the chains at positions shard, shard + n_shards, ... of the subset
    n_shards: int = 1
    out_dir: str = "outputs/eval/run"
    n_videos: int = 3  # rollout videos of the first n_videos chains of the subset
    video_fps: int = 30
    overwrite: bool = False  # discard an existing results folder instead of resuming it
    agent_errors: str = "record"  # record: an exception in agent.step fails that subtask (agent_error); raise: stop
    # Build a new env for every chain. calvin_env's reset keeps pybullet's contact caches and solver warm starts,
    # so there a chain's outcome depends (slightly) on the chains run before it in the same env, i.e. on the worker
    # count and sharding; a fresh env makes each record a function of the chain alone (~0.5 s extra per chain).
    # The playtable already resets history-free, so it needs no rebuild.
    fresh_env_per_chain: bool = False
    # Watchdog: a step (agent.step + env.step) or a subtask's reset that does not return within this many seconds is
    # recorded as failure "stuck" and its worker process killed (pybullet can loop forever in C, where no signal
    # reaches it); chains then run in supervised child processes, also with workers=1. null: no watchdog, and
    # workers=1 runs the chains in this process.
    step_timeout_s: float | None = 60.0

    def __post_init__(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("n_chains", "chain_start", "ep_len", "seed", "workers", "shard", "n_shards", "n_videos",
                     "video_fps"):
            if not is_int(getattr(self, name)):
                raise EvaluationError(f"eval.{name} must be an integer, got {getattr(self, name)!r}")
        if not (0 <= self.chain_start < NUM_OFFICIAL_CHAINS and 1 <= self.n_chains
                and self.chain_start + self.n_chains <= NUM_OFFICIAL_CHAINS):
            raise EvaluationError(
                f"the chain subset [{self.chain_start}, {self.chain_start + self.n_chains}) is outside the official "
                f"{NUM_OFFICIAL_CHAINS} chains: need 0 <= eval.chain_start and 1 <= eval.n_chains with "
                f"chain_start + n_chains <= {NUM_OFFICIAL_CHAINS}")
        if self.mode not in MODES:
            raise EvaluationError(f"unknown eval.mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.phrasings is not None:
            try:
                table = load_phrasings(self.phrasings)
            except ValueError as err:
                raise EvaluationError(str(err)) from None
            object.__setattr__(self, "_phrasing_table", table)  # loaded and checked once, before any run
        if self.ep_len < 1:
            raise EvaluationError(f"eval.ep_len must be >= 1, got {self.ep_len}")
        if self.workers < 1:
            raise EvaluationError(f"eval.workers must be >= 1, got {self.workers}")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            raise EvaluationError(f"eval.threads must be null or an integer >= 1, got {self.threads!r}")
        timeout = self.step_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise EvaluationError(f"eval.step_timeout_s must be null or a number > 0 (seconds), got {timeout!r}")
        if not (1 <= self.n_shards <= self.n_chains and 0 <= self.shard < self.n_shards):
            raise EvaluationError(f"need 1 <= eval.n_shards <= n_chains ({self.n_chains}) and 0 <= eval.shard < "
                                  f"n_shards, got shard={self.shard}, n_shards={self.n_shards}")
        if self.agent_errors not in ("record", "raise"):
            raise EvaluationError(f"eval.agent_errors must be 'record' or 'raise', got {self.agent_errors!r}")
        if self.n_videos < 0 or self.video_fps < 1:
            raise EvaluationError("eval.n_videos must be >= 0 and eval.video_fps >= 1")

    @classmethod
    def from_config(cls, node) -> EvalSettings:
        raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise EvaluationError(f"unknown eval settings {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**raw)

    @property
    def phrasing_table(self) -> dict[str, tuple[str, ...]] | None:
        return getattr(self, "_phrasing_table", None)

    def phrasings_record(self) -> dict | None:
        """The phrasings in force, as results.json and the resume fingerprint record them (content, not path)."""
        table = self.phrasing_table
        if table is None:
            return None
        canonical = json.dumps({k: list(v) for k, v in sorted(table.items())}, sort_keys=True)
        return {"file": str(self.phrasings), "sha256": hashlib.sha256(canonical.encode()).hexdigest(),
                "table": json.loads(canonical)}

    @property
    def subset(self) -> range:
        return range(self.chain_start, self.chain_start + self.n_chains)

    @property
    def chain_indices(self) -> list[int]:
        """The official chain indices this job runs."""
        return list(self.subset[self.shard::self.n_shards])

    @property
    def run_dir(self) -> Path:
        base = Path(self.out_dir)
        return base if self.n_shards == 1 else base / f"shard_{self.shard:03d}-of-{self.n_shards:03d}"

    @property
    def subset_label(self) -> str:
        if self.chain_start == 0:
            return f"official[0:{self.n_chains}] (the first {self.n_chains} of the official 1000)"
        return f"official[{self.chain_start}:{self.chain_start + self.n_chains}] of the official 1000"

    def protocol(self) -> dict:
        """The settings that change results (fingerprinted); workers, sharding, videos, paths and the watchdog do
        not. ``threads`` does: torch's thread count changes learned agents' actions in the 6th decimal, which a
        rollout amplifies."""
        out = {"n_chains": self.n_chains, "chain_start": self.chain_start, "mode": self.mode,
               "ep_len": self.ep_len, "seed": self.seed, "fresh_env_per_chain": self.fresh_env_per_chain,
               "threads": self.threads}
        if self.phrasing_table is not None:  # absent otherwise, so earlier runs' fingerprints still match
            out["phrasings_sha256"] = self.phrasings_record()["sha256"]
        return out


@dataclass
class EvalResult:
    """What ``run`` / ``merge`` produced."""

    run_dir: Path
    records: list[ChainRecord]  # sorted by chain index
    metrics: EvalMetrics | None  # None when no chain finished
    complete: bool
    results: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- configuration
def resolved_config(cfg: DictConfig) -> dict:
    """The full config as plain data (interpolations resolved), without Hydra's own node."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    return data


def fingerprint_of(config: dict, settings: EvalSettings) -> tuple[str, dict]:
    """A short hash of everything that determines the results: env, agent and the protocol settings."""
    missing = [k for k in ("env", "agent") if k not in config]
    if missing:
        raise EvaluationError(f"the config has no {missing} section; compose it with env=... agent=...")
    protocol = {"env": config["env"], "agent": config["agent"], "eval": settings.protocol()}
    return _digest(protocol), protocol


def _digest(protocol: dict) -> str:
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_run_meta(meta) -> bool:
    """Whether ``meta`` (a parsed run.json) is one ghil eval wrote: its keys, and a fingerprint that is the hash of
    its protocol (a file that merely parses, or whose fingerprint was edited, is not)."""
    return (isinstance(meta, dict) and isinstance(meta.get("protocol"), dict)
            and isinstance(meta.get("fingerprint"), str)
            and {"format_version", "shard", "n_shards", "chain_indices", "config"} <= set(meta)
            and _digest(meta["protocol"]) == meta["fingerprint"])


def _choice_names(config: dict) -> dict:
    """``{"env": ..., "agent": ...}``: the Hydra group choices when running under Hydra, else the targets."""
    names = {k: str(config[k].get("_target_", "?")).rsplit(".", 1)[-1] for k in ("env", "agent")}
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
        names.update({k: choices[k] for k in ("env", "agent") if choices.get(k)})
    except Exception:  # not under @hydra.main (tests, merge): keep the class names
        pass
    return names


def _git_info() -> dict:
    from ghil.paths import git_state

    return git_state()


def _version() -> str:
    try:
        return metadata.version("ghil")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------- run folder
class RunFolder:
    """One results folder: metadata, the append-only chain log, status and an exclusive lock.

    Example::

        folder = RunFolder(path)
        with folder.locked():
            done = folder.start(meta, overwrite=False)   # -> records already there (resume)
            folder.append(record)
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- lock: refuses a second run into the same folder; a lock left by a killed run on this host is taken over
    def locked(self):
        folder = self

        class _Lock:
            def __enter__(self_inner):
                folder._acquire()
                return folder

            def __exit__(self_inner, *exc):
                (folder.path / LOCK_FILE).unlink(missing_ok=True)

        return _Lock()

    def _acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = lock.read_text().strip() if lock.exists() else ""
                host, _, pid = owner.partition(":")
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    log.warning("taking over the lock of a run that is gone (%s) in %s", owner, self.path)
                    lock.unlink(missing_ok=True)
                    continue
                raise EvaluationError(
                    f"{self.path} is in use by another evaluation ({owner or 'unknown owner'}); wait for it, or "
                    f"delete {lock} if that run is dead") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return
        raise EvaluationError(f"could not lock {self.path}")

    # -- metadata
    def read_meta(self) -> dict | None:
        path = self.path / RUN_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path} is corrupt ({exc}); move the folder away to start over") from None

    def start(self, meta: dict, overwrite: bool) -> list[ChainRecord]:
        """Prepare the folder for ``meta``'s run; return the chain records it already holds (resume)."""
        old = self.read_meta()
        if old is not None and not _is_run_meta(old):
            raise EvaluationError(
                f"{self.path / RUN_FILE} is not the run.json of a ghil eval results folder (its keys, or a "
                f"fingerprint that is the hash of its protocol, are missing); refusing to resume or to delete "
                f"anything in {self.path}. Use another eval.out_dir.")
        if old is not None and overwrite:
            self._discard()
            old = None
        if old is None:
            if (self.path / CHAINS_FILE).exists():
                raise EvaluationError(f"{self.path} has {CHAINS_FILE} but no {RUN_FILE}; move it away")
            _write_json_atomic(self.path / RUN_FILE, meta)
            return []
        if old.get("format_version") != FORMAT_VERSION:
            raise EvaluationError(f"{self.path} was written by another results format "
                                  f"({old.get('format_version')}); use another eval.out_dir")
        if old["fingerprint"] != meta["fingerprint"] or old["shard"] != meta["shard"] \
                or old["n_shards"] != meta["n_shards"]:
            changes = config_diff({"protocol": old["protocol"], "shard": old["shard"], "n_shards": old["n_shards"]},
                            {"protocol": meta["protocol"], "shard": meta["shard"], "n_shards": meta["n_shards"]})
            raise ConfigMismatchError(
                f"{self.path} holds results of a different configuration, so resuming would mix two experiments. "
                f"Changed: {'; '.join(changes)}. Use another eval.out_dir, or eval.overwrite=true to discard "
                f"the old results.")
        history = old.get("git_history", [old.get("git")])
        if meta["git"] not in history:
            log.warning("resuming %s (made at commit %s) from commit %s: the code changed between sessions; "
                        "results.json lists every commit in git_history", self.path,
                        old.get("git", {}).get("commit"), meta["git"]["commit"])
            _write_json_atomic(self.path / RUN_FILE, {**old, "git_history": [*history, meta["git"]]})
        return self.read_records(expected=meta["chain_indices"], repair=True)

    def _discard(self) -> None:
        """Delete the files ghil eval wrote here (``GHIL_FILES``, ``videos/chain_NNNN.mp4``), nothing else."""
        videos = self.path / "videos"
        if videos.is_symlink():
            raise EvaluationError(f"{videos} is a link; refusing to delete in it (eval.overwrite=true)")
        for name in GHIL_FILES:
            (self.path / name).unlink(missing_ok=True)
        if videos.is_dir():
            for item in videos.iterdir():
                if VIDEO_NAME.fullmatch(item.name) and (item.is_symlink() or item.is_file()):
                    item.unlink()
            with contextlib.suppress(OSError):  # other files in it are not ghil's: kept, and so is the folder
                videos.rmdir()

    # -- chain log
    def read_records(self, expected: list[int] | None = None, repair: bool = False) -> list[ChainRecord]:
        """Parse ``chains.jsonl``. A torn last line (killed mid-write) is dropped, and cut off when ``repair``.
        Corrupt lines, duplicate chains or chains outside ``expected`` are errors."""
        path = self.path / CHAINS_FILE
        if not path.exists():
            return []
        data = path.read_bytes()
        complete, _, torn = data.rpartition(b"\n")
        if torn:
            log.warning("%s ends with a partial record (a run was killed while writing); dropping it", path)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(len(complete) + 1 if complete else 0)
                    f.flush()
                    os.fsync(f.fileno())
        records: dict[int, ChainRecord] = {}
        official = load_official_chains()
        for lineno, line in enumerate(complete.decode("utf-8").splitlines() if complete else [], start=1):
            if not line.strip():
                continue
            try:
                rec = ChainRecord.from_json(line)
            except RecordError as exc:
                raise EvaluationError(f"{path}:{lineno}: {exc}") from None
            if rec.chain_index in records:
                raise EvaluationError(f"{path}:{lineno}: chain {rec.chain_index} is recorded twice (were two runs "
                                      "writing this folder at once?)")
            if expected is not None and rec.chain_index not in expected:
                raise EvaluationError(f"{path}:{lineno}: chain {rec.chain_index} does not belong to this run")
            if not 0 <= rec.chain_index < NUM_OFFICIAL_CHAINS or rec.tasks != official[rec.chain_index][1]:
                raise EvaluationError(f"{path}:{lineno}: chain {rec.chain_index}'s tasks are not the official ones")
            records[rec.chain_index] = rec
        return [records[i] for i in sorted(records)]

    def append(self, record: ChainRecord) -> None:
        with open(self.path / CHAINS_FILE, "a", encoding="utf-8") as f:
            f.write(record.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_status(self, state: str, **extra) -> None:
        _write_json_atomic(self.path / STATUS_FILE, {
            "state": state, "host": socket.gethostname(), "pid": os.getpid(),
            "updated_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra})

    def read_status(self) -> dict:
        path = self.path / STATUS_FILE
        try:
            return json.loads(path.read_text()) if path.exists() else {"state": "unknown"}
        except json.JSONDecodeError:
            return {"state": "unknown"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- chain runner
def build_agent(agent_cfg) -> CalvinAgent:
    """Instantiate ``cfg.agent``: a ``CalvinAgent`` as it is, a runtime ``ghil.interfaces.Agent`` (PolicyAgent, the
    hierarchy) behind the CALVIN adapter; anything else is refused."""
    from hydra.utils import instantiate

    from sim_eval.evaluation.adapter import as_calvin_agent

    agent = instantiate(agent_cfg)
    try:
        return as_calvin_agent(agent)
    except TypeError as err:
        raise EvaluationError(f"agent config {agent_cfg.get('_target_')}: {err}") from None


def build_oracle(env):
    """calvin_env's own oracle when the env offers one (the real-calvin bridge), else ghil's re-implementation."""
    from sim_eval.protocol.oracle import oracle_for

    return oracle_for(env)


class ChainRunner:
    """Builds env, agent and oracle once, then runs chains by official index (one per worker process)."""

    def __init__(self, config: dict, settings: EvalSettings, run_dir: Path) -> None:
        from hydra.utils import instantiate

        cfg = OmegaConf.create(config)
        self.settings, self.run_dir = settings, Path(run_dir)
        if settings.threads is not None:  # policies run torch; one thread per worker avoids oversubscription
            import torch

            torch.set_num_threads(settings.threads)
        self._make_env = lambda: instantiate(cfg.env)
        self.env = self._make_env()
        self.agent = build_agent(cfg.agent)
        self.oracle = build_oracle(self.env)
        self._official = load_official_chains()
        self._n_run = 0

    def run(self, index: int, heartbeat=None, on_subtask=None) -> ChainRecord:
        """Run official chain ``index``; ``heartbeat`` and ``on_subtask`` go to ``run_chain`` (the watchdog's)."""
        if heartbeat is not None:
            heartbeat(0, -1)  # a rebuilt env counts as part of the chain's first reset
        if self.settings.fresh_env_per_chain and self._n_run > 0:
            self.close()
            self.env = self._make_env()
        self._n_run += 1
        state, tasks = self._official[index]
        chain = Chain(index, state, tasks)
        seed = chain_seed(self.settings.seed, index)
        video = self._video_for(index)
        hooks = {"record_agent_errors": self.settings.agent_errors == "record", "heartbeat": heartbeat,
                 "on_subtask": on_subtask, "phrasings": self.settings.phrasing_table}
        if video is None:
            return run_chain(self.env, self.agent, self.oracle, chain, self.settings.mode, self.settings.ep_len, seed,
                             **hooks)
        try:
            record = run_chain(self.env, self.agent, self.oracle, chain, self.settings.mode, self.settings.ep_len,
                               seed, frames=video, **hooks)
        finally:
            video.close()
        os.replace(video.path, video.path.with_name(video.path.name.replace(".partial", "")))
        return record

    def _video_for(self, index: int):
        if index - self.settings.chain_start >= self.settings.n_videos:
            return None
        if "static" not in getattr(self.env, "camera_names", ["static"]):
            log.warning("no video for chain %d: the env renders no static camera (env.cameras)", index)
            return None
        from sim_eval.evaluation.video import RolloutVideo

        (self.run_dir / "videos").mkdir(parents=True, exist_ok=True)
        return RolloutVideo(self.run_dir / "videos" / f"chain_{index:04d}.partial.mp4", fps=self.settings.video_fps)

    @staticmethod
    def torch_threads() -> int | None:
        """torch's intra-op thread count in this process (None: torch is not loaded, no stage runs torch)."""
        torch = sys.modules.get("torch")
        return int(torch.get_num_threads()) if torch is not None else None

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close:
            close()


# ---------------------------------------------------------------------------------------------- worker processes
# With the watchdog on (eval.step_timeout_s) or several workers, chains run in spawned worker processes. Each builds
# its env and agent once and runs the chains the parent sends it, one at a time. Before every step it writes a
# heartbeat (chain, subtask, step, time) into shared memory, and it reports every finished subtask. The parent kills
# (SIGKILL: pybullet's IK can loop in C, where no signal handler runs) a worker whose step has not returned within the
# timeout, records that chain with its finished subtasks and a "stuck" one, and starts a fresh worker for the rest.
_HB = 5  # heartbeat fields per worker: sequence (odd while written), chain (-1: idle), subtask, step, monotonic time


class _Heartbeat:
    """One worker's slot in the shared heartbeat array: written by the worker, read by the parent (a seqlock, so a
    read never mixes two writes). ``time.monotonic`` is one system-wide clock, comparable between processes."""

    def __init__(self, array, slot: int) -> None:
        self.array, self.base = array, slot * _HB

    def write(self, chain: int, subtask: int, step: int) -> None:
        a, b = self.array, self.base
        a[b] += 1
        a[b + 1], a[b + 2], a[b + 3], a[b + 4] = chain, subtask, step, time.monotonic()
        a[b] += 1

    def read(self) -> tuple[int, int, int, float] | None:
        """``(chain, subtask, step, time)``; None while a write is under way (or was cut by a kill)."""
        a, b = self.array, self.base
        for _ in range(100):
            seq = a[b]
            values = (a[b + 1], a[b + 2], a[b + 3], a[b + 4])
            if seq % 2 == 0 and a[b] == seq:
                return int(values[0]), int(values[1]), int(values[2]), values[3]
        return None


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM while a worker starts: it inherits the mask and ignores both before it unblocks them
    (so a Ctrl-C never kills a half-started worker with a traceback), and this process gets them right after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _plain_start_method():
    """A spawned worker re-applies this process's global start method. Under joblib's launcher that is "loky",
    which a plain child cannot resolve (it dies at start): show "spawn" while a worker starts."""
    current = multiprocessing.get_start_method(allow_none=True)
    if current is None or current in multiprocessing.get_all_start_methods():
        yield
        return
    multiprocessing.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(current, force=True)


def _detach_worker(parent_pid: int) -> None:
    """In a worker: leave Ctrl-C and SIGTERM to the parent (which stops its workers), and die with the parent even
    if it is killed (Linux: PR_SET_PDEATHSIG), so no worker outlives its run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before that
        os._exit(1)


def _worker_main(slot: int, conn, heartbeats, config: dict, settings: dict, run_dir: str, parent_pid: int) -> None:
    """A worker process: build env and agent once, then run the chain indices the parent sends (None: stop).

    Sends ``("subtask", index, SubtaskRecord fields)`` as each subtask ends, ``("done", index, record json, torch
    threads)`` per chain, ``("error", index or None, summary, traceback)`` when it cannot go on."""
    _detach_worker(parent_pid)
    logging.basicConfig(level=logging.WARNING)
    beat = _Heartbeat(heartbeats, slot)
    try:
        runner = ChainRunner(config, EvalSettings(**settings), Path(run_dir))
    except BaseException as exc:
        conn.send(("error", None, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    try:
        while (index := conn.recv()) is not None:
            try:
                record = runner.run(index, heartbeat=lambda k, step: beat.write(index, k, step),  # noqa: B023
                                    on_subtask=lambda k, sub: conn.send(("subtask", index, asdict(sub))))  # noqa: B023
            except BaseException as exc:
                beat.write(-1, 0, 0)
                conn.send(("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                return
            conn.send(("done", index, record.to_json(), runner.torch_threads()))
            beat.write(-1, 0, 0)  # after the record: a kill in between never loses a finished chain
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        runner.close()


class _Worker:
    """The parent's handle on one worker process and the chain it is running."""

    def __init__(self, ctx, slot: int, heartbeats, job: tuple, started: list) -> None:
        self.slot, self.heartbeat = slot, _Heartbeat(heartbeats, slot)
        self.heartbeat.write(-1, 0, 0)
        self.chain: int | None = None
        self.subtasks: list[SubtaskRecord] = []  # the running chain's finished subtasks
        self.t_chain = 0.0
        self.stop_by: float | None = None  # set when told to stop: killed if still alive then
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(slot, child_conn, heartbeats, *job, os.getpid()),
                                   name=f"ghil-eval-worker-{slot}")
        with _signals_held(), _plain_start_method():
            started.append(self)
            self.process.start()
        child_conn.close()

    def assign(self, index: int) -> None:
        self.chain, self.subtasks, self.t_chain = index, [], time.perf_counter()
        self.conn.send(index)

    def stop(self) -> None:
        self.chain, self.stop_by = None, time.monotonic() + 30
        with contextlib.suppress(OSError):
            self.conn.send(None)

    def kill(self) -> None:
        if self.process.pid is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(10)
        self.conn.close()


def _stuck_record(settings: EvalSettings, index: int, subtasks: list[SubtaskRecord], subtask: int, step: int,
                  wall_s: float) -> ChainRecord:
    """The record of a chain whose worker was killed in ``step`` (-1: the resets) of ``subtask`` (0-based)."""
    state, tasks = load_official_chains()[index]
    seed = chain_seed(settings.seed, index)
    if len(subtasks) != subtask:
        raise EvaluationError(f"chain {index}: its worker reported {len(subtasks)} finished subtasks but was stuck "
                              f"in subtask {subtask + 1}")
    instruction = instructions_for(Chain(index, state, tasks), settings.mode, seed, settings.phrasing_table)[subtask]
    where = f"step {step} of subtask {subtask + 1} ({tasks[subtask]})" if step >= 0 else \
        f"the reset before subtask {subtask + 1} ({tasks[subtask]})"
    detail = f"{where} did not return within {settings.step_timeout_s:g} s; its worker process was killed"
    stuck = SubtaskRecord(tasks[subtask], instruction, False, max(step, 0), FAILURE_STUCK, detail)
    return ChainRecord(index, dict(state), tuple(tasks), (*subtasks, stuck), seed, round(wall_s, 3))


def _run_in_workers(config: dict, settings: EvalSettings, folder: RunFolder, todo: list[int], on_record,
                    threads_seen: set) -> None:
    """Run ``todo`` in ``min(workers, len(todo))`` supervised worker processes (see the section's comment)."""
    ctx = multiprocessing.get_context("spawn")
    n_workers = min(settings.workers, len(todo))
    heartbeats = ctx.RawArray("d", _HB * n_workers)
    job = (config, asdict(settings), str(folder.path))
    timeout = settings.step_timeout_s
    poll = 0.2 if timeout is None else min(0.2, timeout / 5)
    pending = deque(todo)
    started: list[_Worker] = []  # every worker ever started: all are killed on the way out, whatever happens
    live: dict[int, _Worker] = {}

    def launch(slot: int) -> None:
        live[slot] = _Worker(ctx, slot, heartbeats, job, started)
        live[slot].assign(pending.popleft())

    def handle(worker: _Worker, message: tuple) -> None:
        kind, index = message[0], message[1]
        if kind == "subtask":
            worker.subtasks.append(SubtaskRecord(**message[2]))
        elif kind == "done":
            threads_seen.add(message[3])
            worker.chain = None
            on_record(ChainRecord.from_json(message[2]))
        elif index is None:
            raise EvaluationError(f"a worker process could not build the env and agent: {message[2]}\n{message[3]}")
        else:
            raise EvaluationError(f"chain {index} failed in a worker process: {message[2]}\n{message[3]}")

    def kill_stuck(worker: _Worker, beat: tuple) -> None:
        index, t_kill = worker.chain, time.perf_counter()
        worker.process.kill()
        worker.process.join(10)
        after = worker.heartbeat.read()  # final: the worker is gone
        if after is not None and after[0] == index:
            beat = after
        with contextlib.suppress(EOFError, OSError):  # what it sent before the kill: finished subtasks, maybe more
            while worker.chain is not None and worker.conn.poll():
                handle(worker, worker.conn.recv())
        worker.kill()
        del live[worker.slot]
        if worker.chain is not None:  # (else its record arrived just before the kill)
            record = _stuck_record(settings, index, worker.subtasks, beat[1], beat[2], t_kill - worker.t_chain)
            log.warning("chain %d: %s (pid %d)", index, record.subtasks[-1].detail, worker.process.pid)
            (folder.path / "videos" / f"chain_{index:04d}.partial.mp4").unlink(missing_ok=True)
            on_record(record)
        if pending:
            launch(worker.slot)

    try:
        for slot in range(n_workers):
            launch(slot)
        while live:
            ready = multiprocessing.connection.wait([w.conn for w in live.values()], timeout=poll)
            for worker in [w for w in live.values() if w.conn in ready]:
                try:
                    message = worker.conn.recv()
                except (EOFError, OSError):
                    worker.process.join(10)
                    if worker.stop_by is None:
                        what = f"while running chain {worker.chain}" if worker.chain is not None else "between chains"
                        raise EvaluationError(f"a worker process died {what} (exit code {worker.process.exitcode}; "
                                              "a crash in the simulator or the agent, or killed)") from None
                    worker.kill()
                    del live[worker.slot]
                    continue
                handle(worker, message)
                if worker.chain is None and worker.stop_by is None:
                    if pending:
                        worker.assign(pending.popleft())
                    else:
                        worker.stop()
            now = time.monotonic()
            for worker in list(live.values()):
                if worker.stop_by is not None and now > worker.stop_by:
                    log.warning("a worker process did not exit after its last chain; killed it")
                    worker.kill()
                    del live[worker.slot]
                elif timeout is not None and worker.chain is not None:
                    beat = worker.heartbeat.read()
                    if beat is not None and beat[0] == worker.chain and now - beat[3] > timeout:
                        kill_stuck(worker, beat)
    finally:
        for worker in started:
            worker.kill()


def _run_chains(config: dict, settings: EvalSettings, folder: RunFolder, todo: list[int], on_record,
                threads_seen: set) -> None:
    """Run ``todo`` (official indices); ``on_record`` gets each finished record, ``threads_seen`` the torch thread
    counts of the processes that ran them. In this process only without the watchdog and with one worker."""
    if settings.step_timeout_s is not None or (settings.workers > 1 and len(todo) > 1):
        _run_in_workers(config, settings, folder, todo, on_record, threads_seen)
        return
    runner = ChainRunner(config, settings, folder.path)
    try:
        for index in todo:
            try:
                record = runner.run(index)
            except Exception as exc:
                raise EvaluationError(f"chain {index} failed: {type(exc).__name__}: {exc}") from exc
            threads_seen.add(runner.torch_threads())
            on_record(record)
    finally:
        runner.close()


def _check_misconfigured(records: list[ChainRecord], n_expected: int) -> None:
    """Stop a run whose first chains (``MISCONFIGURED_CHAINS``, or all when fewer) all failed their first subtask
    with one and the same agent error: the agent cannot act here, and an average length of 0 would say otherwise."""
    if len(records) < min(MISCONFIGURED_CHAINS, n_expected):
        return
    firsts = [rec.subtasks[0] for rec in records]
    if any(sub.failure != FAILURE_AGENT_ERROR for sub in firsts) or len({sub.detail for sub in firsts}) != 1:
        return
    which = f"the first {len(records)} chains" if len(records) > 1 else "the only chain"
    raise AgentMisconfiguredError(
        f"the agent is misconfigured: {which} all failed at subtask 1 with the same agent error, {firsts[0].detail} "
        f"(at step {firsts[0].n_steps}), so every chain would; stopped instead of reporting an average length of 0. "
        "Fix the agent's configuration (e.g. a checkpoint whose stages or camera sizes do not fit this agent or "
        "env; the traceback is in the log), then rerun with eval.overwrite=true.")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a run is in progress, SIGTERM raises ``EvaluationInterrupted`` (handled like Ctrl-C)."""

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup finish
        raise EvaluationInterrupted(f"terminated by {signal.Signals(signum).name}")

    try:
        previous, installed = signal.signal(signal.SIGTERM, handler), True
    except ValueError:  # not the main thread: no signal handling here
        previous, installed = None, False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)

# ---------------------------------------------------------------------------------------------- entry points
def run(cfg: DictConfig) -> EvalResult:
    """``ghil eval``: evaluate (or resume) one run folder and write its results and report."""
    __import__("ghil.extras").extras.check_config(cfg)  # a missing optional dependency: one line, before any folder
    settings = EvalSettings.from_config(cfg.eval)
    config = resolved_config(cfg)
    fingerprint, protocol = fingerprint_of(config, settings)
    warnings = _protocol_warnings(settings)
    for warning in warnings:
        log.warning("%s", warning)
    folder = RunFolder(settings.run_dir)
    meta = {
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "protocol": protocol,
        "shard": settings.shard, "n_shards": settings.n_shards, "chain_indices": settings.chain_indices,
        "names": _choice_names(config), "config": config, "ghil_version": _version(), "git": _git_info(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with _sigterm_as_interrupt(), folder.locked():
        done = folder.start(meta, settings.overwrite)
        have = {rec.chain_index for rec in done}
        todo = [i for i in settings.chain_indices if i not in have]
        if done:
            log.warning("resuming %s: %d of %d chains already done", folder.path, len(done),
                        len(settings.chain_indices))
        records = {rec.chain_index: rec for rec in done}
        n_total = len(settings.chain_indices)
        threads_seen: set = set()  # torch thread counts of the processes that ran this session's chains
        t0 = time.perf_counter()
        progress = _Progress(n_total, len(done))

        def on_record(record: ChainRecord) -> None:
            folder.append(record)
            records[record.chain_index] = record
            progress.update(record)
            _check_misconfigured(list(records.values()), n_total)

        folder.write_status("running", n_done=len(done), n_total=n_total)
        try:
            try:
                if done:
                    _check_misconfigured(done, n_total)  # a resumed run of a broken agent stops at once
                if todo:
                    _run_chains(config, settings, folder, todo, on_record, threads_seen)
            finally:
                progress.close()
            wall_s = time.perf_counter() - t0
            timing = {"workers": settings.workers, "n_chains_run": len(todo), "wall_s": round(wall_s, 2),
                      "chains_per_min": round(60 * len(todo) / wall_s, 3) if todo and wall_s > 0 else None}
            ordered = [records[i] for i in sorted(records)]
            stored = folder.read_meta() or {}
            history = list(stored.get("threads_history", []))
            history += [t for t in sorted(threads_seen, key=str) if t not in history]
            if history != stored.get("threads_history"):
                _write_json_atomic(folder.path / RUN_FILE, {**stored, "threads_history": history})
            effective = next(iter(threads_seen)) if len(threads_seen) == 1 else (history[-1] if history else None)
            meta_now = {**meta, "git_history": stored.get("git_history", [meta["git"]])}
            result = _finish(folder.path, meta_now, ordered, settings, warnings, timing,
                             title=f"{meta['names']['agent']} on {meta['names']['env']}, {settings.subset_label}"
                                   + (f", shard {settings.shard} of {settings.n_shards}" if settings.n_shards > 1
                                      else ""),
                             threads={"setting": settings.threads, "effective": effective, "history": history})
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (EvaluationInterrupted): the workers are stopped
            folder.write_status("interrupted", error=str(exc) or "KeyboardInterrupt (Ctrl-C)", n_done=len(records),
                                n_total=n_total)
            raise
        except BaseException as exc:
            folder.write_status("failed", error=f"{type(exc).__name__}: {exc}", n_done=len(records),
                                n_total=n_total)
            raise
        folder.write_status("complete", n_done=len(ordered), n_total=n_total)
    return result


def _protocol_warnings(settings: EvalSettings) -> list[str]:
    warnings = []
    if settings.ep_len != EP_LEN:
        warnings.append(f"NOT THE CALVIN PROTOCOL: eval.ep_len={settings.ep_len}, CALVIN uses {EP_LEN} steps per "
                        "subtask; these numbers are not comparable with published results.")
    if settings.mode != "standard":
        warnings.append(f"mode {settings.mode}: a ghil variant of the protocol, not comparable with published "
                        "CALVIN numbers.")
    if settings.phrasings is not None:
        warnings.append(f"eval.phrasings={settings.phrasings}: the user's instructions replace CALVIN's for "
                        f"{len(settings.phrasing_table)} tasks, not comparable with published CALVIN numbers.")
    return warnings


class _Progress:
    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="chains", file=sys.stderr, dynamic_ncols=True)
        self.lengths: list[int] = []

    def update(self, record: ChainRecord) -> None:
        self.lengths.append(record.n_completed)
        self.bar.set_postfix(avg_len=f"{sum(self.lengths) / len(self.lengths):.2f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _finish(run_dir: Path, meta: dict, records: list[ChainRecord], settings: EvalSettings, warnings: list[str],
            timing: dict | None, title: str, extra: dict | None = None, threads: dict | None = None) -> EvalResult:
    """Write results.json and report.md for ``records`` and print the console table. ``threads``: the setting, the
    effective torch thread count and every count that contributed chains (``history``)."""
    expected = meta["chain_indices"]
    have = {rec.chain_index for rec in records}
    missing = [i for i in expected if i not in have]
    complete = not missing
    if not records:
        return EvalResult(Path(run_dir), [], None, False)
    metrics = summarize(records)
    n_agent_errors = metrics.failure_reasons.get("agent_error", 0)
    if n_agent_errors:
        warnings = [*warnings, f"{n_agent_errors} chain(s) stopped because the agent raised an exception "
                               "(failure agent_error; the exception is in each record's detail)"]
        log.warning("%s", warnings[-1])
    n_stuck = metrics.failure_reasons.get(FAILURE_STUCK, 0)
    if n_stuck:
        warnings = [*warnings, f"{n_stuck} chain(s) stopped because a step did not return within "
                               f"eval.step_timeout_s={settings.step_timeout_s:g} s (failure stuck; its worker process "
                               "was killed)"]
        log.warning("%s", warnings[-1])
    counts = {t for t in (threads or {}).get("history", []) if t is not None}
    if len(counts) > 1:
        warnings = [*warnings, f"the chains ran with different torch thread counts {sorted(counts)} (threads=null "
                               "is the machine's default); learned agents' records depend on it: set eval.threads"]
        log.warning("%s", warnings[-1])
    videos = sorted(str(p.relative_to(run_dir)) for p in (Path(run_dir) / "videos").glob("chain_*.mp4")
                    if ".partial" not in p.name) if (Path(run_dir) / "videos").exists() else []
    results = {
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "missing_chains": missing,
        "names": meta["names"],
        "protocol": {
            "benchmark": "CALVIN long-horizon multi-task language control (LH-MTLC)",
            "chains": settings.subset_label, "n_chains": len(records), "chain_start": settings.chain_start,
            "n_chains_requested": settings.n_chains, "chain_indices": [r.chain_index for r in records],
            "mode": settings.mode, "phrasings": settings.phrasings_record(),
            "ep_len": settings.ep_len, "standard_ep_len": settings.ep_len == EP_LEN,
            "oracle": meta.get("oracle", _oracle_name(meta["config"])),
        },
        "seeds": {"base": settings.seed, "per_chain": "chain_seed(base, chain_index) = "
                  "SeedSequence([base, chain_index]).generate_state(1)[0]"},
        "metrics": metrics.to_dict(),
        "timing": timing,
        "threads": threads,
        "step_timeout_s": settings.step_timeout_s,
        "warnings": warnings,
        "videos": videos,
        "fingerprint": meta["fingerprint"],
        "shard": meta["shard"], "n_shards": meta["n_shards"],
        "ghil_version": meta["ghil_version"], "git": meta["git"],
        "git_history": meta.get("git_history", [meta["git"]]),
        "config": meta["config"],
        **(extra or {}),
        "chains": [json.loads(rec.to_json()) for rec in records],
    }
    _write_json_atomic(Path(run_dir) / RESULTS_FILE, results)
    write_report(Path(run_dir), results, metrics)
    print(console_table(metrics, title=title + ("" if complete else f"  [INCOMPLETE: {len(missing)} missing]")))
    print(f"results: {Path(run_dir) / RESULTS_FILE}\nreport:  {Path(run_dir) / 'report.md'}")
    return EvalResult(Path(run_dir), records, metrics, complete, results)


def _oracle_name(config: dict) -> str:
    target = str(config.get("env", {}).get("_target_", ""))
    return "calvin_env.envs.tasks.Tasks" if target.endswith("CalvinEnv") else "sim_eval.protocol.oracle.TaskOracle"


# ---------------------------------------------------------------------------------------------- merge
class MergeError(EvaluationError):
    """Shards that cannot be merged: mismatched configurations, overlapping, missing or failed shards."""


def _shard_dirs(inputs: list[Path]) -> list[Path]:
    """Each input is a shard folder (has run.json) or a parent holding ``shard_*`` folders."""
    dirs: list[Path] = []
    for path in map(Path, inputs):
        if (path / RUN_FILE).exists():
            dirs.append(path)
            continue
        found = sorted(p for p in path.glob("shard_*") if (p / RUN_FILE).exists())
        if not found:
            raise MergeError(f"{path} is neither a results folder ({RUN_FILE}) nor a parent of shard_* folders")
        dirs += found
    return dirs


def merge(inputs: list[Path], out_dir: Path, allow_partial: bool = False) -> EvalResult:
    """Merge shard folders of one evaluation into ``out_dir`` (results.json, report.md, chains.jsonl).

    Refuses shards of different configurations, two folders for the same shard, and overlapping chains. Missing,
    failed or unfinished shards are listed; they are an error unless ``allow_partial`` (then the merged results
    say ``complete: false`` and list the missing chains).
    """
    dirs = _shard_dirs(inputs)
    out_dir = Path(out_dir)
    if out_dir.resolve() in {d.resolve() for d in dirs}:
        raise MergeError(f"the output folder {out_dir} is one of the inputs")
    metas = [(d, RunFolder(d).read_meta()) for d in dirs]
    first_dir, first = metas[0]
    for d, meta in metas[1:]:
        if meta["fingerprint"] != first["fingerprint"] or meta["n_shards"] != first["n_shards"]:
            changes = config_diff({"protocol": first["protocol"], "n_shards": first["n_shards"]},
                            {"protocol": meta["protocol"], "n_shards": meta["n_shards"]})
            raise MergeError(f"{d} and {first_dir} are from different evaluations: {'; '.join(changes)}")
    by_shard: dict[int, Path] = {}
    for d, meta in metas:
        if meta["shard"] in by_shard:
            raise MergeError(f"shard {meta['shard']} given twice: {by_shard[meta['shard']]} and {d}")
        by_shard[meta["shard"]] = d
    n_shards = first["n_shards"]
    problems = [f"shard {k} of {n_shards} is missing (no folder given)" for k in range(n_shards) if k not in by_shard]
    records: dict[int, ChainRecord] = {}
    shard_info = []
    for d, meta in metas:
        folder = RunFolder(d)
        recs = folder.read_records(expected=meta["chain_indices"])
        status = folder.read_status()
        n_expected = len(meta["chain_indices"])
        for rec in recs:
            if rec.chain_index in records:
                raise MergeError(f"chain {rec.chain_index} appears in two shards (overlap), e.g. {d}")
            records[rec.chain_index] = rec
        shard_info.append({"shard": meta["shard"], "dir": str(d), "n_done": len(recs), "n_expected": n_expected,
                           "state": status.get("state"), "error": status.get("error"), "git": meta.get("git")})
        if len(recs) < n_expected:
            why = f"failed: {status.get('error')}" if status.get("state") == "failed" else \
                f"state {status.get('state')!r} (killed or still running?)"
            problems.append(f"shard {meta['shard']} ({d}) is unfinished: {len(recs)} of {n_expected} chains; {why}")
    if problems and not allow_partial:
        raise MergeError("cannot merge:\n  " + "\n  ".join(problems)
                         + "\nresume the unfinished shards (rerun the same command), or pass --allow-partial")
    for problem in problems:
        log.warning("%s", problem)
    settings = EvalSettings(**{**{k: v for k, v in first["config"]["eval"].items()
                                  if k in {f.name for f in fields(EvalSettings)}},
                               "shard": 0, "n_shards": 1, "out_dir": str(out_dir)})
    meta = {**first, "shard": 0, "n_shards": 1, "chain_indices": list(settings.subset)}
    commits = {json.dumps(m.get("git"), sort_keys=True) for _, m in metas}
    meta["git_history"] = [json.loads(c) for c in sorted(commits)]
    history: list = []  # torch thread counts that ran the shards' chains
    for _, m in metas:
        history += [t for t in m.get("threads_history", []) if t not in history]
    meta["threads_history"] = history
    threads = {"setting": settings.threads, "effective": history[0] if len(history) == 1 else None,
               "history": history}
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = [records[i] for i in sorted(records)]
    _write_json_atomic(out_dir / RUN_FILE, {**meta, "merged_from": [str(d) for d in dirs]})
    with open(out_dir / CHAINS_FILE, "w", encoding="utf-8") as f:
        f.writelines(rec.to_json() + "\n" for rec in ordered)
    warnings = _protocol_warnings(settings) + problems
    result = _finish(out_dir, meta, ordered, settings, warnings, timing=None,
                     title=f"merged {len(dirs)} shard(s) of {n_shards}: {settings.subset_label}",
                     extra={"merged_from": shard_info}, threads=threads)
    RunFolder(out_dir).write_status("complete" if result.complete else "partial", n_done=len(ordered),
                                    n_total=settings.n_chains)
    return result


def merge_main(argv: list[str]) -> None:
    """``ghil eval merge DIR [DIR ...] out=OUT_DIR [--allow-partial]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ghil eval merge",
        description="Merge the shard folders of one evaluation (each DIR a shard folder, or a folder holding "
                    "shard_* folders) into one results folder.")
    parser.add_argument("dirs", nargs="+", help="shard folders, or their parent")
    parser.add_argument("--out", help="output folder (or give out=DIR)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="merge even if shards are missing or unfinished (results say complete: false)")
    args = parser.parse_args(argv)
    dirs, out = [], args.out
    for item in args.dirs:
        if item.startswith("out="):
            out = item[len("out="):]
        else:
            dirs.append(item)
    if not out or not dirs:
        parser.error("give the shard folders and an output folder: ghil eval merge DIR [DIR ...] out=OUT_DIR")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        merge([Path(d) for d in dirs], Path(out), allow_partial=args.allow_partial)
    except EvaluationError as exc:
        sys.exit(f"ghil eval merge: {exc}")
