"""Tiny randomly initialised vision-language checkpoints (LLaVA, Idefics3 = SmolVLM's architecture) with their
processors and a BPE tokenizer trained here with `tokenizers`, saved as a hub folder would be: what the real loading
code (AutoProcessor / AutoModelForImageTextToText.from_pretrained) reads in the tests."""

from __future__ import annotations

from pathlib import Path

CORPUS = ["TASK: open the drawer. PLAN: 1. open the drawer. VISIBLE OBJECTS: drawer handle [12, 90, 40, 104] "
          "SUBTASK REASONING: the drawer is closed. SUBTASK: open the drawer. MOVE REASONING: the handle is left. "
          "MOVE: move left. GRIPPER POSITION: [120, 80, 110, 88]", "What action should the robot take to open the drawer?"]


def _tokenizer(specials: list[str], **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", *specials],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **named)


def tiny_llava(folder: Path) -> Path:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    hf = _tokenizer(["<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% else %}ASSISTANT: {{ m['content'] }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=hf, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=32, patch_size=16, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024),
        image_token_index=hf.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_idefics3(folder: Path) -> Path:
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    specials = ["<|endoftext|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"]
    hf = _tokenizer(specials, eos_token="<end_of_utterance>", pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    hf.add_special_tokens({"additional_special_tokens": specials[1:]})
    template = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %} "
                "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                "{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}")
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(do_image_splitting=False,
                                                                         size={"longest_edge": 32},
                                                                         max_image_size={"longest_edge": 32}),
                                  tokenizer=hf, image_seq_len=4, chat_template=template)
    config = Idefics3Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(hf), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024),
        image_token_id=hf.convert_tokens_to_ids("<image>"), scale_factor=2)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
