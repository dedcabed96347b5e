"""benchmarks/policy_latency.py runs on the shipped checkpoint and on an untrained preset, and reports what it timed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("policy_latency", REPO / "benchmarks" / "policy_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_times_the_shipped_checkpoint_per_step_count(benchmark, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "latency.json"
    report = benchmark.main(["--checkpoint", "checkpoints/dit_small", "--steps", "1", "2", "--calls", "2",
                             "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert [row["n_steps"] for row in report["results"]] == [1, 2]
    assert all(0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] for row in report["results"])
    assert report["encoder_median_ms"] > 0 and report["sampler"] == "ShortcutSampler"
    assert json.loads(out.read_text()) == report


def test_untrained_preset_and_bad_step_count(benchmark):
    report = benchmark.main(["--preset", "dit_small", "--sampler", "ddim", "--steps", "3", "--calls", "1",
                             "--warmup", "0", "--threads", "1"])
    assert report["sampler"] == "DDIMSampler" and report["checkpoint"].startswith("untrained policy=dit_small")
    assert report["trainable_params"] > 1_000_000
    with pytest.raises(ValueError, match="power of two"):
        benchmark.main(["--checkpoint", str(REPO / "ghil" / "checkpoints" / "dit_small"), "--steps", "3", "--calls", "1"])
