"""InstructionGate: bad instructions rejected with a reason, floods rate-limited, latched repeats ignored."""

from __future__ import annotations

import threading

import pytest

from ghil.runtime.instruction_gate import InstructionGate


def test_a_good_instruction_is_accepted_cleaned():
    gate = InstructionGate()
    verdict = gate.check("  open   the drawer\n", 0.0)
    assert verdict.ok and verdict.text == "open the drawer" and verdict.reason is None
    assert gate.check("open the drawer".encode(), 10.0).ok is False  # the same one is executing
    gate.done()
    assert gate.check("open the drawer".encode(), 10.0).text == "open the drawer"  # UTF-8 bytes decode


@pytest.mark.parametrize("message, reason", [
    ("", "empty"), ("   \n\t", "empty"), ("x" * 513, "too long"), (b"\xff\xfe\x00\x01", "not UTF-8"),
    ("open\x00the drawer", "control"), ("\x1b[31mred", "control"), (None, "not a string"), (42, "not a string"),
])
def test_bad_instructions_are_rejected_with_a_reason_and_never_raise(message, reason):
    gate = InstructionGate()
    verdict = gate.check(message, 0.0)
    assert not verdict.ok and verdict.text is None and reason in verdict.reason
    assert gate.n_rejected == 1 and gate.n_accepted == 0


def test_exactly_max_chars_is_accepted():
    assert InstructionGate(max_chars=512).check("a" * 512, 0.0).ok


def test_a_flood_is_rate_limited_and_the_gate_recovers():
    gate = InstructionGate(rate_per_s=2.0, burst=4)
    # 1,000 distinct instructions within one second
    verdicts = [gate.check(f"push the block {i}", i / 1000) for i in range(1000)]
    accepted = sum(v.ok for v in verdicts)
    assert 4 <= accepted <= 6  # the burst plus what one second refills
    assert all("rate limited" in v.reason for v in verdicts if not v.ok)
    assert gate.check("open the drawer", 5.0).ok  # seconds later it accepts again


def test_concurrent_callbacks_accept_no_more_than_the_bucket_holds():
    gate = InstructionGate(rate_per_s=1.0, burst=3)
    results = []

    def flood(k):
        for i in range(200):
            results.append(gate.check(f"task {k} {i}", 0.0).ok)

    threads = [threading.Thread(target=flood, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 3 and gate.n_accepted == 3


@pytest.mark.parametrize("kwargs", [{"max_chars": 0}, {"rate_per_s": 0}, {"rate_per_s": float("nan")},
                                    {"burst": 0}])
def test_settings_are_validated(kwargs):
    with pytest.raises(ValueError):
        InstructionGate(**kwargs)
