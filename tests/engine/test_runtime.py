from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from qwen_vl_utils import process_vision_info
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from app.conversation import Captioned, Conversation, Turn
from app.engine.request import GenerationOptions
from app.engine.runtime import ModelLoadError, ModelRuntime, collate
from app.imaging.errors import UnusableImageError
from app.settings import Settings
from tests.conftest import README_GROUNDING_REPLY, rgb_image

OPTIONS = GenerationOptions(max_new_tokens=12)
# Different sizes and aspect ratios, so the batch needs padding and images of different patch counts.
REQUESTS = [
    (rgb_image(96, 64, seed=1), "Is there a pleural effusion?"),
    (rgb_image(200, 120, seed=2), "Generate a detailed radiology report based on the given medical image."),
    (rgb_image(64, 160, seed=3), "Detect any visible diseases or abnormalities in this image."),
    (rgb_image(320, 320, seed=4), "What is the modality?"),
]


@pytest.fixture(scope="module")
def runtime(random_checkpoint: Path) -> ModelRuntime:
    return ModelRuntime.load(Settings(model=str(random_checkpoint)))


def reference_quick_start(checkpoint: Path, picture: Image.Image, prompt: str, runtime: ModelRuntime) -> str:
    """MedMO's README quick start, with process_vision_info(image_patch_size=16) as Qwen3-VL asks."""
    return quick_start(checkpoint, [image_part(picture, runtime), {"type": "text", "text": prompt}])


def image_part(picture: Image.Image, runtime: ModelRuntime) -> dict[str, Any]:
    return {
        "type": "image",
        "image": picture,
        "min_pixels": runtime.min_pixels,
        "max_pixels": runtime.max_pixels,
    }


def quick_start(checkpoint: Path, content: list[dict[str, Any]]) -> str:
    """The quick start's pipeline for a user turn of any content: the processor over all its images."""
    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages, image_patch_size=16)
    inputs = processor(
        text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt"
    )
    generated_ids = model.generate(**inputs, max_new_tokens=OPTIONS.max_new_tokens)
    trimmed = [out[len(inp) :] for inp, out in zip(inputs.input_ids, generated_ids, strict=True)]
    decoded = processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return str(decoded[0])


def test_loads_with_from_pretrained_on_the_cpu_in_float32(runtime: ModelRuntime) -> None:
    assert runtime.description.device == "cpu"
    assert runtime.description.dtype == "float32"
    assert runtime.description.attn_implementation == "sdpa"


def test_a_batch_returns_exactly_what_each_request_returns_alone_and_what_the_quick_start_returns(
    runtime: ModelRuntime, random_checkpoint: Path
) -> None:
    prepared = [runtime.prepare(Conversation.about(picture, prompt), OPTIONS) for picture, prompt in REQUESTS]
    together = runtime.generate(prepared)
    alone = [runtime.generate([item])[0] for item in prepared]
    assert together == alone
    assert len({result.text for result in together}) == len(REQUESTS)  # gibberish, but distinct
    for (picture, prompt), result in zip(REQUESTS, together, strict=True):
        assert result.text == reference_quick_start(random_checkpoint, picture, prompt, runtime)


def test_several_captioned_images_are_prepared_as_the_quick_start_prepares_them(
    runtime: ModelRuntime, random_checkpoint: Path
) -> None:
    pictures = [rgb_image(96, 64, seed=1), rgb_image(200, 120, seed=2), rgb_image(64, 160, seed=3)]
    conversation = Conversation.asking(
        [
            Captioned(pictures[0], "frontal"),
            Captioned(pictures[1], "prior, 2025-03-02"),
            Captioned(pictures[2]),
        ],
        "Compare the images.",
    )
    prepared = runtime.prepare(conversation, OPTIONS)
    content = [
        {"type": "text", "text": "Image 1 (frontal): "},
        image_part(pictures[0], runtime),
        {"type": "text", "text": "Image 2 (prior, 2025-03-02): "},
        image_part(pictures[1], runtime),
        {"type": "text", "text": "Image 3: "},
        image_part(pictures[2], runtime),
        {"type": "text", "text": "Compare the images."},
    ]
    assert len(prepared.model_input_sizes) == 3
    assert runtime.generate([prepared])[0].text == quick_start(random_checkpoint, content)


def test_a_text_only_conversation_is_prepared_as_the_quick_start_prepares_it(
    runtime: ModelRuntime, random_checkpoint: Path
) -> None:
    question = "Summarize: the lungs are clear; no pleural effusion."
    prepared = runtime.prepare(Conversation((Turn("user", (question,)),)), OPTIONS)
    assert prepared.model_input_sizes == ()
    assert "pixel_values" not in prepared.features
    assert runtime.generate([prepared])[0].text == quick_start(
        random_checkpoint, [{"type": "text", "text": question}]
    )


def test_a_batch_mixing_text_alone_one_image_and_several_returns_what_each_returns_alone(
    runtime: ModelRuntime,
) -> None:
    prepared = [
        runtime.prepare(Conversation((Turn("user", ("Summarize: no effusion.",)),)), OPTIONS),
        runtime.prepare(Conversation.about(rgb_image(96, 64, seed=1), "Any fracture?"), OPTIONS),
        runtime.prepare(
            Conversation.asking(
                [
                    Captioned(rgb_image(200, 120, seed=2), "frontal"),
                    Captioned(rgb_image(64, 160, seed=3), "lateral"),
                ],
                "Compare.",
            ),
            OPTIONS,
        ),
    ]
    assert runtime.generate(prepared) == [runtime.generate([item])[0] for item in prepared]


def test_images_fed_smaller_on_request(runtime: ModelRuntime) -> None:
    picture = rgb_image(1000, 800)
    (full,) = runtime.prepare(Conversation.about(picture, "q"), OPTIONS).model_input_sizes
    (shared,) = runtime.prepare(
        Conversation.about(picture, "q"), OPTIONS, max_pixels=300 * 300
    ).model_input_sizes
    assert full == (992, 800)
    assert shared[0] * shared[1] <= 300 * 300 < full[0] * full[1]


def test_model_input_size_is_the_processors_resize(runtime: ModelRuntime) -> None:
    prepared = runtime.prepare(Conversation.about(rgb_image(1000, 800), "q"), OPTIONS)
    assert prepared.model_input_size == (992, 800)
    small = runtime.prepare(Conversation.about(rgb_image(64, 48), "q"), OPTIONS)
    width, height = small.model_input_size
    assert width % 32 == 0
    assert height % 32 == 0
    assert width * height >= runtime.min_pixels


def test_token_counts(reply_checkpoint: object) -> None:
    path = reply_checkpoint(README_GROUNDING_REPLY)  # type: ignore[operator]
    runtime = ModelRuntime.load(Settings(model=str(path)))
    prepared = runtime.prepare(
        Conversation.about(rgb_image(96, 64), "Detect and localize all abnormalities in this image."), OPTIONS
    )
    (result,) = runtime.generate([prepared])
    assert result.text == README_GROUNDING_REPLY
    assert result.completion_tokens == 2  # the reply token, then the end of the turn
    assert result.prompt_tokens == prepared.features["input_ids"].shape[1]


def test_decoding_never_waits_for_a_preparation_in_progress(runtime: ModelRuntime) -> None:
    # Streamed text is decoded on the event loop: waiting there for the processor, which a preparation
    # thread holds for a whole image, would stall every stream and probe.
    token_ids = runtime.processor.tokenizer("Normal study.")["input_ids"]
    other = ThreadPoolExecutor(1)
    with runtime._processor_lock:  # a preparation in progress
        pending = other.submit(runtime.decode, token_ids)
        finished, _ = wait([pending], timeout=10)
    other.shutdown()
    assert finished, "decoding waited for the processor's lock"
    assert pending.result() == "Normal study."


def test_collate_pads_on_the_left_and_concatenates_patches(runtime: ModelRuntime) -> None:
    short, long = (
        runtime.prepare(Conversation.about(rgb_image(64, 64), p), OPTIONS)
        for p in ("a", "a much longer question here")
    )
    batch = collate([short.features, long.features], runtime.pad_token_id)
    gap = long.prompt_tokens - short.prompt_tokens
    assert gap > 0
    assert (batch["input_ids"][0, :gap] == runtime.pad_token_id).all()
    assert (batch["attention_mask"][0, :gap] == 0).all()
    assert (batch["attention_mask"][1] == 1).all()
    assert torch.equal(batch["input_ids"][0, gap:], short.features["input_ids"][0])
    assert batch["pixel_values"].shape[0] == short.features["pixel_values"].shape[0] * 2
    assert batch["image_grid_thw"].shape == (2, 3)


def test_missing_folder_is_one_sentence_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"MEDMO_MODEL='/.*' is not an existing folder"):
        ModelRuntime.load(Settings(model=str(tmp_path / "nowhere")))


def test_folder_without_a_model_says_what_failed(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"could not load model .*set MEDMO_MODEL"):
        ModelRuntime.load(Settings(model=str(tmp_path)))


def test_an_image_too_elongated_for_the_model_area_is_unusable(random_checkpoint: Path) -> None:
    runtime = ModelRuntime.load(
        Settings(model=str(random_checkpoint), min_pixels=64 * 64, max_pixels=128 * 128)
    )
    with pytest.raises(UnusableImageError, match="too elongated"):
        runtime.prepare(
            Conversation.about(rgb_image(6400, 32), "q"), OPTIONS
        )  # 200:1, inside the decoder's limit
    assert runtime.prepare(Conversation.about(rgb_image(512, 32), "q"), OPTIONS).model_input_size[1] >= 32
