"""ChunkQueue: receding horizon, temporal ensembling, gripper binarisation, clear(), with a fake counting policy."""

from __future__ import annotations

import pytest
import torch

from ghil.runtime.chunks import ChunkQueue
from ghil.types import binarize_gripper
from ghil.types import ActionChunk

torch.set_num_threads(1)


class CountingPolicy:
    """Chunk of chunk_len actions whose first column is the absolute step they are meant for."""

    def __init__(self, chunk_len: int):
        self.chunk_len, self.calls = chunk_len, 0

    def predict_chunk(self, obs, goal) -> ActionChunk:
        self.calls += 1
        t = obs
        steps = torch.arange(t, t + self.chunk_len, dtype=torch.float32)
        return ActionChunk(torch.stack([steps, torch.full_like(steps, float(self.calls))], dim=1), t0=t)


def run(queue: ChunkQueue, policy: CountingPolicy, n: int) -> list[torch.Tensor]:
    out = []
    for t in range(n):
        if queue.empty():
            queue.push(policy.predict_chunk(t, None))
        out.append(queue.pop())
    return out


def test_receding_horizon_calls_every_exec_len_steps():
    policy = CountingPolicy(chunk_len=8)
    actions = run(ChunkQueue(exec_len=4), policy, 12)
    assert policy.calls == 3
    assert [float(a[0]) for a in actions] == list(range(12))  # each step gets the action meant for it


def test_exec_len_longer_than_chunk_replans_at_chunk_end():
    policy = CountingPolicy(chunk_len=3)
    run(ChunkQueue(exec_len=10), policy, 9)
    assert policy.calls == 3


def test_temporal_ensembling_averages_overlapping_predictions():
    policy = CountingPolicy(chunk_len=4)
    queue = ChunkQueue(exec_len=1, ensemble_decay=0.0)
    actions = run(queue, policy, 6)
    assert policy.calls == 6
    assert [float(a[0]) for a in actions] == list(range(6))
    # step 5 is covered by the chunks of calls 3, 4, 5, 6 -> uniform mean of their call ids
    assert float(actions[5][1]) == pytest.approx((3 + 4 + 5 + 6) / 4)
    weighted = run(ChunkQueue(exec_len=1, ensemble_decay=1.0), CountingPolicy(chunk_len=4), 6)
    w = torch.exp(-torch.arange(4.0))
    assert float(weighted[5][1]) == pytest.approx(float((w * torch.tensor([3.0, 4, 5, 6])).sum() / w.sum()), rel=1e-5)


def test_gripper_is_binarised_after_ensembling():
    queue = ChunkQueue(exec_len=1, ensemble_decay=0.0, gripper_index=1)
    queue.push(ActionChunk(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), t0=0))
    queue.pop()
    queue.push(ActionChunk(torch.tensor([[0.0, -1.0], [0.0, -1.0]]), t0=1))  # mean of +1 and -1 is 0 -> open
    assert float(queue.pop()[1]) == 1.0
    assert binarize_gripper(torch.tensor([[0.5, -0.3]]), 1).tolist() == [[0.5, -1.0]]


def test_clear_forgets_everything():
    policy = CountingPolicy(chunk_len=8)
    queue = ChunkQueue(exec_len=4)
    run(queue, policy, 2)
    assert not queue.empty() and len(queue) == 2
    queue.clear()
    assert queue.empty() and len(queue) == 0
    with pytest.raises(RuntimeError, match="push a chunk"):
        queue.pop()


def test_bad_input():
    with pytest.raises(ValueError):
        ChunkQueue(exec_len=0)
    with pytest.raises(ValueError):
        ChunkQueue(exec_len=1, ensemble_decay=-1.0)
    queue = ChunkQueue(exec_len=1)
    with pytest.raises(ValueError, match="NaN"):
        queue.push(ActionChunk(torch.tensor([[float("nan")]]), t0=0))
