"""The architecture of ghil's small reasoner: a tokenizer trained here with ``tokenizers`` and a tiny transformers
vision-language model (LLaVA's: a CLIP vision tower, a projector, a Llama decoder; or Idefics3's, SmolVLM's), built
from config dataclasses at any size and saved as a hub folder, so the reasoner loads through the same
``AutoProcessor`` / ``AutoModelForImageTextToText`` path as any hub VLM (``planners.vlm_backend.TransformersVLM``).

Usage::

    tokenizer = build_tokenizer(texts)                                    # BPE over ECoT targets and instructions
    folder = build_llava(tokenizer, TinyVLMConfig(), "runs/reasoner/init")
    backend = TransformersVLM(str(folder), local_files_only=True)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TinyVLMConfig", "build_tokenizer", "build_llava", "build_llava_model", "build_idefics3", "ReasonerLM",
           "SPECIAL_TOKENS", "REASONER_FILE"]

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
REASONER_FILE = "ghil_reasoner.json"  # beside a trained reasoner's hub files: its subtask vocabulary and provenance
# Pre-tokenisation: words, and numbers *with* their box / list punctuation (" [62," is one piece), so a pixel
# coordinate costs one decoder step instead of two or three (ECoT targets are mostly coordinates).
_PIECES = r" ?\[?\d+\]?,?| ?[A-Za-z]+| ?[^\sA-Za-z\d]+|\s+"
_LLAVA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                   "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                   "{% else %}ASSISTANT: {{ m['content'] }}{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass(frozen=True)
class TinyVLMConfig:
    """Sizes of the small reasoner (the defaults: ~1 M parameters, a few MB of float32)."""

    image_size: int = 64  # the vision tower's input (the static camera is resized to it)
    patch_size: int = 16  # (64 / 16)^2 = 16 image tokens
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 128
    text_layers: int = 2
    heads: int = 4
    max_positions: int = 1024
    vocab_size: int = 1024  # of the BPE tokenizer


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024, extra_special: tuple[str, ...] = ()):
    """A byte-level BPE trained on ``texts`` (ECoT targets and instructions), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Regex

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[*SPECIAL_TOKENS, *extra_special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def build_llava(tokenizer, config: TinyVLMConfig, folder: str | Path, seed: int = 0) -> Path:
    """A randomly initialised LLaVA-architecture VLM of ``config``'s size with its processor, saved in ``folder``."""
    model, processor = build_llava_model(tokenizer, config, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_llava_model(tokenizer, config: TinyVLMConfig, seed: int = 0):
    """``(LlavaForConditionalGeneration, LlavaProcessor)``: randomly initialised at ``config``'s size (seeded)."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    torch.manual_seed(seed)
    c = config
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": c.image_size},
                                           crop_size={"height": c.image_size, "width": c.image_size}),
        tokenizer=tokenizer, patch_size=c.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    model_config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=c.vision_width, intermediate_size=2 * c.vision_width,
                                       num_hidden_layers=c.vision_layers, num_attention_heads=c.heads,
                                       image_size=c.image_size, patch_size=c.patch_size,
                                       projection_dim=c.vision_width),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=c.text_width,
                                intermediate_size=2 * c.text_width, num_hidden_layers=c.text_layers,
                                num_attention_heads=c.heads, num_key_value_heads=c.heads,
                                max_position_embeddings=c.max_positions, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    return LlavaForConditionalGeneration(model_config), processor


def build_idefics3(tokenizer, config: TinyVLMConfig, folder: str | Path, seed: int = 0) -> Path:
    """The same at Idefics3's (SmolVLM's) architecture; ``tokenizer`` needs its image tokens (``extra_special``:
    ``<end_of_utterance>``, ``<fake_token_around_image>``, ``<global-img>``)."""
    import torch
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    torch.manual_seed(seed)
    c = config
    template = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %} "
                "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_utterance>", "<image>",
                                                                "<fake_token_around_image>", "<global-img>"]})
    tokens_per_side = c.image_size // c.patch_size // 2  # scale_factor 2 pixel shuffle
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": c.image_size},
                                               max_image_size={"longest_edge": c.image_size}),
        tokenizer=tokenizer, image_seq_len=tokens_per_side ** 2, chat_template=template)
    model_config = Idefics3Config(
        vision_config=dict(hidden_size=c.vision_width, intermediate_size=2 * c.vision_width,
                           num_hidden_layers=c.vision_layers, num_attention_heads=c.heads, image_size=c.image_size,
                           patch_size=c.patch_size),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=c.text_width,
                         intermediate_size=2 * c.text_width, num_hidden_layers=c.text_layers,
                         num_attention_heads=c.heads, num_key_value_heads=c.heads,
                         max_position_embeddings=c.max_positions),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2)
    folder = Path(folder)
    Idefics3ForConditionalGeneration(model_config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


try:  # the wrapper is an nn.Module; the module itself imports without torch (configs, tokenizer helpers)
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - torch is a core dependency
    nn = None


class ReasonerLM(nn.Module):
    """A hub vision-language model as a ghil ``Learnable`` (``ghil train recipe=reasoner``): next-token
    cross-entropy on the answer tokens only (``labels`` -100 on the prompt, the image tokens and padding).

    ``save_pretrained`` writes a plain transformers folder (the model, its processor and tokenizer) plus
    ``ghil_reasoner.json`` (``info``: the subtask vocabulary, the reasoner settings, provenance), so the trained
    reasoner loads through ``AutoModelForImageTextToText`` like any hub VLM (``planners.vlm_backend.TransformersVLM``).
    The trainer's EMA is not used (``train.ema_decay=null``): the shipped weights are the trained ones.
    """

    def __init__(self, model, processor, info: dict | None = None):
        super().__init__()
        self.vlm = model
        self.processor = processor
        self.info = dict(info or {})

    def forward(self, batch):
        return self.vlm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], labels=batch["labels"])

    def loss(self, batch):
        out = self(batch)
        with torch.no_grad():
            mask = batch["labels"][:, 1:] != -100
            hit = (out.logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask
            accuracy = float(hit.sum()) / max(int(mask.sum()), 1)
        return out.loss, {"loss": float(out.loss.detach()), "token_accuracy": accuracy}

    def attach_ema(self, ema) -> None:
        """No EMA for the reasoner (see the class docstring)."""

    def save_pretrained(self, path) -> Path:
        import json
        import os

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vlm.save_pretrained(path)
        self.processor.save_pretrained(path)
        tmp = path / f".{REASONER_FILE}.tmp"
        tmp.write_text(json.dumps(self.info, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path / REASONER_FILE)
        return path
