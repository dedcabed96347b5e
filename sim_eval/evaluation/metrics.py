"""CALVIN's long-horizon metrics, as pure functions of chain records (protocol §5).

* SR@i: the fraction of chains with at least ``i`` consecutive successes, i = 1..5.
* Average length: the mean number of consecutive successes, which equals SR@1 + ... + SR@5.
* Per-task counts: successes / attempts per task (a task is attempted only if every earlier subtask succeeded).

Usage::

    m = summarize(records)
    m.success_rates          # (SR@1, ..., SR@5), fractions
    m.avg_len                # in [0, 5]
    m.per_task["open_drawer"].successes, m.per_task["open_drawer"].attempts
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sim_eval.protocol.chains import CHAIN_LENGTH
from sim_eval.evaluation.records import ChainRecord
from sim_eval.protocol.tasks import TASK_NAMES


@dataclass(frozen=True)
class TaskCount:
    successes: int
    attempts: int

    @property
    def rate(self) -> float:
        return self.successes / self.attempts if self.attempts else float("nan")


@dataclass(frozen=True)
class EvalMetrics:
    n_chains: int
    success_rates: tuple[float, ...]  # (SR@1, ..., SR@5), fractions in [0, 1]
    avg_len: float  # mean consecutive successes, in [0, 5]
    per_task: dict[str, TaskCount]  # every one of the 34 tasks, attempted or not
    failure_reasons: dict[str, int]  # failure kind -> number of chains that stopped for it
    completed_histogram: tuple[int, ...]  # number of chains with exactly 0, 1, ..., 5 successes
    avg_len_ci95: tuple[float, float] = (float("nan"), float("nan"))  # normal-approximation 95 % interval

    def to_dict(self) -> dict:
        return {
            "n_chains": self.n_chains,
            "sr": {f"sr@{i + 1}": rate for i, rate in enumerate(self.success_rates)},
            "avg_len": self.avg_len,
            "avg_len_ci95": list(self.avg_len_ci95),
            "per_task": {t: {"successes": c.successes, "attempts": c.attempts} for t, c in self.per_task.items()},
            "failure_reasons": dict(self.failure_reasons),
            "completed_histogram": list(self.completed_histogram),
        }


def success_rates(n_completed: Sequence[int]) -> tuple[float, ...]:
    """SR@1..5 from each chain's number of consecutive successes."""
    if not n_completed:
        raise ValueError("no chains: success rates are undefined")
    for n in n_completed:
        if not 0 <= n <= CHAIN_LENGTH:
            raise ValueError(f"a chain completes 0..{CHAIN_LENGTH} subtasks, got {n}")
    total = len(n_completed)
    return tuple(sum(1 for n in n_completed if n >= i) / total for i in range(1, CHAIN_LENGTH + 1))


def average_length(n_completed: Sequence[int]) -> float:
    """Mean consecutive successes; checked against the sum of SR@1..5 (CALVIN's identity)."""
    if not n_completed:
        raise ValueError("no chains: average length is undefined")
    avg = sum(n_completed) / len(n_completed)
    assert abs(avg - sum(success_rates(n_completed))) < 1e-9, "avg len must equal the sum of SR@1..5"
    return avg


def average_length_ci95(n_completed: Sequence[int]) -> tuple[float, float]:
    """95 % interval of the average length over chains: mean +- 1.96 standard errors (chains are independent draws
    of the protocol; with N = 100 the normal approximation is close to a bootstrap). NaN for fewer than 2 chains."""
    n = len(n_completed)
    if n < 2:
        return (float("nan"), float("nan"))
    mean = sum(n_completed) / n
    var = sum((x - mean) ** 2 for x in n_completed) / (n - 1)
    half = 1.96 * (var / n) ** 0.5
    return (round(max(mean - half, 0.0), 4), round(min(mean + half, float(CHAIN_LENGTH)), 4))


def task_counts(records: Iterable[ChainRecord]) -> dict[str, TaskCount]:
    """Successes and attempts per task, for all 34 tasks in the official order."""
    successes: Counter = Counter()
    attempts: Counter = Counter()
    for rec in records:
        for sub in rec.subtasks:
            attempts[sub.task] += 1
            successes[sub.task] += int(sub.success)
    return {t: TaskCount(successes[t], attempts[t]) for t in TASK_NAMES}


def summarize(records: Sequence[ChainRecord]) -> EvalMetrics:
    """All metrics of a set of chain records (one record per chain; duplicates are an error)."""
    indices = [rec.chain_index for rec in records]
    duplicates = sorted(i for i, n in Counter(indices).items() if n > 1)
    if duplicates:
        raise ValueError(f"chains counted twice: {duplicates[:10]}")
    done = [rec.n_completed for rec in records]
    reasons = Counter(rec.subtasks[-1].failure for rec in records if not rec.subtasks[-1].success)
    return EvalMetrics(
        n_chains=len(records),
        success_rates=success_rates(done),
        avg_len=average_length(done),
        per_task=task_counts(records),
        failure_reasons=dict(sorted(reasons.items())),
        completed_histogram=tuple(done.count(k) for k in range(CHAIN_LENGTH + 1)),
        avg_len_ci95=average_length_ci95(done),
    )
