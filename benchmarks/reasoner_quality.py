"""Reasoner quality on held-out playtable frames (issue 14's figures), for any reasoner config.

For N frames spread evenly over a held-out split with ECoT labels (``ghil collect`` writes them), the reasoner sees
the static camera and the frame's instruction (the split's own wording, or a held-out phrasing of the same task
with ``--heldout-phrasings``) and reasons in full; the target is ``planners.ecot_format.reasoning_from_label``.
``--composite`` builds instructions as the reasoner's training does (2-5 consecutive successful tasks of the held-out
episode around the frame, ``planners.reasoner_recipe``) and scores the decomposition: SUBTASK must name the first
part not yet done at that frame, PLAN the parts in order. Printed: parse success, SUBTASK exact match (the task the SUBTASK names, so any phrasing of the right task counts;
``--heldout-phrasings`` also requires the reasoner to map an unseen wording to a known subtask), box IoU (median over
the target's objects the reply boxes; a missing object counts 0), gripper-pixel error (median px over the points
both give), and latency per full reasoning and per frozen-prefix update (p50 / p95 ms).

Usage::

    python benchmarks/reasoner_quality.py --data data/playtable_play --n 200 \\
        reasoner.backend.base_url=http://localhost:8000/v1           # any `reasoner` config overrides
    python benchmarks/reasoner_quality.py --reasoner transformers reasoner.backend.model=/path/to/vlm --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def box_iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0 + 1) * max(0, y1 - y0 + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / float(area(a) + area(b) - inter)


def pct(values, q):
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/playtable_play")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--reasoner", default="endpoint", help="a config of ghil/configs/reasoner/")
    parser.add_argument("--heldout-phrasings", action="store_true")
    parser.add_argument("--composite", action="store_true", help="composite instructions (decomposition)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="reasoner.* overrides")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ghil.data.calvin_dataset import CalvinDataset
    from ghil.paths import CONFIG_DIR
    from ghil.types import COMPOSITE_SEPARATOR, Observation
    from planners.ecot_format import reasoning_from_label
    from sim_eval.protocol.instructions import InstructionIndex
    from sim_eval.protocol.tasks import heldout_phrasings, train_phrasings

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=[f"+reasoner@reasoner={args.reasoner}", *args.overrides])
    reasoner = instantiate(cfg.reasoner)
    data = CalvinDataset(args.data, args.split, keys=("rgb_static",))
    episodes = np.load(f"{args.data}/{args.split}/ep_start_end_ids.npy")
    ids = np.concatenate([np.arange(s, e + 1) for s, e in episodes])
    picks = ids[np.linspace(0, len(ids) - 1, args.n).astype(int)]
    index, rng = InstructionIndex(), np.random.default_rng(0)
    composite = composite_samples(args, reasoner) if args.composite else None
    if composite is not None:
        picks = [ex["frame_id"] for ex in composite]
    parsed = subtask_ok = plan_ok = 0
    ious, pixel_errors, full_ms, frozen_ms = [], [], [], []
    for k, frame_id in enumerate(picks):
        label = data.label(int(frame_id))
        image = data.read_frame(int(frame_id), ("rgb_static",))["rgb_static"]
        size = (image.shape[1], image.shape[0])
        # The frame's own wording; frames outside an annotation window (after a success, failed attempts) get a
        # training phrasing of their task.
        own = label.get("task") or str(rng.choice(train_phrasings(label["task_name"])))
        target = reasoning_from_label(label, own, image_size=size)
        instruction = str(rng.choice(heldout_phrasings(label["task_name"]))) if args.heldout_phrasings else own
        if composite is not None:
            ex = composite[k]
            target = ex["reasoning"]
            if args.heldout_phrasings:
                ex["instruction"] = COMPOSITE_SEPARATOR.join(str(rng.choice(heldout_phrasings(t))) for t in ex["tasks"])
            instruction = ex["instruction"]
        reasoner.reset()
        for step, store in ((0, full_ms), (1, frozen_ms)):
            obs = Observation(images={"rgb_static": image}, proprio=np.zeros(15, np.float32), t=step,
                              instruction=instruction)
            t0 = time.perf_counter()
            reply = reasoner.reason(obs)
            store.append((time.perf_counter() - t0) * 1000)
            if step == 0:
                ok = not getattr(reasoner, "fallback", False) and getattr(reasoner, "n_failures", 0) == 0
                parsed += ok
                if ok:
                    try:
                        if composite is not None:
                            subtask_ok += index.task_for(reply.subtask) == index.task_for(target.subtask)
                            plan_ok += [index.task_for(s) for s in reply.plan] == composite[k]["tasks"]
                        else:
                            subtask_ok += index.task_for(reply.subtask) == label["task_name"]
                    except ValueError:
                        pass
                    for name, box in target.visible_objects.items():
                        ious.append(box_iou(box, reply.visible_objects[name]) if name in reply.visible_objects
                                    else 0.0)
                    pixel_errors += [float(np.hypot(a[0] - b[0], a[1] - b[1]))
                                     for a, b in zip(target.gripper_position, reply.gripper_position)]
        print(f"{k + 1}/{len(picks)} parsed={parsed} subtask={subtask_ok}", file=sys.stderr, end="\r")
    n = len(picks)
    result = {"n": n, "split": args.split, "heldout_phrasings": args.heldout_phrasings, "reasoner": args.reasoner,
              "overrides": args.overrides, "parse_success": round(parsed / n, 4),
              "subtask_exact_match": round(subtask_ok / n, 4), "box_iou_median": pct(ious, 50),
              **({"composite": True, "plan_exact_match": round(plan_ok / n, 4)} if composite is not None else {}),
              "gripper_error_px_median": pct(pixel_errors, 50),
              "latency_ms": {"full_p50": pct(full_ms, 50), "full_p95": pct(full_ms, 95),
                             "frozen_p50": pct(frozen_ms, 50), "frozen_p95": pct(frozen_ms, 95)}}
    print(json.dumps(result, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def composite_samples(args, reasoner) -> list[dict]:
    """``args.n`` composite samples of the held-out split, built as the reasoner's training builds them (seed 0), in
    the trained reasoner's canonical wording (its folder's ``subtasks`` and ``phrasings``)."""
    import dataclasses

    from planners.reasoner_recipe import LabelIndex, ReasonerDataConfig, TextSamples

    info = getattr(getattr(reasoner, "backend", None), "info", {}) or {}
    index = LabelIndex(args.data, args.split)
    canonical = info.get("subtasks") or index.canonical()
    phrasings = info.get("phrasings") or {k: sorted(v) for k, v in index.phrasings.items()}
    config = dataclasses.replace(ReasonerDataConfig(root=args.data, split=args.split), single_fraction=0.0,
                                 frozen_fraction=0.0)
    samples = TextSamples(config, index, canonical, phrasings)
    return [samples.example(int(i)) for i in np.linspace(0, len(samples) - 1, args.n).astype(int)]


if __name__ == "__main__":
    sys.exit(main())
