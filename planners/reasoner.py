"""VLMReasoner: any text-generating vision-language backend as a ghil ``Reasoner`` (ECoT format, parsed strictly).

The backend only continues text: ``generate(image, prompt, prefix) -> str`` returns what follows ``prefix`` for the
ECoT question ``prompt`` about ``image``. The reasoner owns everything else:

* **the format**: the reply is ``prefix + continuation`` parsed by ``planners.ecot_format.parse_reasoning`` (tags in
  order, boxes and gripper pixels inside the image, SUBTASK / PLAN from the known vocabulary when one is given);
* **reuse** (ECoT's prompt freezing): a full reasoning from the forced ``TASK:`` prefix every ``full_every`` steps,
  on a new instruction, when the last one failed, and right after a full reasoning that changed the SUBTASK (the
  change is confirmed by a second look before frozen updates repeat it); in between only MOVE REASONING, MOVE and
  GRIPPER POSITION are regenerated, the previous text's high-level prefix (TASK ... SUBTASK) frozen;
* **loud failures that never reach the control loop**: a reply that does not parse is counted (``n_failures``,
  ``last_error`` holds the named problems) and the last valid reasoning stays in force; before any valid one the
  instruction itself is the subtask (what the graph does without a reasoner), flagged by ``fallback``.

Usage::

    reasoner = VLMReasoner(OpenAIChatBackend("http://localhost:8000/v1", "my-vlm"), image_size=(200, 200))
    reasoning = reasoner.reason(obs)         # obs.instruction, obs.images["rgb_static"], obs.t
    reasoning.subtask                        # conditions the generator, the filter and the policy
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from typing import Protocol, runtime_checkable

import numpy as np

from ghil.types import Observation, Reasoning
from ghil.runtime.instruction_gate import InstructionGate
from planners.ecot_format import ReasoningParseError, parse_reasoning, prefix

log = logging.getLogger(__name__)

__all__ = ["ReasoningBackend", "VLMReasoner", "OpenAIChatBackend", "ReasonerUnavailable", "ecot_prompt"]

FORCED_PREFIX = "TASK:"


def ecot_prompt(instruction: str) -> str:
    """ECoT's question (its released checkpoints were trained on it; the instruction lower-cased)."""
    return f"What action should the robot take to {instruction.strip().lower()}?"


class ReasonerUnavailable(RuntimeError):
    """The backend cannot answer (a server that is down, a model that cannot be loaded offline)."""


@runtime_checkable
class ReasoningBackend(Protocol):
    """Continues ``prefix`` (the start of the assistant's ECoT answer) for ``prompt`` about ``image`` (H, W, 3)."""

    def generate(self, image: np.ndarray, prompt: str, prefix: str) -> str: ...


class VLMReasoner:
    """See the module docstring. ``camera`` is the image the backend sees; ``image_size`` (width, height) bounds
    the pixel fields (None: that camera's frame size)."""

    def __init__(self, backend: ReasoningBackend, camera: str = "rgb_static", image_size: tuple[int, int] | None = None,
                 subtasks: Collection[str] | None = None, full_every: int = 5, backoff_calls: int = 10,
                 force_task: bool | None = None):
        if not isinstance(backend, ReasoningBackend):
            raise TypeError(f"backend must have generate(image, prompt, prefix) -> str, got {type(backend).__name__}")
        if int(full_every) < 1:
            raise ValueError(f"full_every must be >= 1, got {full_every}")
        self.backend, self.camera = backend, str(camera)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        # A trained reasoner's folder names its vocabulary and whether TASK is forced (TransformersVLM.info).
        subtasks = subtasks if subtasks is not None else getattr(backend, "subtasks", None)
        self.subtasks = None if subtasks is None else tuple(subtasks)
        self.force_task = bool(getattr(backend, "force_task", False) if force_task is None else force_task)
        self.full_every = int(full_every)
        # After the backend is unavailable (a server down), skip this many calls before asking it again, so a dead
        # endpoint costs one timeout per `backoff_calls` steps, not one per step.
        self.backoff_calls = int(backoff_calls)
        self._gate = InstructionGate()
        self.reset()

    def reset(self) -> None:
        self._last: Reasoning | None = None
        self._last_text: str | None = None
        self._instruction: str | None = None
        self._t_full: int | None = None
        self._full_subtask: str | None = None  # the SUBTASK of the last full reasoning
        self.n_full = self.n_frozen = self.n_failures = 0
        self.last_error: Exception | None = None
        self.fallback = False
        self._skip = 0
        self.latency_ms: dict[str, float] = {}

    def reason(self, obs: Observation) -> Reasoning:
        instruction, problem = self._gate.clean(obs.instruction)  # the topic's rules: text, <= 512 characters
        if instruction is None:
            raise ValueError(f"the reasoner's instruction is unusable: {problem}")
        if self.camera not in obs.images:
            raise ValueError(f"the reasoner reads camera {self.camera!r}, which the observation lacks (has "
                             f"{sorted(obs.images)})")
        image = np.asarray(obs.images[self.camera])
        size = self.image_size or (int(image.shape[1]), int(image.shape[0]))
        if instruction != self._instruction:
            self.reset()
            self._instruction = instruction
        if self._skip > 0:
            self._skip -= 1
            return self._current(instruction)
        t = int(obs.t)
        full = self._last_text is None or self._t_full is None or t - self._t_full >= self.full_every or t < self._t_full
        head = (self.task_prefix(instruction) if self.force_task else FORCED_PREFIX) if full \
            else prefix(self._last_text)
        start = time.perf_counter()
        try:
            text = head + self.backend.generate(image, ecot_prompt(instruction), head)
            reasoning = parse_reasoning(text, size, self.subtasks)
        except (ReasoningParseError, ReasonerUnavailable) as err:
            self.n_failures += 1
            self.last_error = err
            self._t_full = None  # the next step reasons in full again
            if isinstance(err, ReasonerUnavailable):
                self._skip = self.backoff_calls
            log.warning("reasoner output rejected (%s); keeping the last valid reasoning", err)
            return self._current(instruction)
        self.latency_ms["full" if full else "frozen"] = (time.perf_counter() - start) * 1000
        if full:
            changed = self._full_subtask is not None and reasoning.subtask != self._full_subtask
            self.n_full, self._full_subtask = self.n_full + 1, reasoning.subtask
            self._t_full = None if changed else t  # a changed SUBTASK: the next call reasons in full again
        else:
            self.n_frozen += 1
        self._last, self._last_text, self.fallback = reasoning, text, False
        return reasoning

    @staticmethod
    def task_prefix(instruction: str) -> str:
        """The forced head with TASK filled in (``force_task``): TASK *is* the instruction, so a small model is not
        asked to copy words it may never have seen (ECoT's models reproduce it verbatim anyway)."""
        return f"{FORCED_PREFIX} {instruction.strip().rstrip('.').strip()}."

    def _current(self, instruction: str) -> Reasoning:
        if self._last is not None:
            return self._last
        self.fallback = True
        return Reasoning(task=instruction, plan=(instruction,), subtask=instruction)


class OpenAIChatBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server, LM Studio, ...), image as a PNG
    data URL. The forced prefix is sent as the assistant's unfinished message (``continue_final_message``, vLLM's
    and llama.cpp's way to continue it); servers that ignore it are still parsed strictly."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 10.0,
                 max_tokens: int = 256, temperature: float = 0.0, extra_body: dict | None = None):
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL like http://localhost:8000/v1, got {base_url!r}")
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = str(model), api_key, float(timeout_s)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.extra_body = {"continue_final_message": True, "add_generation_prompt": False, **(extra_body or {})}

    def request_body(self, image: np.ndarray, prompt: str, prefix: str) -> dict:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": prompt}]},
                             {"role": "assistant", "content": prefix}],
                **self.extra_body}

    def generate(self, image: np.ndarray, prompt: str, prefix: str) -> str:
        data = json.dumps(self.request_body(image, prompt, prefix)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read().decode())
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise ReasonerUnavailable(f"{self.url} did not answer: {err}") from err
        except ValueError as err:
            raise ReasonerUnavailable(f"{self.url} answered with something other than JSON: {err}") from err
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ReasonerUnavailable(f"{self.url} answered without choices[0].message.content: "
                                      f"{str(payload)[:200]}") from None
        content = str(content)
        # A server that repeats the prefix (not continuing the message) is accepted too.
        return content[len(prefix):] if content.startswith(prefix) else content
