"""Tiny randomly initialised vision-language checkpoints (LLaVA, Idefics3 = SmolVLM's architecture) built by
planners/reasoner_model.py with a BPE tokenizer trained here, saved as a hub folder would be: what the real loading
code (AutoProcessor / AutoModelForImageTextToText.from_pretrained) reads in the tests."""

from __future__ import annotations

from pathlib import Path

from planners.reasoner_model import TinyVLMConfig, build_idefics3, build_llava, build_tokenizer

CORPUS = ["TASK: open the drawer. PLAN: 1. open the drawer. VISIBLE OBJECTS: drawer handle [12, 90, 40, 104] "
          "SUBTASK REASONING: the drawer is closed. SUBTASK: open the drawer. MOVE REASONING: the handle is left. "
          "MOVE: move left. GRIPPER POSITION: [120, 80, 110, 88]", "What action should the robot take to open the drawer?"]
TINY = TinyVLMConfig(image_size=32, patch_size=16, vision_width=16, vision_layers=1, text_width=32, text_layers=1,
                     heads=2, vocab_size=320)


def tiny_llava(folder: Path) -> Path:
    return build_llava(build_tokenizer(CORPUS, TINY.vocab_size), TINY, folder)


def tiny_idefics3(folder: Path) -> Path:
    extra = ("<end_of_utterance>", "<fake_token_around_image>", "<global-img>")
    return build_idefics3(build_tokenizer(CORPUS, TINY.vocab_size, extra), TINY, folder)
