"""Subgoal generator and filter quality on held-out episodes (issue 12's figures).

For N (current frame, true frame ``horizon`` steps later, instruction) pairs evenly spread over a held-out split,
each generator proposes K candidates from one batched call and the filter ranks them. Printed per generator:

* per-pixel mean absolute error (0-255) and SSIM against the true future frame, both at 64x64 (the pixel model's
  working size; token generators are measured on their preview decoder's frames), for the first candidate, the
  filter's pick, the best of K, and the "copy the current frame" baseline;
* the distance to the true future in the policy's goal-token space (what the policy steers by; pixel candidates
  are encoded by the same goal encoder), same four rows, mean distance over the copy-current mean distance;
* how often the filter picks the candidate nearest the true future in token space (chance: 1/K).

And the filter's accuracy on held-out pairs: positives and each of the paper's negative types (built in-batch
with ``build_negatives``, fixed seed).

Usage::

    python benchmarks/subgoal_quality.py --generator checkpoints/susie_tokens --filter checkpoints/ghil_glue_tokens \
        --generator runs/susie_small/checkpoints/last --n 200 --k 4 [--json]

Needs the validation split with its packed frames and token cache (``ghil pack``, ``ghil featurize``), and the
``bench`` extra (scikit-image, for SSIM).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        sys.exit("SSIM needs scikit-image: pip install -e '.[bench]'")
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def _small(frames: np.ndarray, size: int = 64) -> np.ndarray:
    from ghil.data.subgoal_dataset import resize_frames

    return np.asarray(resize_frames(np.asarray(frames), size))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", action="append", required=True, help="generator checkpoint (repeatable)")
    ap.add_argument("--filter", default="checkpoints/ghil_glue_tokens")
    ap.add_argument("--policy", default="checkpoints/dit_small", help="whose goal encoder defines token distance")
    ap.add_argument("--root", default="data/playtable_play")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--horizon", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: each generator's own)")
    ap.add_argument("--filter-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ghil.checkpoint import load_pretrained
    from ghil.data.packed import default_pack_dir
    from ghil.data.subgoal_dataset import SubgoalDataConfig, SubgoalDataset
    from ghil.data.token_subgoal_dataset import TokenSubgoalDataConfig, TokenSubgoalDataset, collate_token_subgoal
    from ghil.types import Observation
    from planners.ghil_glue_filter import KINDS, build_negatives

    policy = load_pretrained(args.policy).eval()
    filt = load_pretrained(args.filter).eval()
    filt.bind_policy(policy)
    pairs = SubgoalDataset(SubgoalDataConfig(root=args.root, split=args.split, horizon=args.horizon,
                                             image_size=200, cache=str(default_pack_dir(args.root))))
    rows = np.linspace(0, len(pairs) - 1, min(args.n, len(pairs))).astype(np.int64)
    cams = policy.config.cameras

    def observation(i: int):
        p = pairs.pair(int(i))
        frames = pairs.frames.read_frame(int(p["frame_id"]), tuple(cams), int(p["episode_row"]))
        truth = pairs._read(int(p["goal_frame_id"]), int(p["episode_row"]))
        obs = Observation(images={c: np.asarray(frames[c]) for c in cams}, proprio=np.zeros(15),
                          instruction=str(p["instruction"]), t=0)
        return obs, truth

    report: dict = {"split": args.split, "n": int(len(rows)), "k": args.k, "horizon": args.horizon, "steps": args.steps,
                    "seed": args.seed, "generators": {}}
    for path in args.generator:
        gen = load_pretrained(path).eval()
        if hasattr(gen, "bind_policy"):
            gen.bind_policy(policy)
        gen.seed(args.seed)
        acc = {key: [] for key in ("mae", "ssim", "tok")}
        picks_nearest, t0 = 0, time.perf_counter()
        for i in rows:
            obs, truth = observation(i)
            text = obs.instruction
            if hasattr(gen, "propose_tokens"):
                tokens, images = gen.propose_tokens(obs, text, args.k, n_steps=args.steps)
                tokens = torch.from_numpy(tokens)
            else:
                images = gen.propose(obs, text, args.k, n_steps=args.steps)
                tokens = filt.space.encode_goals(images)
            scores = filt.score_tokens(obs, tokens.numpy(), text)
            true_tok = filt.space.encode_goals(truth[None])[0]
            cur_tok = policy.frame_tokens(obs)["__goal__"][0]
            dist = (tokens - true_tok).flatten(1).norm(dim=-1).numpy()
            base = float((cur_tok - true_tok).norm())
            chosen, first, best = int(np.argmax(scores)), 0, int(np.argmin(dist))
            picks_nearest += int(chosen == best)
            small_truth = _small(truth)
            small = _small(images)
            current = _small(obs.images[gen.camera if hasattr(gen, "camera") else "rgb_static"])
            mae = [float(np.abs(small[j].astype(float) - small_truth).mean()) for j in range(len(small))]
            ssim = [_ssim(small[j], small_truth) for j in range(len(small))]
            acc["mae"].append([mae[first], mae[chosen], min(mae),
                               float(np.abs(current.astype(float) - small_truth).mean())])
            acc["ssim"].append([ssim[first], ssim[chosen], max(ssim), _ssim(current, small_truth)])
            acc["tok"].append([dist[first], dist[chosen], dist[best], base])
        seconds = time.perf_counter() - t0
        names = ("first", "filter_pick", "best_of_k", "copy_current")
        means = {metric: np.mean(acc[metric], axis=0) for metric in acc}
        means["tok"] = means["tok"] / means["tok"][-1]  # a share of the copy-current distance (mean over mean)
        report["generators"][path] = {
            **{metric: dict(zip(names, np.round(means[metric], 4).tolist())) for metric in acc},
            "filter_picks_nearest": round(picks_nearest / len(rows), 4), "chance": round(1 / args.k, 4),
            "seconds_per_pair": round(seconds / len(rows), 4)}

    # The filter on held-out pairs: positives and the paper's three negative types.
    val = TokenSubgoalDataset(TokenSubgoalDataConfig(root=args.root, split=args.split, horizon=(16, 23),
                                                     preview_size=0, augment=False))
    g = torch.Generator().manual_seed(args.seed)
    correct = {k: [] for k in KINDS}
    order = torch.randperm(len(val), generator=g).tolist()
    for b in range(args.filter_batches):
        idx = order[b * 256:(b + 1) * 256]
        if len(idx) < 2:
            break
        batch = collate_token_subgoal([val[i] for i in idx])
        plan = build_negatives(batch.instructions, batch.episode_rows, filt.config.negatives, tasks=batch.tasks,
                               generator=g)
        stack = torch.cat([batch.context[:, -1], batch.goal])
        logits = filt.logits(stack[plan.current], stack[plan.goal], [batch.instructions[i] for i in plan.text])
        ok = ((logits > 0).float() == plan.labels).numpy()
        for k, name in enumerate(KINDS):
            correct[name] += ok[(plan.kind == k).numpy()].tolist()
    report["filter"] = {"path": args.filter, **{f"acc_{k}": round(float(np.mean(v)), 4) for k, v in correct.items()},
                        "n_pairs": {k: len(v) for k, v in correct.items()}}
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
