"""Write a tiny random-weight checkpoint with MedMO's architecture, offline.

The folder it writes loads through exactly the code path MedMO takes (`AutoProcessor.from_pretrained`,
`AutoModelForImageTextToText.from_pretrained` on a Qwen3-VL config), so tests and demos exercise the real
runtime without the 16 GB of real weights. Its text is gibberish. With `--reply TEXT` it answers TEXT to
any prompt under greedy decoding, which is how the output parsers are tested end to end.

The shape can be chosen: `tiny` (the default, a few MB) or `8b`, MedMO-8B's exact shape, for benchmarks
on a GPU (random weights, so compute and memory traffic are the real model's).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)
from transformers.utils import logging as transformers_logging

# Qwen's special tokens, in Qwen's order, so ids and roles match what MedMO's tokenizer has.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Renders conversations the way Qwen3-VL-Instruct's template does for the messages this service sends:
# an optional system turn, user turns of images and text, and the assistant generation prompt. No default
# system prompt is inserted (Qwen3-VL dropped Qwen2.5's).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the byte-level BPE is trained on: the words this service's prompts and MedMO's answers use.
_CORPUS = [
    "Generate a detailed radiology report based on the given medical image.",
    "Detect any visible diseases or abnormalities in this X-ray image.",
    "For each detected finding, provide the disease name and bounding box coordinates in pixel values.",
    "Findings: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "Impression: No acute cardiopulmonary abnormality. Fractures <box>[[156, 516, 231, 607]]</box>",
    "What abnormalities are present in this chest CT scan? Is there a nodule in the left lower lobe?",
    '[{"bbox_2d": [12, 34, 56, 78], "label": "opacity"}] Answer: yes, no, left, right, 0123456789',
]

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mrope_section=[2, 3, 3],
        ),
        "vision": dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=64,
            deepstack_visual_indexes=[0, 1],
        ),
        "vocab_size": None,  # the tokenizer's own size
    },
    # Qwen3-VL-8B-Instruct, which MedMO-8B(-Next) fine-tunes.
    "8b": {
        "text": dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            mrope_section=[24, 20, 20],
        ),
        "vision": dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        "vocab_size": 151936,
    },
}


def build_tokenizer(reply: str | None = None) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=262144,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if reply is not None:
        # One token for the whole reply: decoding it gives the text back byte for byte.
        tokenizer.add_tokens([AddedToken(reply, normalized=False, special=False)])
    return tokenizer


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)
    return found


def build_processor(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLProcessor:
    # Qwen3-VL's preprocessing: 16-pixel patches merged 2x2, so the model sees sides in multiples of 32.
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32},
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast, shape: str = "tiny", vocab_size: int | None = None
) -> Qwen3VLConfig:
    spec = SHAPES[shape]
    text = dict(spec["text"])
    mrope_section = text.pop("mrope_section")
    ids = {token: token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size or spec["vocab_size"] or len(tokenizer),
            max_position_embeddings=32768,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": mrope_section,
                "mrope_interleaved": True,
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            **text,
        ),
        vision_config=dict(
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            **spec["vision"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_model(
    config: Qwen3VLConfig,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.eval()
    text_config = config.get_text_config()
    model.generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=[text_config.eos_token_id, text_config.pad_token_id],
        pad_token_id=text_config.pad_token_id,
    )
    assert isinstance(model, Qwen3VLForConditionalGeneration)
    return model


@torch.no_grad()
def make_reply_only(model: Qwen3VLForConditionalGeneration, reply_id: int, end_id: int) -> None:
    """Rewire the weights so any prompt is answered with the token `reply_id`, then `end_id`.

    Zeroing every layer's attention and MLP output projection leaves each position's hidden state equal to
    its own token embedding (the residual stream), so the next token depends only on the last token.
    Embedding dimension 1 marks "any token but the reply" and dimension 0 marks "the reply"; the lm_head
    maps the first to the reply and the second to the end of the turn.
    """
    text_model = model.model.language_model
    for layer in text_model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embeddings = text_model.embed_tokens.weight
    embeddings[:, 0] = 0.0
    embeddings[:, 1] = 1.0
    embeddings[reply_id, 0] = 1.0
    embeddings[reply_id, 1] = 0.0
    lm_head = model.lm_head.weight
    lm_head.zero_()
    lm_head[reply_id, 1] = 100.0
    lm_head[end_id, 0] = 100.0


def write_checkpoint(
    path: Path, *, reply: str | None = None, shape: str = "tiny", seed: int = 0, vocab_size: int | None = None
) -> Path:
    """Write a loadable checkpoint folder and return its path. `vocab_size` widens the embeddings past the
    tokenizer's (as Qwen's 151,936 rows do): weights of tens of MB, for a download seen in flight."""
    tokenizer = build_tokenizer(reply)
    processor = build_processor(tokenizer)
    model = build_model(build_config(tokenizer, shape, vocab_size), seed=seed)
    if reply is not None:
        make_reply_only(
            model,
            reply_id=token_id(tokenizer, reply),
            end_id=token_id(tokenizer, "<|im_end|>"),
        )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="medmo-tiny-checkpoint",
        description="Write a tiny random-weight checkpoint with MedMO's architecture (offline).",
    )
    parser.add_argument("path", type=Path, help="folder to write")
    parser.add_argument("--reply", help="make the checkpoint answer exactly this text to any prompt")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model size (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()
    write_checkpoint(args.path, reply=args.reply, shape=args.shape, seed=args.seed)
    print(f"wrote {args.shape} checkpoint to {args.path}")


if __name__ == "__main__":
    main()
