"""Normalizer: round trip, the [-1, 1] range of min_max keys, loud failures, statistics saved in the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ghil.normalizer import Normalizer, VectorStats

torch.set_num_threads(1)


def fitted() -> tuple[Normalizer, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(500, 4))
    data[:, 3] = 1.0  # a constant dimension must not blow up
    norm = Normalizer({"a": (4, "min_max"), "p": (4, "mean_std")})
    norm.fit({"a": VectorStats.of(data), "p": VectorStats.of(data)})
    return norm, data


def test_round_trip_and_ranges():
    norm, data = fitted()
    x = torch.as_tensor(data, dtype=torch.float32)
    for key in ("a", "p"):
        torch.testing.assert_close(norm.decode(key, norm.encode(key, x)), x, atol=1e-5, rtol=1e-5)
    y = norm.encode("a", x)
    assert y[:, :3].min() >= -1 - 1e-6 and y[:, :3].max() <= 1 + 1e-6
    assert torch.isfinite(y).all() and torch.isfinite(norm.encode("p", x)).all()
    z = norm.encode("p", x)[:, :3]
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 0.01
    low, high = norm.bounds("a")
    torch.testing.assert_close(low[:3], x[:, :3].min(0).values, atol=1e-5, rtol=0)


def test_unknown_key_wrong_width_and_unfitted_raise():
    norm, _ = fitted()
    with pytest.raises(KeyError, match="known keys"):
        norm.encode("nope", torch.zeros(4))
    with pytest.raises(ValueError, match="last dimension of 4"):
        norm.encode("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="before fit"):
        Normalizer({"a": (2, "min_max")}).encode("a", torch.zeros(2))
    with pytest.raises(KeyError, match="missing statistics"):
        Normalizer({"a": (2, "min_max")}).fit({})
    with pytest.raises(ValueError, match="mode"):
        Normalizer({"a": (2, "zscore")})
    with pytest.raises(ValueError, match="NaN"):
        VectorStats.of(np.array([[np.nan, 1.0]]))


def test_statistics_live_in_the_state_dict():
    norm, data = fitted()
    other = Normalizer({"a": (4, "min_max"), "p": (4, "mean_std")})
    other.load_state_dict(norm.state_dict())
    assert other.is_fitted
    x = torch.as_tensor(data[:5], dtype=torch.float32)
    assert torch.equal(other.encode("a", x), norm.encode("a", x))
