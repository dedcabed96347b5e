"""The issue-10 fuzz table: inputs tried per surface, clear errors, crashes, hangs, silent garbage, data lost.

Runs the properties of ``tests/test_fuzz.py`` at their long sizes (10,000 fuzzed actions, 20,000 direct
``validate_action`` calls, 1,000 of each other input), counting every outcome instead of stopping at the first bad
one, prints the table and writes it (with the first inputs of each bad outcome) as JSON. The env runs in a worker
process: a step that does not return within the limit is killed and counted as a hang.

    python benchmarks/fuzz_report.py                              # long sizes, outputs/fuzz_report.json
    python benchmarks/fuzz_report.py --examples 200 --json /tmp/fuzz.json   # every surface 200 inputs
    python benchmarks/fuzz_report.py --surfaces env_step validate_action

Inputs are derandomized (hypothesis, a fixed seed per surface): the same command tries the same inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

COLUMNS = ("inputs", "clear_error", "ok", "crash", "hang", "silent_garbage", "data_lost")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run(surfaces: list[str], counts: dict[str, int]) -> dict:
    import test_fuzz as fz

    tally = fz.Tally()
    wall: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ghil_fuzz_") as tmp:
        tmp = Path(tmp)
        for surface in surfaces:
            start = time.perf_counter()
            n = counts[surface]
            print(f"[fuzz] {surface}: {n} inputs ...", flush=True)
            if surface == "validate_action":
                fz.run_property(surface, fz.actions, fz.check_validate_action, n, tally, strict=False)
            elif surface in ("env_step", "env_reset"):
                worker = fz.EnvWorker(fz.EXAMPLE_LIMIT_S[surface])
                try:
                    if surface == "env_step":
                        fz.run_property(surface, fz.actions, lambda a: worker.call("step", a), n, tally, strict=False)
                    else:
                        fz.run_property(surface, fz.reset_inputs(fz._base_scene()),
                                        lambda x: worker.call("reset", x), n, tally, strict=False)
                finally:
                    worker.close()
            elif surface == "policy":
                import torch

                torch.set_num_threads(1)
                fz.run_property(surface, fz.policy_inputs(), fz.make_policy_check(fz.build_policies()), n, tally,
                                strict=False)
            elif surface == "dataset":
                fx = fz.DatasetFixture(tmp / "ds")
                fz.run_property(surface, fz.dataset_damage(len(fx.frames)), fz.make_dataset_check(fx), n, tally,
                                strict=False)
            elif surface == "checkpoint":
                import torch

                torch.set_num_threads(1)
                fx = fz.CheckpointFixture(tmp / "ckpt")
                fz.run_property(surface, fz.checkpoint_damage(fx.config), fz.make_checkpoint_check(fx), n, tally,
                                strict=False)
            wall[surface] = time.perf_counter() - start
            c = tally.counts[surface]
            print(f"[fuzz] {surface}: {sum(c.values())} inputs in {wall[surface]:.1f} s: {dict(c)}", flush=True)
    rows = {}
    for surface in surfaces:
        c = tally.counts[surface]
        rows[surface] = {"inputs": sum(c.values()), **{k: c.get(k, 0) for k in COLUMNS[1:]},
                         "seconds": round(wall[surface], 1), "bad_examples": tally.examples[surface]}
    return {"commit": _git_commit(), "python": platform.python_version(), "machine": platform.machine(),
            "requested": {s: counts[s] for s in surfaces}, "surfaces": rows}


def table(report: dict) -> str:
    head = f"| surface | {' | '.join(c.replace('_', ' ') for c in COLUMNS)} | s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for surface, row in report["surfaces"].items():
        lines.append(f"| {surface} | " + " | ".join(f"{row[c]:,}" for c in COLUMNS) + f" | {row['seconds']:.0f} |")
    total = {c: sum(r[c] for r in report["surfaces"].values()) for c in COLUMNS}
    lines.append("| **all** | " + " | ".join(f"{total[c]:,}" for c in COLUMNS) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import test_fuzz as fz

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--surfaces", nargs="+", choices=fz.SURFACES, default=list(fz.SURFACES))
    parser.add_argument("--examples", type=int, default=None, help="inputs per surface (default: the long sizes)")
    parser.add_argument("--json", type=Path, default=REPO / "outputs" / "fuzz_report.json")
    args = parser.parse_args(argv)
    counts = {s: args.examples for s in fz.SURFACES} if args.examples else dict(fz.LONG_EXAMPLES)
    warnings.simplefilter("ignore")  # hypothesis' repr warnings and numpy's cast warnings on fuzzed input
    logging.getLogger("ghil").setLevel(logging.ERROR)  # "loaded unverified" warnings of configs the fuzz stripped
    report = run(args.surfaces, counts)
    print(table(report))
    for surface, row in report["surfaces"].items():
        for example in row["bad_examples"]:
            print(f"  {surface}: {example}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    bad = sum(row[c] for row in report["surfaces"].values() for c in ("crash", "hang", "silent_garbage", "data_lost"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
