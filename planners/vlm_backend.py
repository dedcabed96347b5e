"""TransformersVLM: any transformers vision-language model (by hub id or local folder) as a ``ReasoningBackend``.

Loaded with ``AutoProcessor`` / ``AutoModelForImageTextToText`` (SmolVLM / Idefics3, LLaVA, Qwen2.5-VL, PaliGemma,
...), prompted with ECoT's question and continued greedily from the forced prefix (``TASK:`` for a full reasoning,
the frozen high-level prefix in between). The prompt is the processor's chat template (user turn: the image, then
the question; the assistant turn opened and the prefix appended), or one of ECoT's released prompt styles:

* ``prompt_style="chat"`` (default): the model's own chat template;
* ``"ecot_vicuna"``: the ``Embodied-CoT/ecot-openvla-7b-bridge`` prompt (Vicuna system sentence, ``USER: ...?
  ASSISTANT: TASK:``), for checkpoints trained on it;
* ``"prismatic"``: ``In: ...?\\nOut: TASK:``.

Hub weights cannot be downloaded here, so a model that is neither cached nor a local folder raises
``ReasonerUnavailable`` naming what to do, at construction (never inside the control loop).

Usage::

    backend = TransformersVLM("HuggingFaceTB/SmolVLM-256M-Instruct")       # or a folder saved by save_pretrained
    reasoner = VLMReasoner(backend, image_size=(200, 200))
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from planners.reasoner import ReasonerUnavailable
from planners.reasoner_model import REASONER_FILE

__all__ = ["TransformersVLM", "PROMPT_STYLES", "prompt_text"]

_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
           "detailed, and polite answers to the user's questions.")
PROMPT_STYLES = ("chat", "ecot_vicuna", "prismatic")
DECODERS = ("generate", "cached_greedy")


def prompt_text(processor, style: str, prompt: str, prefix: str) -> str:
    """The full text before generation: ``prompt`` in ``style`` (the processor's chat template for ``"chat"``),
    then ``prefix``. Training (``planners.reasoner_recipe``) builds its contexts with this same function."""
    if style == "ecot_vicuna":
        return f"{_VICUNA} USER: <image>\n{prompt} ASSISTANT: {prefix}"
    if style == "prismatic":
        return f"In: <image>\n{prompt}\nOut: {prefix}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    head = processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{head} {prefix}" if not head.endswith((" ", "\n")) else f"{head}{prefix}"


class TransformersVLM:
    """See the module docstring. ``max_new_tokens`` bounds one reasoning (ECoT: ~250 tokens for all eight tags)."""

    def __init__(self, model: str, max_new_tokens: int = 256, prompt_style: str = "chat", device: str = "cpu",
                 local_files_only: bool = False, torch_dtype: str | None = None, decode: str = "generate"):
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
        self.decode = decode
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name, self.prompt_style, self.max_new_tokens = _resolve(str(model)), prompt_style, int(max_new_tokens)
        kwargs = {"local_files_only": bool(local_files_only)}
        try:
            self.processor = AutoProcessor.from_pretrained(self.name, **kwargs)
            dtype = getattr(torch, torch_dtype) if torch_dtype else None
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.name, **kwargs, **({"dtype": dtype} if dtype is not None else {})).to(device).eval()
        except (OSError, ValueError) as err:
            raise ReasonerUnavailable(
                f"cannot load the vision-language model {self.name!r}: {str(err).splitlines()[0][:200]} -- hub "
                "weights are not downloadable here: give a local folder (save_pretrained) or a cached id") from err
        self.device = device
        self._torch = torch
        # A reasoner trained by `ghil train recipe=reasoner` carries its subtask vocabulary and settings.
        info = Path(self.name) / REASONER_FILE
        self.info = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
        self.subtasks = tuple(self.info["subtasks"].values()) if "subtasks" in self.info else None
        self.force_task = bool(self.info.get("force_task", False))

    def prompt_text(self, prompt: str, prefix: str) -> str:
        """The full text before generation: the prompt in this model's style, then ``prefix``."""
        try:
            return prompt_text(self.processor, self.prompt_style, prompt, prefix)
        except (ValueError, AttributeError) as err:
            raise ReasonerUnavailable(f"{self.name!r} has no chat template: choose prompt_style='ecot_vicuna' or "
                                      f"'prismatic' ({err})") from err

    def generate(self, image: np.ndarray, prompt: str, prefix: str) -> str:
        text = self.prompt_text(prompt, prefix)
        frame = np.ascontiguousarray(image, dtype=np.uint8)
        inputs = self.processor(images=[[frame]], text=[text], return_tensors="pt").to(self.device)
        with self._torch.inference_mode():
            if self.decode == "cached_greedy":
                new = self._cached_greedy(inputs)
            else:
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
                new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new, skip_special_tokens=True)

    def _cached_greedy(self, inputs):
        """Greedy decoding as a bare loop over the model's KV cache: the same tokens as ``generate(do_sample=False)``
        (tested) without its per-step machinery, which dominates for a small model (about half the time per token
        on 2 CPU cores). For architectures whose forward needs nothing beyond ``input_ids`` and the cache after the
        prefill (LLaVA, Idefics3 / SmolVLM); models with their own position bookkeeping (Qwen2.5-VL's rope deltas)
        keep ``decode=generate``."""
        torch = self._torch
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        out = self.model(**inputs, use_cache=True)
        past, tokens = out.past_key_values, []
        for _ in range(self.max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in stop:
                break
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past,
                             use_cache=True)
            past = out.past_key_values
        return torch.tensor(tokens, dtype=torch.long)


def _resolve(model: str) -> str:
    """A local folder (``checkpoints/<name>`` finds a shipped one from any directory), else the hub id as given."""
    from ghil.paths import resolve_checkpoint

    if model.startswith(("/", ".", "~")) or model.startswith("checkpoints/"):
        try:
            return str(resolve_checkpoint(model))
        except FileNotFoundError:
            return model
    return model
