"""CALVIN metrics from hand-made chain records, and the record format's own checks."""

from __future__ import annotations

import pytest

from sim_eval.protocol.chains import load_official_chains
from sim_eval.evaluation.metrics import average_length, success_rates, summarize, task_counts
from sim_eval.evaluation.records import FAILURE_INVALID_ACTION, FAILURE_TIMEOUT, ChainRecord, RecordError, SubtaskRecord

OFFICIAL = load_official_chains()


def record(index: int, n_completed: int, failure: str = FAILURE_TIMEOUT) -> ChainRecord:
    """The official chain ``index`` with ``n_completed`` successes, then (if < 5) one failure."""
    state, tasks = OFFICIAL[index]
    subs = [SubtaskRecord(t, f"do {t}", True, 10 + k) for k, t in enumerate(tasks[:n_completed])]
    if n_completed < 5:
        subs.append(SubtaskRecord(tasks[n_completed], "x", False, 360, failure, "why"))
    return ChainRecord(index, state, tasks, tuple(subs), seed=index)


def test_success_rates_and_average_length_by_hand():
    done = [0, 1, 2, 5, 5, 3]
    assert success_rates(done) == pytest.approx((5 / 6, 4 / 6, 3 / 6, 2 / 6, 2 / 6))
    assert average_length(done) == pytest.approx(16 / 6)
    assert average_length(done) == pytest.approx(sum(success_rates(done)))
    assert success_rates([5]) == (1.0,) * 5 and success_rates([0, 0]) == (0.0,) * 5
    with pytest.raises(ValueError, match="0..5"):
        success_rates([6])
    with pytest.raises(ValueError, match="no chains"):
        average_length([])


def test_summarize_hand_made_records():
    records = [record(0, 0), record(1, 2), record(2, 5), record(3, 1, FAILURE_INVALID_ACTION)]
    m = summarize(records)
    assert m.n_chains == 4
    assert m.success_rates == pytest.approx((3 / 4, 2 / 4, 1 / 4, 1 / 4, 1 / 4))
    assert m.avg_len == pytest.approx(8 / 4)
    assert m.completed_histogram == (1, 1, 1, 0, 0, 1)
    assert m.failure_reasons == {FAILURE_TIMEOUT: 2, FAILURE_INVALID_ACTION: 1}
    # Per-task counts, tallied by hand from the official chains' tasks.
    expected: dict[str, list[int]] = {}
    for index, n_done in ((0, 0), (1, 2), (2, 5), (3, 1)):
        tasks = OFFICIAL[index][1]
        for k, task in enumerate(tasks[: min(n_done + 1, 5)]):
            s, a = expected.setdefault(task, [0, 0])
            expected[task] = [s + int(k < n_done), a + 1]
    got = {t: [c.successes, c.attempts] for t, c in m.per_task.items() if c.attempts}
    assert got == expected
    assert len(m.per_task) == 34 and all(c.attempts == 0 for c in task_counts([]).values())
    assert m.to_dict()["sr"]["sr@1"] == pytest.approx(0.75)


def test_summarize_refuses_a_chain_counted_twice():
    with pytest.raises(ValueError, match="counted twice"):
        summarize([record(0, 1), record(0, 1)])


def test_record_round_trip_and_n_completed():
    rec = record(5, 3)
    back = ChainRecord.from_json(rec.to_json())
    assert back == rec and back.n_completed == 3
    assert rec.outcome() == back.outcome() and "wall_s" not in rec.outcome()


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw.update(extra=1), "unknown fields"),
    (lambda raw: raw.pop("seed"), "missing fields"),
    (lambda raw: raw["subtasks"][0].update(task="open_drawr"), "open_drawer"),
    (lambda raw: raw["subtasks"][0].update(failure="bogus"), "unknown failure kind"),
    (lambda raw: raw.update(subtasks=[]), "no subtask attempted"),
])
def test_record_parsing_rejects_malformed_records(mutate, message):
    import json

    raw = json.loads(record(0, 0).to_json())
    mutate(raw)
    with pytest.raises(ValueError, match=message):
        ChainRecord.from_dict(raw)


def test_record_invariants():
    state, tasks = OFFICIAL[0]
    fail = SubtaskRecord(tasks[0], "x", False, 360, FAILURE_TIMEOUT)
    ok = SubtaskRecord(tasks[1], "x", True, 3)
    with pytest.raises(RecordError, match="failed but the chain went on"):
        ChainRecord(0, state, tasks, (fail, ok), seed=0)
    with pytest.raises(RecordError, match="stopped after a success"):
        ChainRecord(0, state, tasks, (SubtaskRecord(tasks[0], "x", True, 3),), seed=0)
    with pytest.raises(RecordError, match="success=True"):
        SubtaskRecord(tasks[0], "x", True, 3, FAILURE_TIMEOUT)
    with pytest.raises(RecordError, match="chain says"):
        ChainRecord(0, state, tasks, (SubtaskRecord(tasks[1], "x", False, 3, FAILURE_TIMEOUT),), seed=0)


def test_average_length_interval_by_hand():
    from sim_eval.evaluation.metrics import average_length_ci95

    # mean 2, sample sd sqrt(4/3), se = sqrt(4/3)/2: 2 +- 1.96 * 0.57735
    low, high = average_length_ci95([1, 1, 3, 3])
    assert low == pytest.approx(2 - 1.96 * (4 / 3) ** 0.5 / 2, abs=1e-4) and high == pytest.approx(4 - low, abs=1e-4)
    assert average_length_ci95([0, 0, 2, 2])[0] == 0.0  # clipped to the possible range
    assert average_length_ci95([5, 5, 5]) == (5.0, 5.0)  # no spread: a point, clipped to [0, 5]
    assert all(x != x for x in average_length_ci95([3]))  # one chain: undefined (NaN)
