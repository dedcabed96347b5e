"""Checkpoint integrity (issue 10, item 8): config.json stores the SHA-256 of model.safetensors and loading refuses a
file that does not match; format_version must be an integer in [1, FORMAT_VERSION]."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from pathlib import Path

import pytest
import torch
from _policy_fixtures import fake_stats, tiny_config

from ghil.checkpoint import (FORMAT_VERSION, HASH_KEY, CheckpointError, file_sha256, load_pretrained, read_weights,
                             write_weights)
from policies.dit import DiTPolicy
from policies.shortcut import ShortcutConfig

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("dit_small", "dit_lang")


@pytest.fixture
def saved(tmp_path) -> Path:
    policy = DiTPolicy(tiny_config(), ShortcutConfig())
    policy.fit_normalizer(fake_stats())
    return policy.save_pretrained(tmp_path / "ckpt")


def _data_start(file: Path) -> int:
    """Offset of the tensor data in a safetensors file (8-byte little-endian header length, then the JSON header)."""
    (header_len,) = struct.unpack("<Q", file.read_bytes()[:8])
    return 8 + header_len


def _set_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta.update(changes)
    (folder / "config.json").write_text(json.dumps(meta))


def test_save_records_the_sha256_of_the_weights(saved):
    meta = json.loads((saved / "config.json").read_text())
    data = (saved / "model.safetensors").read_bytes()
    assert meta[HASH_KEY] == hashlib.sha256(data).hexdigest() == file_sha256(saved / "model.safetensors")
    assert meta["format_version"] == 1  # adding the hash needs no new version: version-1 readers ignore the field
    assert isinstance(DiTPolicy.from_pretrained(saved), DiTPolicy)


def test_every_flipped_byte_in_the_tensor_data_is_refused(saved):
    """The probe found 37 of 40 single-byte flips in the tensor data loading silently; now none does."""
    file = saved / "model.safetensors"
    original = file.read_bytes()
    start = _data_start(file)
    positions = [start + i * (len(original) - start - 1) // 39 for i in range(40)]
    for pos in positions:
        damaged = bytearray(original)
        damaged[pos] ^= 0x01 if pos % 2 else 0x80  # a low mantissa bit or a sign/exponent bit
        file.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match="modified or corrupted"):
            DiTPolicy.from_pretrained(saved)
    file.write_bytes(original)
    DiTPolicy.from_pretrained(saved)


def test_mismatch_error_names_file_and_both_hashes_through_load_pretrained(saved):
    file = saved / "model.safetensors"
    expected = file_sha256(file)
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CheckpointError) as err:
        load_pretrained(saved)
    message = str(err.value)
    assert str(file) in message and expected in message and actual in message
    assert "modified or corrupted" in message


def test_replaced_weights_of_the_same_model_are_refused(saved, tmp_path):
    """A validly formatted file with other weights (e.g. copied from another run) does not match the config's hash."""
    other = DiTPolicy(tiny_config(), ShortcutConfig())
    other.fit_normalizer(fake_stats())
    other.save_pretrained(tmp_path / "other")
    (saved / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="modified or corrupted"):
        DiTPolicy.from_pretrained(saved)


def test_checkpoint_without_hash_loads_with_a_warning(saved, caplog):
    meta = json.loads((saved / "config.json").read_text())
    del meta[HASH_KEY]
    (saved / "config.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="ghil.checkpoint"):
        model = DiTPolicy.from_pretrained(saved)
    assert isinstance(model, DiTPolicy)
    assert any(HASH_KEY in r.getMessage() and "unverified" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", [123, None, "abc", "G" * 64, "0" * 63, ["0" * 64]])
def test_malformed_hash_is_refused(saved, value):
    _set_meta(saved, **{HASH_KEY: value})
    with pytest.raises(CheckpointError, match=HASH_KEY):
        DiTPolicy.from_pretrained(saved)


@pytest.mark.parametrize("version", [-5, 0, "1", True, 1.5, None, FORMAT_VERSION + 1])
def test_invalid_format_version_is_refused(saved, version):
    _set_meta(saved, format_version=version)
    with pytest.raises(CheckpointError, match="format_version"):
        DiTPolicy.from_pretrained(saved)
    with pytest.raises(CheckpointError, match="format_version"):
        load_pretrained(saved)


def test_missing_format_version_is_refused(saved):
    meta = json.loads((saved / "config.json").read_text())
    del meta["format_version"]
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        DiTPolicy.from_pretrained(saved)


def test_version_1_files_still_load(saved):
    _set_meta(saved, format_version=1)
    assert isinstance(DiTPolicy.from_pretrained(saved), DiTPolicy)


def test_write_weights_returns_the_hash_and_read_weights_verifies_it(tmp_path):
    """The trainer's state files go through write_weights/read_weights: unchanged without a hash, verified with one."""
    file = tmp_path / "state.safetensors"
    digest = write_weights({"a": torch.arange(6.0).reshape(2, 3)}, file)
    assert digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert torch.equal(read_weights(file)["a"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(read_weights(file, sha256=digest)["a"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(CheckpointError, match="modified or corrupted"):
        read_weights(file, sha256="0" * 64)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoints_carry_a_matching_hash(name):
    folder = REPO / "ghil" / "checkpoints" / name
    meta = json.loads((folder / "config.json").read_text())
    assert meta[HASH_KEY] == file_sha256(folder / "model.safetensors")
    assert HASH_KEY in (folder / "README.md").read_text()


def test_hashing_is_cheap(tmp_path):
    """Streaming SHA-256: a 10 MB file hashes in ~10 ms; the bound leaves a wide margin for a shared CI machine."""
    file = tmp_path / "ten_mb.bin"
    file.write_bytes(bytes(range(256)) * (10 * 1024 * 1024 // 256))
    file_sha256(file)  # warm the page cache
    start = time.perf_counter()
    digest = file_sha256(file)
    elapsed = time.perf_counter() - start
    assert digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert elapsed < 0.5, elapsed
