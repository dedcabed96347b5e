"""One ``Trainer`` for every ``Learnable`` (policy now; subgoal generator, filter, reasoner head later), and the
``ghil train`` entry point, which trains whatever its ``recipe`` config group builds (``ghil/configs/recipe/``).

A recipe (a ``ghil.interfaces.TrainingRecipe``, instantiated by Hydra from ``cfg.recipe``) checks its data and
returns a ``TrainingSetup``: the model, datasets, collate function, how to fit the model's statistics, the settings
a resume must match (``fingerprint``) and the command that evaluates a checkpoint. Nothing here knows what a policy
is.

The loop: AdamW, linear warm-up then cosine decay (transformers' schedule), gradient clipping, an EMA copy of the
weights, accelerate for devices / mixed precision / multi-GPU (``accelerate launch -m ghil.cli train ...`` runs
unchanged), a tqdm bar, TensorBoard + JSONL logs, and periodic checkpoints::

    <out_dir>/config.yaml, run.json, train.log       resolved config, git commit, command line, the log
    <out_dir>/metrics.jsonl, tensorboard/            train/loss, train/lr, train/samples_per_s, val/loss, ...
    <out_dir>/checkpoints/step_0000500/              config.json + model.safetensors (EMA weights: what ships)
        training_state/                              model.safetensors (raw weights), optimizer.safetensors +
                                                     optimizer.json, scheduler.json, rng_<rank>.safetensors,
                                                     rng_<rank>.sha256, step.json (with the sha256 of every
                                                     state file, checked on resume), fingerprint.json (model +
                                                     data settings)
    <out_dir>/checkpoints/last -> step_0000500

Resume is exact: the data order is a pure function of (seed, step) (a seeded permutation per epoch, sharded over
processes), and the optimiser, scheduler, EMA and every torch RNG are restored, so killing a run and starting it
again with the same command continues bit for bit. A resume whose model or data settings differ from the stored
fingerprint is refused with the changed keys named (``train.resume=force`` continues anyway). Nothing is pickled.

Usage::

    ghil train policy=dit_small sampler=shortcut data.root=data/playtable_D run_name=dit_small_D    # recipe=policy
    setup = recipe.build()                       # e.g. policies.recipe.PolicyRecipe(policy, data)
    setup.fit_statistics()
    trainer = Trainer.from_setup(setup, TrainConfig(out_dir="runs/x", total_steps=100))
    trainer.fit()
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ghil.config_diff import config_diff
from ghil.checkpoint import (CONFIG_FILE, HASH_KEY, CheckpointError, config_to_dict, load_pretrained,
                             load_state_strict, read_weights, write_weights)
from ghil.interfaces import Learnable, Logger

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LAST = "last"
STATE = "training_state"
FINGERPRINT = "fingerprint.json"


WARMUP_MAX_FRACTION = 10  # the warm-up is at most total_steps // WARMUP_MAX_FRACTION steps


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping settings (DiT-Block defaults: AdamW 3e-4, betas (0.95, 0.999), wd 1e-6).

    The defaults are ``ghil/configs/train.yaml``'s (tests/test_settings.py keeps them equal).
    """

    out_dir: str
    total_steps: int = 20000
    batch_size: int = 32  # per process; the global batch is batch_size * processes
    lr: float = 3e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    eps: float = 1e-8
    # Linear warm-up steps, capped at total_steps // 10 so that short runs (smoke tests, fine-tuning) work with the
    # default: the schedule uses ``effective_warmup_steps`` and the trainer logs a note when the cap applies.
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio (0: transformers' cosine schedule)
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.999  # None: no EMA (checkpoints then ship the raw weights)
    ckpt_every: int = 1000
    keep_last: int | None = 3  # older step_* folders are deleted (None keeps all)
    log_every: int = 20
    seed: int = 0
    num_workers: int = 2
    mixed_precision: str = "no"  # accelerate: "no" | "fp16" | "bf16"
    # True: continue from <out_dir>/checkpoints/last when it exists, refused when the stored model/data settings
    # (the recipe's fingerprint) differ; "force": continue even then; False: start afresh.
    resume: bool | str = True
    progress: bool = True
    tensorboard: bool = True
    val_every: int | None = 500  # validation loss of the shipped (EMA) weights every N steps (None: never)
    val_batches: int = 8  # fixed validation batches (the same samples and noise every time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.total_steps < 1 or self.batch_size < 1:
            raise ValueError("TrainConfig: total_steps and batch_size must be >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.resume not in (True, False, "force"):
            raise ValueError(f"TrainConfig.resume must be true, false or 'force', got {self.resume!r}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("TrainConfig: lr > 0 and 0 <= min_lr_ratio <= 1 required")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be None or in (0, 1), got {self.ema_decay}")
        if self.ckpt_every < 1 or self.log_every < 1 or (self.keep_last is not None and self.keep_last < 1):
            raise ValueError("TrainConfig: ckpt_every, log_every and keep_last must be >= 1")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"TrainConfig.mixed_precision must be no|fp16|bf16, got {self.mixed_precision!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError("TrainConfig.grad_clip must be None or > 0")
        if (self.val_every is not None and self.val_every < 1) or self.val_batches < 1:
            raise ValueError("TrainConfig: val_every must be None or >= 1, val_batches >= 1")

    @property
    def effective_warmup_steps(self) -> int:
        """``warmup_steps`` capped at ``total_steps // 10`` (what the schedule uses)."""
        return min(self.warmup_steps, self.total_steps // WARMUP_MAX_FRACTION)


# camera -> the `ghil collect` setting that sizes its frames (named by every recipe that refuses a frame size)
COLLECT_SIZE_SETTINGS = {"rgb_static": "env.static_size", "rgb_gripper": "env.gripper_size"}


def resume_fingerprint(model: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    """What a resume must match, for any recipe: the model's saved configuration (type and init kwargs) and the data
    settings ``data`` (a plain dict of them) with ``cache`` left out (a packed cache gives exactly the npz frames, so
    a run may switch between them) and ``root`` resolved."""
    saved = {"type": getattr(model, "type_name", type(model).__qualname__),
             "init": {k: config_to_dict(v) for k, v in model.init_kwargs().items()}}
    kept = {k: v for k, v in data.items() if k != "cache"}
    return {"model": saved, "data": {**kept, "root": str(Path(data["root"]).resolve())}}


def validation_split(root: str | os.PathLike, val_split: str | None, make: Callable[[str], Any]) -> Any:
    """``make(val_split)`` when ``root`` has that split; None (logged when one was asked for) otherwise."""
    if val_split and (Path(root) / val_split).is_dir():
        return make(val_split)
    if val_split:
        log.info("%s has no %r split: no validation data (data.val_split=null turns it off)", root, val_split)
    return None


@dataclass
class TrainingSetup:
    """What a ``TrainingRecipe.build()`` hands the trainer (everything model-specific lives in the recipe)."""

    model: nn.Module  # a ghil.interfaces.Learnable
    dataset: Any  # map-style training dataset
    collate_fn: Callable[[list], Any]  # a list of samples -> a batch for model.loss
    val_dataset: Any = None  # held-out samples for val/loss (None: no validation)
    # Fits the model's data statistics (normaliser) in place; called for fresh runs without init_from.
    fit_statistics: Callable[[], None] | None = None
    # The resolved model and data settings (JSON data); stored with the training state, a resume must match it.
    fingerprint: Mapping[str, Any] = field(default_factory=dict)
    # checkpoint path -> the command that evaluates it (printed at the end of `ghil train`); None: none.
    eval_command: Callable[[str], str] | None = None
    # Re-applies what the recipe fixes in the model after init_from loaded another checkpoint's weights (the frozen
    # image encoders a feature cache was made with); None: nothing to re-apply.
    after_init_from: Callable[[], None] | None = None


class ResumeMismatchError(CheckpointError):
    """Resuming a run whose stored model or data settings differ from this run's (it would mix two runs)."""


def _json_data(value: Any) -> Any:
    """Tuples become lists, etc.: what a fingerprint looks like after a JSON round trip."""
    return json.loads(json.dumps(value, default=str))


# -- logging ----------------------------------------------------------------------------------------------------


class JsonlLogger:
    """One JSON object per ``log`` call, appended to a file (resumed runs keep appending)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# -- pieces of the loop -----------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied), with DiT-style warm-up."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


class _LossModule(nn.Module):
    """Puts ``learnable.loss`` behind ``forward`` so DDP's gradient hooks see the call."""

    def __init__(self, learnable: nn.Module):
        super().__init__()
        self.learnable = learnable

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        return self.learnable.loss(batch)


class StepSampler(torch.utils.data.Sampler):
    """Indices for this process from a seeded permutation per epoch, starting at a given batch of an epoch."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.global_batch = batch_size * world
        self.batches_per_epoch = n // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {n} samples, fewer than one global batch of {self.global_batch}")
        self.epoch, self.first_batch = 0, 0

    def set_position(self, epoch: int, first_batch: int) -> None:
        self.epoch, self.first_batch = epoch, first_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        for b in range(self.first_batch, self.batches_per_epoch):
            rows = perm[b * self.global_batch:(b + 1) * self.global_batch]
            yield from rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.first_batch) * self.batch_size


def _optimizer_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> str:
    """Write the optimiser's tensors and scalars; returns the sha256 of its tensor file."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    digest = write_weights(tensors, folder / "optimizer.safetensors")
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))
    return digest


def _optimizer_from_files(optimizer: torch.optim.Optimizer, folder: Path, sha256: str | None) -> None:
    tensors = read_weights(folder / "optimizer.safetensors", sha256=sha256)
    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> dict[str, Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{i}"] = s
    return state


def _set_rng_state(state: Mapping[str, Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [state[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in state]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """``<out_dir>/checkpoints/last`` resolved, or None for a fresh run."""
    last = Path(out_dir) / CHECKPOINTS / LAST
    return last.resolve() if last.exists() else None


def git_commit() -> str | None:
    """The source checkout's commit, with ``+dirty`` for uncommitted tracked changes; None for an installed copy."""
    from ghil.paths import git_state

    state = git_state()
    if state["commit"] == "unknown":
        return None
    return state["commit"] + ("+dirty" if state["dirty"] else "")


# -- the trainer ------------------------------------------------------------------------------------------------


class Trainer:
    """Optimises any ``Learnable`` nn.Module on a map-style dataset; resumes exactly from its last checkpoint.

    Usage::

        trainer = Trainer(model, dataset, TrainConfig(out_dir="runs/dit", total_steps=20000), collate_fn)
        trainer = Trainer.from_setup(recipe.build(), TrainConfig(out_dir="runs/dit"))    # the same, from a recipe
        trainer.fit()                    # or fit(stop_at=500) to stop early (the schedule still spans total_steps)
    """

    def __init__(self, model: nn.Module, dataset: Any, config: TrainConfig, collate_fn: Callable[[list], Any],
                 run_config: Mapping[str, Any] | None = None, loggers: Sequence[Logger] | None = None,
                 val_dataset: Any = None, fingerprint: Mapping[str, Any] | None = None):
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        if not isinstance(model, Learnable) or not isinstance(model, nn.Module):
            raise TypeError(f"Trainer needs an nn.Module with loss(batch), save_pretrained(path) and attach_ema(ema); "
                            f"got {type(model).__qualname__}")
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        self.model = model.to(self.accelerator.device)
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.step = 0
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay is not None else None
        model.attach_ema(self.ema.model if self.ema is not None else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                      weight_decay=config.weight_decay)
        warmup = config.effective_warmup_steps
        if warmup < config.warmup_steps and self.accelerator.is_main_process:
            log.info("warm-up capped at %d steps (train.warmup_steps=%d is longer than total_steps // %d = %d)",
                     warmup, config.warmup_steps, WARMUP_MAX_FRACTION, warmup)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.total_steps)
        if config.min_lr_ratio > 0:  # floor the cosine at min_lr_ratio
            base = self.scheduler.lr_lambdas[0]
            floor = config.min_lr_ratio
            self.scheduler.lr_lambdas[0] = lambda s: floor + (1 - floor) * base(s) if s >= warmup else base(s)
        # The scheduler is stepped by hand once per optimiser step, so it is not handed to accelerate (which would
        # step it once per process).
        self.loss_module, self.optimizer = self.accelerator.prepare(_LossModule(self.model), optimizer)
        self.sampler = StepSampler(len(dataset), config.batch_size, self.accelerator.process_index,
                                   self.accelerator.num_processes, config.seed)
        self.run_config = dict(run_config or {})
        self.loggers = list(loggers) if loggers is not None else None
        self.val_dataset = val_dataset
        self.fingerprint = _json_data(dict(fingerprint)) if fingerprint is not None else None

    @classmethod
    def from_setup(cls, setup: TrainingSetup, config: TrainConfig, **kwargs: Any) -> Trainer:
        """A trainer for a recipe's ``TrainingSetup`` (validation data used when ``config.val_every`` is set)."""
        return cls(setup.model, setup.dataset, config, setup.collate_fn,
                   val_dataset=setup.val_dataset if config.val_every is not None else None,
                   fingerprint=setup.fingerprint, **kwargs)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<step>`` (atomically, via a temp folder) and move ``last`` to it."""
        root = self.out_dir / CHECKPOINTS
        final = root / f"step_{self.step:07d}"
        tmp = root / f".tmp_step_{self.step:07d}"
        rank = self.accelerator.process_index
        self.accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE).mkdir(parents=True)
            shipped = self.ema.model if self.ema is not None else self.model
            shipped.save_pretrained(tmp)
            # Every resume file is hash-checked when read back: a damaged state would otherwise resume silently.
            hashes = {"model.safetensors": write_weights(self.model.state_dict(), tmp / STATE / "model.safetensors"),
                      "optimizer.safetensors": _optimizer_to_files(self.optimizer, tmp / STATE)}
            (tmp / STATE / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict(), default=lambda o: None))
            (tmp / STATE / "step.json").write_text(json.dumps({"step": self.step, "total_steps":
                                                               self.config.total_steps, "seed": self.config.seed,
                                                               "num_processes": self.accelerator.num_processes,
                                                               "sha256": hashes}))
            if self.fingerprint is not None:
                (tmp / STATE / FINGERPRINT).write_text(json.dumps(self.fingerprint, indent=2))
        self.accelerator.wait_for_everyone()
        rng_hash = write_weights(_rng_state(), tmp / STATE / f"rng_{rank}.safetensors")
        (tmp / STATE / f"rng_{rank}.sha256").write_text(rng_hash)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            link = root / f".{LAST}.tmp"
            link.unlink(missing_ok=True)
            link.symlink_to(final.name)
            os.replace(link, root / LAST)
            self._prune(root)
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self, root: Path) -> None:
        if self.config.keep_last is None:
            return
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        state = path / STATE
        if not state.is_dir():
            raise CheckpointError(f"{path} has no {STATE}/ folder: it can be loaded for inference but not resumed")
        info = json.loads((state / "step.json").read_text())
        if info.get("num_processes") != self.accelerator.num_processes:
            raise CheckpointError(f"{path} was written by {info.get('num_processes')} process(es), this run has "
                                  f"{self.accelerator.num_processes}: exact resume needs the same number")
        self._check_fingerprint(path)
        if info.get("total_steps") != self.config.total_steps or info.get("seed") != self.config.seed:
            log.warning("resuming %s with total_steps/seed %s/%s (checkpoint: %s/%s): not an exact continuation",
                        path, self.config.total_steps, self.config.seed, info.get("total_steps"), info.get("seed"))
        hashes = info.get("sha256", {})  # absent in runs written before hashes were kept: loaded unverified
        load_state_strict(self.model, read_weights(state / "model.safetensors", sha256=hashes.get("model.safetensors")),
                          str(state / "model.safetensors"))
        if self.ema is not None:
            shipped_hash = json.loads((path / CONFIG_FILE).read_text()).get(HASH_KEY)
            load_state_strict(self.ema.model, read_weights(path / "model.safetensors", sha256=shipped_hash),
                              str(path / "model.safetensors"))
        _optimizer_from_files(self.optimizer, state, hashes.get("optimizer.safetensors"))
        sched = json.loads((state / "scheduler.json").read_text())
        sched.pop("lr_lambdas", None)
        self.scheduler.__dict__.update(sched)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        rank = self.accelerator.process_index
        rng_hash = state / f"rng_{rank}.sha256"
        _set_rng_state(read_weights(state / f"rng_{rank}.safetensors",
                                    sha256=rng_hash.read_text().strip() if rng_hash.exists() else None))
        self.step = int(info["step"])

    def _check_fingerprint(self, path: Path) -> None:
        """Refuse to resume a run whose stored model/data settings differ from this one's (unless resume=force)."""
        file = path / STATE / FINGERPRINT
        if self.fingerprint is None:
            return
        if not file.is_file():
            log.warning("%s stores no model/data settings (written by older code): cannot check that this run "
                        "continues the same configuration", path)
            return
        changes = config_diff(json.loads(file.read_text()), self.fingerprint)
        if not changes:
            return
        if self.config.resume == "force":
            log.warning("resuming %s although its settings differ (train.resume=force). Changed: %s", path,
                        "; ".join(changes))
            return
        raise ResumeMismatchError(
            f"{self.out_dir} was trained with other model or data settings, so resuming would mix two runs. "
            f"Changed: {'; '.join(changes)}. Use another run_name (or train.out_dir), or train.resume=force to "
            f"continue anyway.")

    # -- validation -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss of the shipped weights (EMA if kept) in eval mode on fixed validation batches.

        The samples (evenly spaced over the split) and the diffusion noise (a fixed seed) are the same at every
        call, so the curve moves only with the weights; the training RNG is forked, so validating never changes
        the training run (exact resume holds with or without it).
        """
        if self.val_dataset is None:
            raise ValueError("Trainer.validate needs a val_dataset")
        model = self.ema.model if self.ema is not None else self.model
        n = min(len(self.val_dataset), self.config.val_batches * self.config.batch_size)
        rows = np.linspace(0, len(self.val_dataset) - 1, n).round().astype(int).tolist()
        sums: dict[str, float] = {}
        n_batches = 0
        was_training = model.training
        model.eval()
        devices = [self.accelerator.device.index] if self.accelerator.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.config.seed)
                for start in range(0, n, self.config.batch_size):
                    batch = self.collate_fn([self.val_dataset[i] for i in rows[start:start + self.config.batch_size]])
                    batch = batch.to(self.accelerator.device) if hasattr(batch, "to") else batch
                    loss, metrics = model.loss(batch)
                    for key, value in {"loss": float(loss), **metrics}.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    n_batches += 1
        finally:
            model.train(was_training)
        return {f"val/{k}": v / n_batches for k, v in sums.items()}

    # -- the loop -----------------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[Any]:
        """Batches from the current step on; the order depends only on (seed, step)."""
        per_epoch = self.sampler.batches_per_epoch
        epoch, first = divmod(self.step, per_epoch)
        while True:
            self.sampler.set_position(epoch, first)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=self.config.batch_size, sampler=self.sampler, drop_last=True,
                collate_fn=self.collate_fn, num_workers=self.config.num_workers,
                generator=torch.Generator(),  # keeps DataLoader from drawing on the global RNG
                pin_memory=self.accelerator.device.type == "cuda")
            for batch in loader:
                yield batch.to(self.accelerator.device) if hasattr(batch, "to") else batch
            epoch, first = epoch + 1, 0

    def _write_run_files(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run = {"git_commit": git_commit(), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "train": asdict(self.config), "num_processes": self.accelerator.num_processes,
               "device": str(self.accelerator.device), "torch": torch.__version__}
        runs = self.out_dir / "run.json"
        history = json.loads(runs.read_text())["history"] if runs.exists() else []
        (self.out_dir / "run.json").write_text(json.dumps({**run, "history": [*history, run["started"]]}, indent=2,
                                                          default=str))
        if self.run_config:
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train until ``total_steps`` (or ``stop_at``), resuming from the last checkpoint when allowed."""
        from tqdm.auto import tqdm

        cfg = self.config
        last = latest_checkpoint(self.out_dir) if cfg.resume else None
        if last is not None:
            self.load_checkpoint(last)
            if self.is_main:
                log.info("resumed from %s at step %d", last, self.step)
        else:
            torch.manual_seed(cfg.seed + self.accelerator.process_index)
        end = cfg.total_steps if stop_at is None else min(stop_at, cfg.total_steps)
        loggers: list[Logger] = []
        if self.is_main:
            self._write_run_files()
            loggers = self.loggers if self.loggers is not None else [JsonlLogger(self.out_dir / "metrics.jsonl")] + (
                [TensorBoardLogger(self.out_dir / "tensorboard")] if cfg.tensorboard else [])
        bar = tqdm(total=end, initial=self.step, disable=not (self.is_main and cfg.progress), desc="train",
                   dynamic_ncols=True)
        sums: dict[str, float] = {}
        n_logged, t_last, last_metrics = 0, time.perf_counter(), {}
        batches = self._batches()
        self.loss_module.train()
        try:
            while self.step < end:
                batch = next(batches)
                with self.accelerator.autocast():
                    loss, metrics = self.loss_module(batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}")
                self.accelerator.backward(loss)
                if cfg.grad_clip is not None:
                    metrics["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                                                  cfg.grad_clip))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model, self.step)
                self.step += 1
                bar.update(1)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_logged += 1
                if self.step % cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    last_metrics = {f"train/{k}": v / n_logged for k, v in sums.items()}
                    last_metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                    last_metrics["train/samples_per_s"] = (n_logged * cfg.batch_size * self.accelerator.num_processes
                                                           / max(now - t_last, 1e-9))
                    for logger in loggers:
                        logger.log(self.step, last_metrics)
                    bar.set_postfix(loss=f"{last_metrics.get('train/loss', math.nan):.4f}")
                    sums, n_logged, t_last = {}, 0, now
                if self.val_dataset is not None and cfg.val_every is not None and (
                        self.step % cfg.val_every == 0 or self.step == end):
                    t_val = time.perf_counter()
                    val = self.validate() if self.is_main else {}
                    for logger in loggers:
                        logger.log(self.step, val)
                    last_metrics.update(val)
                    t_last += time.perf_counter() - t_val  # keep samples_per_s about training alone
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            for logger in loggers:
                logger.close()
        return last_metrics


# -- `ghil train` -----------------------------------------------------------------------------------------------


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Start a new run from a saved model's weights (its normaliser statistics included): fine-tuning, or a longer
    schedule after a finished run. The optimiser, schedule and step start afresh. The checkpoint must hold the same
    model type and configuration; anything else is refused with the differences named."""
    source = load_pretrained(path)
    if type(source) is not type(model):
        raise CheckpointError(f"init_from {path}: a {type(source).__name__}, not a {type(model).__name__}")
    ours, theirs = model.init_kwargs(), source.init_kwargs()
    if ours != theirs:
        raise CheckpointError(f"init_from {path}: its configuration differs from this run's\n  checkpoint: {theirs}\n"
                              f"  this run:   {ours}")
    load_state_strict(model, source.state_dict(), str(path))
    log.info("initialised from %s", path)


def run(cfg) -> Path:
    """Hydra entry (``ghil train``): build the recipe's setup (which checks its data), fit statistics, train.

    Nothing is written before ``recipe.build()`` has returned, so a misconfigured run leaves no folder behind.
    """
    __import__("ghil.extras").extras.check_config(cfg)  # a missing optional dependency: one line, before any folder
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.set_num_threads(int(cfg.get("threads") or torch.get_num_threads()))
    container = OmegaConf.to_container(cfg, resolve=True)
    train_cfg = TrainConfig(**container["train"])
    recipe = instantiate(cfg.recipe, _convert_="all")
    setup = recipe.build()
    if not isinstance(setup, TrainingSetup):
        raise TypeError(f"{type(recipe).__qualname__}.build() must return a ghil.train.TrainingSetup, got "
                        f"{type(setup).__qualname__}")
    out_dir = Path(train_cfg.out_dir)
    fresh = latest_checkpoint(out_dir) is None or not train_cfg.resume
    if fresh and cfg.get("init_from"):
        init_from_checkpoint(setup.model, cfg.init_from)
        if setup.after_init_from is not None:
            setup.after_init_from()
    elif fresh and setup.fit_statistics is not None:
        setup.fit_statistics()
    if train_cfg.val_every is not None and setup.val_dataset is None:
        log.warning("no validation loss: the recipe found no validation data (set train.val_every=null to silence "
                    "this)")
    handler = None
    if int(os.environ.get("RANK", "0")) == 0:  # the main process (accelerate launch sets RANK)
        out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        trainer = Trainer.from_setup(setup, train_cfg, run_config=container)
        trainer.fit(stop_at=cfg.get("stop_at"))
        if trainer.is_main:
            _report_checkpoint(out_dir, trainer.step, train_cfg.total_steps, setup.eval_command)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return out_dir


def _report_checkpoint(out_dir: Path, step: int, total_steps: int,
                       eval_command: Callable[[str], str] | None) -> None:
    """Log where the run's checkpoint is and how to evaluate it."""
    final = latest_checkpoint(out_dir)
    link = out_dir / CHECKPOINTS / LAST
    if final is None:
        log.info("stopped at step %d of %d before the first checkpoint (train.ckpt_every): nothing saved", step,
                 total_steps)
        return
    stopped = "" if step == total_steps else f" (stopped at step {step} of {total_steps}; re-run to continue)"
    log.info("final checkpoint: %s, linked from %s%s", out_dir / CHECKPOINTS / final.name, link, stopped)
    if eval_command is not None:
        log.info("evaluate it with: %s", eval_command(str(link)))
