"""``ghil train recipe=reasoner``: the small default ECoT reasoner, trained from scratch on a ``ghil collect``
dataset's reasoning labels (``<split>/ecot_labels``), as a transformers LLaVA folder (``planners/reasoner_model.py``).

Each sample is one labelled frame of the static camera and an instruction built around the frame's task:

* **single** (``single_fraction``): one phrasing of the current task, drawn from the phrasings the dataset's own
  annotations use for it (``ghil collect`` draws them from the training phrasings; evaluation and held-out wordings
  are never seen);
* **composite**: 2..``max_parts`` consecutive *successful* tasks of the play episode around the frame, joined with
  ``ghil.types.COMPOSITE_SEPARATOR``. SUBTASK is the first part not yet done *at this frame*: a frame after its
  task's success (the collector's annotation window ends at the success step) already asks for the next part. The
  image alone tells the reasoner where it is in the plan, which is what long-horizon evaluation needs.

The target is ECoT's eight tags. SUBTASK and the PLAN steps are each task's **canonical wording**, the phrasing the
dataset annotates it with most often (the language the generator, filter and policy saw most), so any phrasing of a
task, seen or not, maps to words the low level knows. TASK is forced (``VLMReasoner.force_task``): the reasoner
continues from ``TASK: <instruction>.``; a ``frozen_fraction`` of samples continue from the frozen high-level prefix
instead (ECoT's prompt freezing), exactly as ``VLMReasoner`` asks at run time.

A cache beside the dataset (``<root>/reasoner_cache``, built once, resumable, rebuilt when stale) holds the frames
through the processor's image transform (float16) and the BPE tokenizer trained on the training split's texts.

Usage::

    ghil train recipe=reasoner data.root=data/playtable_play run_name=reasoner_small
    python benchmarks/reasoner_quality.py --reasoner small reasoner.backend.model=runs/reasoner_small/checkpoints/last
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ghil.data.calvin_format import DatasetError
from ghil.train import TrainingSetup, validation_split
from ghil.types import COMPOSITE_SEPARATOR
from planners.ecot_format import prefix as frozen_prefix
from planners.ecot_format import reasoning_from_label, render_reasoning
from planners.reasoner import VLMReasoner, ecot_prompt
from planners.reasoner_model import ReasonerLM, TinyVLMConfig, build_llava_model, build_tokenizer
from planners.vlm_backend import prompt_text

log = logging.getLogger(__name__)

__all__ = ["ReasonerDataConfig", "ReasonerRecipe", "ReasoningDataset", "TextSamples", "collate_reasoning", "LabelIndex"]

CACHE_VERSION = 1
IGNORE = -100  # cross-entropy's ignore index: prompt, image and padding positions
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ReasonerDataConfig:
    root: str = "data/playtable_play"
    split: str = "training"
    val_split: str | None = "validation"
    camera: str = "rgb_static"
    max_parts: int = 5  # the longest composite instruction (CALVIN chains have 5 subtasks)
    single_fraction: float = 0.4  # samples with a one-task instruction
    frozen_fraction: float = 0.3  # samples continuing from the frozen high-level prefix
    vocab_size: int = 2048  # of the BPE tokenizer
    tokenizer_samples: int = 8000  # training samples whose texts train the tokenizer
    max_frames: int | None = None  # a subset (evenly spaced) for quick runs; None: every labelled frame
    seed: int = 0
    cache: str | None = None  # default <root>/reasoner_cache

    def __post_init__(self) -> None:
        if not 1 <= self.max_parts <= 10:
            raise ValueError(f"data.max_parts must be in 1..10, got {self.max_parts}")
        for name in ("single_fraction", "frozen_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.root) / "reasoner_cache"


class LabelIndex:
    """Where every usable frame of a split sits in its play episode: its successful-task segment and whether its task
    is already done (after the success step). Frames of failed attempts are left out (their task is in no plan)."""

    def __init__(self, root: str | os.PathLike, split: str):
        from ghil.data.calvin_dataset import CalvinDataset

        self.data = CalvinDataset(root, split, keys=())
        if not self.data.labels.available:
            raise DatasetError(f"{Path(root) / split} has no ecot_labels/: collect it with `ghil collect` (labels on)")
        frame_ids, segments, done = [], [], []
        self.labels: dict[int, dict] = {}
        self.episode_segments: list[list[str]] = []  # per episode: the task names of its successful attempts
        self.segment_episode: list[tuple[int, int]] = []  # global segment -> (episode, position in the episode)
        self.phrasings: dict[str, Counter] = {}
        for row, (start, end) in enumerate(self.data.episodes):
            names: list[str] = []
            current, annotated_seen, frames = None, False, []
            try:
                rows = [self.data.label(int(f)) for f in range(int(start), int(end) + 1)]
            except KeyError as err:
                raise DatasetError(f"{Path(root) / split}: {err.args[0]}; the reasoner trains on ECoT labels "
                                   "(ecot_labels/, written by `ghil collect` with labels on)") from None

            def close() -> None:
                if current is not None and annotated_seen:
                    seg = len(self.segment_episode)
                    self.segment_episode.append((row, len(names)))
                    names.append(current)
                    for fid, is_done in frames:
                        frame_ids.append(fid)
                        segments.append(seg)
                        done.append(is_done)

            for offset, label in enumerate(rows):
                fid = int(start) + offset
                name, text = label.get("task_name"), label.get("task")
                # A new attempt: another task, or the same task annotated again after a finished one.
                if name != current or (text is not None and frames and frames[-1][1]):
                    close()
                    current, annotated_seen, frames = name, False, []
                if text is not None:
                    annotated_seen = True
                    self.phrasings.setdefault(name, Counter())[str(text)] += 1
                    frames.append((fid, False))
                elif annotated_seen:
                    frames.append((fid, True))  # after this attempt's success step
                # unannotated frames before any success of this attempt: a failed (or not yet successful) attempt
                self.labels[fid] = label
            close()
            self.episode_segments.append(names)
        self.frame_ids = np.asarray(frame_ids, np.int64)
        self.segments = np.asarray(segments, np.int64)
        self.done = np.asarray(done, bool)
        self._sizes: dict[str, tuple[int, int]] = {}

    def frame_size(self, camera: str) -> tuple[int, int]:
        """(width, height) of ``camera``'s frames (the pixel fields' bounds), read from the split's first frame."""
        if camera not in self._sizes:
            frame = self.data.read_frame(int(self.frame_ids[0]), (camera,))[camera]
            self._sizes[camera] = (int(frame.shape[1]), int(frame.shape[0]))
        return self._sizes[camera]

    def canonical(self) -> dict[str, str]:
        """task name -> its most frequent annotation in this split (ties: alphabetical)."""
        return {name: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for name, c in sorted(self.phrasings.items())}


class ReasoningDataset:
    """Samples of one split (see the module docstring); seeded per (seed, epoch, index)."""

    def __init__(self, config: ReasonerDataConfig, split: str, processor, canonical: Mapping[str, str],
                 phrasings: Mapping[str, list[str]], image_size: int, index: LabelIndex | None = None):
        self.config, self.processor = config, processor
        self.canonical, self.phrasings = dict(canonical), {k: list(v) for k, v in phrasings.items()}
        self.index = index or LabelIndex(config.root, split)
        rows = np.arange(len(self.index.frame_ids))
        if config.max_frames is not None and config.max_frames < len(rows):
            rows = np.linspace(0, len(rows) - 1, config.max_frames).round().astype(np.int64)
        self.rows = rows
        self.pixels = pixel_cache(config, split, self.index, processor, image_size)
        self.epoch = 0
        self.n_image_tokens = _count_image_tokens(processor)
        self.eos = processor.tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def example(self, i: int) -> dict[str, Any]:
        """Instruction, head (the forced prefix), target continuation, and the frame row of sample ``i``."""
        rng = np.random.default_rng((self.config.seed, self.epoch, int(i)))
        row = int(self.rows[int(i)])
        idx = self.index
        fid, seg, done = int(idx.frame_ids[row]), int(idx.segments[row]), bool(idx.done[row])
        episode, pos = idx.segment_episode[seg]
        names = idx.episode_segments[episode]
        n_max = min(self.config.max_parts, len(names))
        n = 1 if n_max == 1 or rng.random() < self.config.single_fraction else int(rng.integers(2, n_max + 1))
        first = int(rng.integers(max(0, pos - n + 1), min(pos, len(names) - n) + 1))
        parts = names[first:first + n]
        current = pos + 1 if done and pos + 1 < first + n else pos
        wording = [str(rng.choice(self.phrasings[name])) for name in parts]
        instruction = COMPOSITE_SEPARATOR.join(wording)
        label = idx.labels[fid]
        base = reasoning_from_label(label, instruction, image_size=idx.frame_size(self.config.camera))
        phase = str(label.get("subtask", "")).strip()
        reasoning = dataclasses.replace(
            base, plan=tuple(self.canonical[name] for name in parts), subtask=self.canonical[names[current]],
            subtask_reasoning=f"{current - first} of {n} done; next phase: {phase}." if phase else
            f"{current - first} of {n} done.")
        text = render_reasoning(reasoning)
        head = VLMReasoner.task_prefix(instruction)
        if rng.random() < self.config.frozen_fraction:
            head = frozen_prefix(text)
        if not text.startswith(head):
            raise DatasetError(f"frame {fid}: rendered reasoning does not start with its head {head!r}")
        return {"instruction": instruction, "head": head, "target": text[len(head):], "row": row, "text": text,
                "frame_id": fid, "tasks": list(parts), "reasoning": reasoning}

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.example(i)
        tok = self.processor.tokenizer
        context = prompt_text(self.processor, "chat", ecot_prompt(ex["instruction"]), ex["head"])
        context = context.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_image_tokens)
        context_ids = tok(context)["input_ids"]
        target_ids = tok(ex["target"], add_special_tokens=False)["input_ids"] + [self.eos]
        return {"input_ids": context_ids + target_ids, "n_context": len(context_ids),
                "pixel_values": np.asarray(self.pixels[ex["row"]], dtype=np.float32)}


def collate_reasoning(samples: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (answer tokens only) and ``pixel_values``."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n] = torch.tensor(s["input_ids"])
        labels[b, s["n_context"]:n] = ids[b, s["n_context"]:n]
        mask[b, :n] = 1
    pixels = torch.from_numpy(np.stack([s["pixel_values"] for s in samples]))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def _count_image_tokens(processor) -> int:
    frame = np.zeros((8, 8, 3), np.uint8)
    ids = processor(images=[[frame]], text=[IMAGE_TOKEN], return_tensors="np")["input_ids"][0]
    return int((ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum())


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def pixel_cache(config: ReasonerDataConfig, split: str, index: LabelIndex, processor, image_size: int) -> np.ndarray:
    """Every indexed frame through the processor's image transform, float16 (n, 3, S, S), memory-mapped. Built in
    blocks with a progress file (a killed build resumes); a cache of other frames or sizes is rebuilt."""
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    folder = config.cache_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}_{config.camera}_{image_size}.npy"
    meta_path = path.with_suffix(".json")
    want = {"version": CACHE_VERSION, "camera": config.camera, "image_size": int(image_size),
            "frames_sha256": hashlib.sha256(index.frame_ids.tobytes()).hexdigest(), "n": int(len(index.frame_ids)),
            "transform": processor.image_processor.to_dict()}
    want = json.loads(json.dumps(want, default=str))  # as stored (tuples become lists), so a valid cache is kept
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if meta is not None and {k: meta.get(k) for k in want} == want and meta.get("done") == meta["n"]:
        return np.load(path, mmap_mode="r")
    fresh = meta is None or {k: meta.get(k) for k in want} != want or not path.exists()
    shape = (len(index.frame_ids), 3, int(image_size), int(image_size))
    array = open_memmap(path, mode="w+" if fresh else "r+", dtype=np.float16, shape=shape)
    done = 0 if fresh else int(meta.get("done", 0))
    block = 512
    with tqdm(total=shape[0], initial=done, desc=f"reasoner cache {split}", unit="frame") as bar:
        for start in range(done, shape[0], block):
            ids = index.frame_ids[start:start + block]
            frames = [index.data.read_frame(int(f), (config.camera,))[config.camera] for f in ids]
            out = processor.image_processor(frames, return_tensors="np")["pixel_values"]
            array[start:start + len(ids)] = out.astype(np.float16)
            array.flush()
            meta_path.write_text(json.dumps({**want, "done": start + len(ids)}))
            bar.update(len(ids))
    del array
    return np.load(path, mmap_mode="r")


class ReasonerRecipe:
    """See the module docstring. ``model``: ``TinyVLMConfig`` fields (the vocabulary size comes from the data)."""

    def __init__(self, model: TinyVLMConfig | Mapping[str, Any], data: ReasonerDataConfig | Mapping[str, Any]):
        self.model_config = model if isinstance(model, TinyVLMConfig) else TinyVLMConfig(**dict(model))
        self.data = data if isinstance(data, ReasonerDataConfig) else ReasonerDataConfig(**dict(data))

    def tokenizer(self, index: LabelIndex, canonical: Mapping[str, str], phrasings: Mapping[str, list[str]]):
        """The BPE tokenizer of this dataset (trained once on its texts, kept in the cache; a resume reuses it)."""
        from transformers import PreTrainedTokenizerFast

        folder = self.data.cache_dir / f"tokenizer_{self.data.vocab_size}"
        if (folder / "tokenizer.json").exists():
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        probe = TextSamples(self.data, index, canonical, phrasings)
        n = min(self.data.tokenizer_samples, len(probe))
        texts = [probe.example(int(i)) for i in np.linspace(0, len(probe) - 1, n).round().astype(int)]
        corpus = [t["text"] for t in texts] + [ecot_prompt(t["instruction"]) for t in texts]
        corpus += ["USER: ASSISTANT:", *[p for ps in phrasings.values() for p in ps]]
        tokenizer = build_tokenizer(corpus, self.data.vocab_size)
        tmp = folder.with_name(folder.name + ".tmp")
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)
        return PreTrainedTokenizerFast.from_pretrained(str(folder))

    def build(self) -> TrainingSetup:
        cfg = self.data
        index = LabelIndex(cfg.root, cfg.split)
        if len(index.frame_ids) == 0:
            raise DatasetError(f"{Path(cfg.root) / cfg.split} has no frames of successful labelled tasks")
        canonical = index.canonical()
        phrasings = {name: sorted(c) for name, c in sorted(index.phrasings.items())}
        tokenizer = self.tokenizer(index, canonical, phrasings)
        model_config = dataclasses.replace(self.model_config, vocab_size=len(tokenizer))
        vlm, processor = build_llava_model(tokenizer, model_config, seed=cfg.seed)
        info = {"subtasks": canonical, "phrasings": phrasings, "force_task": True, "camera": cfg.camera,
                "prompt_style": "chat", "architecture": asdict(model_config),
                "dataset": {"root": str(cfg.root), "split": cfg.split,
                            "frames": int(len(index.frame_ids))}}
        model = ReasonerLM(vlm, processor, info)
        size = model_config.image_size
        dataset = ReasoningDataset(cfg, cfg.split, processor, canonical, phrasings, size, index)
        val = validation_split(cfg.root, cfg.val_split,
                               lambda split: ReasoningDataset(dataclasses.replace(cfg, max_frames=None), split,
                                                              processor, canonical, phrasings, size))
        pad = tokenizer.pad_token_id
        fingerprint = {"model": {"type": "reasoner_llava", "init": asdict(model_config),
                                 "tokenizer_sha256": _sha(tokenizer.backend_tokenizer.to_str())},
                       "data": {**asdict(cfg), "root": str(Path(cfg.root).resolve()), "cache": None}}
        log.info("reasoner: %d training frames, %d tasks, vocabulary %d, %.2f M parameters", len(dataset),
                 len(canonical), len(tokenizer), sum(p.numel() for p in vlm.parameters()) / 1e6)
        return TrainingSetup(model=model, dataset=dataset, collate_fn=functools.partial(collate_reasoning, pad_id=pad),
                             val_dataset=val, fingerprint=fingerprint, eval_command=self.eval_command)

    @staticmethod
    def eval_command(checkpoint: str) -> str:
        return (f"python benchmarks/reasoner_quality.py --reasoner small reasoner.backend.model={checkpoint}; "
                f"ghil eval agent=ghil_glue_reasoner agent.reasoner.backend.model={checkpoint}")


class TextSamples(ReasoningDataset):
    """Sample texts without a processor or pixels (the tokenizer is trained on them before the model exists)."""

    def __init__(self, config, index, canonical, phrasings):
        self.config, self.index = config, index
        self.canonical, self.phrasings = dict(canonical), {k: list(v) for k, v in phrasings.items()}
        self.rows = np.arange(len(index.frame_ids))
        self.epoch = 0
