"""Checkpoints as ``config.json`` + ``model.safetensors``, a registry of learnable types, and config (de)serialisation.

A checkpoint folder::

    config.json        {"type": "dit", "format_version": 1, "weights_sha256": "<64 hex digits>",
                        "init": {"config": {"type": "dit_config", ...}, "sampler": {"type": "ddim", ...}},
                        "init_sha256": "<64 hex digits>"}
    model.safetensors  every parameter and buffer (normaliser statistics included); nothing is pickled

``weights_sha256`` is the SHA-256 of ``model.safetensors`` as written by ``save_pretrained`` (weights first, then
the config that names their hash, each atomically). ``register("dit")`` on a model class and
``register_config("dit_config")`` on its config dataclasses let ``load_pretrained(path)`` rebuild any model without
Hydra.

What loading (``from_pretrained`` / ``load_pretrained``) checks, each failure a ``CheckpointError`` naming what is
wrong, before any weight reaches the model:

- the folder and ``config.json`` exist, the config is JSON with ``type`` and ``init``, and ``format_version`` is an
  integer (not a bool) in ``[1, FORMAT_VERSION]``;
- ``type`` and ``init`` (the model's settings) hash to ``init_sha256``, before anything is built from them: an
  edited or corrupted setting (another sampler step count, a bumped width) is refused like a flipped weight, since
  the weights were trained with the recorded settings. A config without the field loads with a logged warning;
- the checkpoint's type is the requested one (or a registered / entry-point type for ``load_pretrained``), and its
  config has no field the code does not know;
- ``model.safetensors`` hashes to ``weights_sha256`` (streamed, ~1 ms per MB): a flipped byte, a truncated file or
  weights copied from another run are refused as "modified or corrupted". A malformed hash value is refused. A
  checkpoint without the field (written before hashes were stored) still loads, unverified, with a logged warning;
  re-save it with ``save_pretrained`` to add one;
- the file is readable safetensors and its keys and shapes are exactly the model's (missing, unexpected and
  mis-shaped keys named).

``read_weights(file, sha256=...)`` / ``write_weights`` (which returns the hash it wrote) are the same primitives for
other tensor files, e.g. the trainer's resume state.

Usage::

    @register("dit")
    class DiTPolicy(PretrainedMixin, nn.Module):
        def __init__(self, config: DiTConfig, sampler: DDIMConfig): ...
        def init_kwargs(self): return {"config": self.config, "sampler": self.sampler.config}

    policy.save_pretrained("runs/x/checkpoints/step_000100")
    policy = DiTPolicy.from_pretrained("runs/x/checkpoints/last")     # or load_pretrained(path) for any type
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMAT_VERSION = 1  # the integrity hash is an added field: version-1 readers ignore it, so no new version
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HASH_KEY = "weights_sha256"  # config.json field: SHA-256 (hex) of WEIGHTS_FILE
# config.json field: SHA-256 (hex) of the canonical JSON of the model's "type" and "init" (what rebuilds the model)
INIT_HASH_KEY = "init_sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20

log = logging.getLogger(__name__)

MODELS: dict[str, type] = {}
MODEL_ENTRY_POINTS = "ghil.models"  # pyproject entry points: type name -> "module:Class" (policies.dit:DiTPolicy, ...)
CONFIGS: dict[str, type] = {}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the requested model (wrong type, keys, shapes, corrupt file)."""


def _add_to_registry(table: dict[str, type], kind: str, name: str, cls: type) -> None:
    if name in table and table[name] is not cls:
        raise ValueError(f"{kind} type {name!r} is already registered to {table[name].__qualname__}")
    table[name] = cls


def register(name: str):
    """Class decorator: make a PretrainedMixin model loadable by ``load_pretrained`` under ``name``."""

    def wrap(cls: type) -> type:
        _add_to_registry(MODELS, "model", name, cls)
        cls.type_name = name
        return cls

    return wrap


def register_config(name: str):
    """Class decorator for config dataclasses: serialised with ``"type": name`` so they can be rebuilt."""

    def wrap(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_config({name!r}) needs a dataclass, got {cls.__qualname__}")
        _add_to_registry(CONFIGS, "config", name, cls)
        cls.config_type = name
        return cls

    return wrap


def coerce_config(value: Any, cls: type, name: str, optional: bool = False) -> Any:
    """A nested config field as its dataclass: the dataclass itself, or a plain mapping of its fields (Hydra YAML
    without ``_target_``; a saved ``type`` key is ignored), or None when ``optional``; TypeError naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**{k: v for k, v in value.items() if k != "type"})
    raise TypeError(f"{name} must be a {cls.__name__} (or a mapping of its fields){' or None' if optional else ''}, "
                    f"got {value!r}")


def config_to_dict(value: Any) -> Any:
    """A registered config dataclass (possibly nested) as JSON-ready data, each dataclass tagged with its type."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = getattr(type(value), "config_type", None)
        if name is None:
            raise TypeError(f"{type(value).__qualname__} is not a registered config (use @register_config)")
        out = {"type": name}
        out.update({f.name: config_to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)})
        return out
    if isinstance(value, Mapping):
        return {str(k): config_to_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [config_to_dict(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot serialise {type(value).__qualname__} in a config: {value!r}")


def config_from_dict(data: Any) -> Any:
    """Inverse of ``config_to_dict``: dicts with a registered ``type`` become config dataclasses (recursively).

    Lists stay lists; each config's ``__post_init__`` turns its sequence fields into tuples.
    """
    if isinstance(data, Mapping):
        if "type" in data and isinstance(data["type"], str) and data["type"] in CONFIGS:
            cls = CONFIGS[data["type"]]
            names = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: config_from_dict(v) for k, v in data.items() if k != "type"}
            unknown = sorted(set(kwargs) - names)
            if unknown:
                raise CheckpointError(f"config of type {data['type']!r} has fields {unknown} that "
                                      f"{cls.__qualname__} does not know (a checkpoint from newer code?)")
            return cls(**kwargs)
        if "type" in data and isinstance(data["type"], str) and data["type"] not in CONFIGS:
            raise CheckpointError(f"unknown config type {data['type']!r}; registered: {sorted(CONFIGS)} "
                                  "(import the module that defines it first)")
        return {k: config_from_dict(v) for k, v in data.items()}
    if isinstance(data, list):
        return [config_from_dict(v) for v in data]
    return data


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not file.exists():
        raise CheckpointError(f"{file} is missing: {path} is not a ghil checkpoint (expected {CONFIG_FILE} + "
                              f"{WEIGHTS_FILE})")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON (corrupted checkpoint?): {err}") from err
    if not isinstance(meta, dict) or "type" not in meta or "init" not in meta:
        raise CheckpointError(f"{file} lacks the 'type'/'init' fields of a ghil checkpoint config")
    if not isinstance(meta["type"], str) or not isinstance(meta["init"], dict):
        raise CheckpointError(f"{file}: 'type' must be a string and 'init' an object of constructor arguments, got "
                              f"{type(meta['type']).__name__} and {type(meta['init']).__name__}")
    version = meta.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:  # type(): True/False are ints too
        raise CheckpointError(f"{file} has format_version {version!r}; this code reads integer versions 1 to "
                              f"{FORMAT_VERSION} (a checkpoint from newer code, or a damaged config?)")
    for key in (HASH_KEY, INIT_HASH_KEY):
        if key in meta and not (isinstance(meta[key], str) and _HEX64.fullmatch(meta[key])):
            raise CheckpointError(f"{file} has {key} {meta[key]!r}, not 64 lowercase hex digits (a damaged or "
                                  "hand-edited config?)")
    return meta


def init_sha256(meta: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint config's ``type`` and ``init`` as canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps({"type": meta["type"], "init": meta["init"]}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def verify_init_sha256(meta: Mapping[str, Any], path: Path) -> None:
    """CheckpointError when config.json's ``type``/``init`` no longer hash to its ``init_sha256`` (a checkpoint
    without the field, written before it existed, passes with a logged warning)."""
    expected = meta.get(INIT_HASH_KEY)
    if expected is None:
        log.warning("%s has no %s (written before ghil stored it): its model settings are used unverified; re-save "
                    "it with save_pretrained to add one", path / CONFIG_FILE, INIT_HASH_KEY)
        return
    actual = init_sha256(meta)
    if actual != expected:
        raise CheckpointError(f"{path / CONFIG_FILE}: the model settings ('type'/'init') were modified or corrupted "
                              f"after the checkpoint was saved: they hash to {actual}, the config records "
                              f"{INIT_HASH_KEY} {expected}; the weights were trained with the recorded settings, "
                              "refusing the changed ones (a deliberate change needs a re-save with save_pretrained)")


def file_sha256(file: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, streamed in 1 MiB chunks (a 10 MB file takes ~10 ms)."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def verify_sha256(file: Path, expected: str) -> None:
    """CheckpointError unless ``file`` hashes to ``expected`` (naming the file and both hashes)."""
    if not file.exists():
        raise CheckpointError(f"{file} is missing")
    actual = file_sha256(file)
    if actual != expected:
        raise CheckpointError(f"{file} was modified or corrupted after it was saved: its SHA-256 is {actual}, the "
                              f"checkpoint's config records {expected}; refusing to load it (restore or re-download "
                              "the file; a deliberately changed file needs a re-save with save_pretrained)")


def read_weights(file: Path, sha256: str | None = None) -> dict[str, Tensor]:
    """All tensors of a safetensors file; CheckpointError when it is missing or unreadable, or, with ``sha256``,
    when its content does not hash to it."""
    from safetensors.torch import load_file

    if not file.exists():
        raise CheckpointError(f"{file} is missing")
    if sha256 is not None:
        verify_sha256(file, sha256)
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types for truncated/garbled headers
        raise CheckpointError(f"{file} is not a readable safetensors file (corrupted or truncated?): {err}") from err


def write_weights(tensors: Mapping[str, Tensor], file: Path, metadata: Mapping[str, str] | None = None) -> str:
    """Write tensors atomically (temp file + rename), detached, contiguous and on the CPU; returns the file's SHA-256
    (hashed before the rename, so it is the content that was written)."""
    from safetensors.torch import save_file

    tmp = file.with_name(f".{file.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata=dict(metadata or {}))
    digest = file_sha256(tmp)
    os.replace(tmp, file)
    return digest


def load_state_strict(module: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names every missing, unexpected and mis-shaped key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or shapes:
        def short(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {short(shapes)}")
        raise CheckpointError(f"{source} does not fit {type(module).__qualname__} ({'; '.join(parts)}); was it "
                              "saved from another architecture or config?")
    module.load_state_dict(tensors, strict=True)


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for a registered ``nn.Module`` built from config dataclasses.

    Subclasses define ``init_kwargs()`` -> the constructor's keyword arguments (registered config dataclasses).
    """

    type_name: str = ""

    def init_kwargs(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` then ``config.json`` (with the weights' SHA-256), each atomically."""
        if not self.type_name:
            raise TypeError(f"{type(self).__qualname__} is not registered (decorate it with @register(name))")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        init = {k: config_to_dict(v) for k, v in self.init_kwargs().items()}  # fails before anything is written
        assert isinstance(self, nn.Module)
        # Weights first: a crash between the two writes leaves a config whose hash does not match (refused loudly),
        # never a stale config that silently passes.
        digest = write_weights(self.state_dict(), path / WEIGHTS_FILE, {"type": self.type_name,
                                                                        "format_version": str(FORMAT_VERSION)})
        meta = {"type": self.type_name, "format_version": FORMAT_VERSION, HASH_KEY: digest, "init": init}
        meta[INIT_HASH_KEY] = init_sha256(meta)
        tmp = path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path / CONFIG_FILE)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"):
        """Rebuild the model from ``path`` after the checks of the module docstring (``weights_sha256`` verified
        before the weights are read; a checkpoint without one loads unverified, with a logged warning)."""
        path = Path(path)
        meta = _read_config(path)
        if cls.type_name and meta["type"] != cls.type_name:
            raise CheckpointError(f"{path} holds a {meta['type']!r} checkpoint, not {cls.type_name!r} "
                                  f"({cls.__qualname__}); load it with ghil.checkpoint.load_pretrained")
        # Before anything is built from them: changed settings could describe another (or an enormous) network.
        verify_init_sha256(meta, path)
        target = cls if cls.type_name else _model_class(meta["type"], path)
        try:
            kwargs = {k: config_from_dict(v) for k, v in meta["init"].items()}
            model = target(**kwargs)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path / CONFIG_FILE} does not describe a valid {target.__qualname__}: "
                                  f"{err}") from err
        load_state_strict(model, read_weights(path / WEIGHTS_FILE, _expected_sha256(meta, path)),
                          str(path / WEIGHTS_FILE))
        model.to(map_location)
        model.eval()
        return model


def _expected_sha256(meta: dict, path: Path) -> str | None:
    """The config's weights hash, or None (with a warning) for a checkpoint written before hashes were stored."""
    expected = meta.get(HASH_KEY)
    if expected is None:
        log.warning("%s has no %s (written before ghil stored content hashes): its weights are loaded unverified; "
                    "re-save it with save_pretrained to add one", path / CONFIG_FILE, HASH_KEY)
    return expected


def _model_class(name: str, path: Path) -> type:
    """The class registered as ``name``; unknown names are looked up among the installed ``ghil.models`` entry
    points (importing the module registers the class)."""
    if name not in MODELS:
        from importlib.metadata import entry_points

        for entry in entry_points(group=MODEL_ENTRY_POINTS):
            if entry.name == name:
                entry.load()
                break
    if name not in MODELS:
        known = sorted(set(MODELS) | {e.name for e in entry_points(group=MODEL_ENTRY_POINTS)})
        raise CheckpointError(f"{path} holds a checkpoint of unknown type {name!r}; known: {known} (register the "
                              f"class under the {MODEL_ENTRY_POINTS!r} entry points, or import its module first)")
    return MODELS[name]


def load_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Load any registered model from a checkpoint folder, dispatching on its config.json ``type``; the weights are
    checked against the config's ``weights_sha256`` (see ``PretrainedMixin.from_pretrained``).

    A relative ``path`` is looked up in the working directory first, then among the installed package's files
    (``checkpoints/dit_small`` is the shipped one), see ``ghil.paths.resolve_checkpoint``."""
    from ghil.paths import resolve_checkpoint

    try:
        folder = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    meta = _read_config(folder)
    return _model_class(meta["type"], folder).from_pretrained(folder, map_location)
