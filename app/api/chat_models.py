"""OpenAI's chat completion protocol as request and response models, narrowed to what MedMO does.

The request model forbids what it does not name, so a parameter this service does not implement is
refused rather than ignored; the parameters it names but can only honour at their neutral values are
listed in NEUTRAL and checked by the route.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- the request ---

_EXAMPLE_URI = "data:image/png;base64,iVBORw0KGgo..."
_UID = "chatcmpl-5d0c3a0e9b8f4c2a8f1e2b7d6c5a4f3e"


class ImageUrl(BaseModel):
    url: str = Field(
        description="A data: URI holding the image (base64 PNG, JPEG or DICOM); URLs are refused.",
        examples=[_EXAMPLE_URI],
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted; MEDMO_MAX_PIXELS decides the resolution.", examples=["auto"]
    )


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="A text part.", examples=["text"])
    text: str = Field(description="The text.", examples=["Is there a pleural effusion?"])


class ImagePart(BaseModel):
    type: Literal["image_url"] = Field(description="An image part.", examples=["image_url"])
    image_url: ImageUrl = Field(description="The image.", examples=[{"url": _EXAMPLE_URI}])


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who speaks; developer counts as system.", examples=["user"]
    )
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] = Field(
        description="Text, or text and image parts.",
        examples=[
            [{"type": "image_url", "image_url": {"url": _EXAMPLE_URI}}, {"type": "text", "text": "Effusion?"}]
        ],
    )
    name: str | None = Field(None, description="Accepted.", examples=["radiologist"])


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="A last chunk with the token counts.", examples=[True])


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Decoding is greedy: temperature 0 (or none), top_p 1, n 1."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="The served model's id, as /v1/models lists it.", examples=["MBZUAI/MedMO-8B-Next"]
    )
    messages: list[Message] = Field(
        min_length=1,
        description="The conversation: system, user and earlier assistant messages; images (up to the server's "
        "MEDMO_MAX_IMAGES, see /info) in user messages, or none.",
        examples=[[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _EXAMPLE_URI}}]}]],
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens to generate: an upper bound, lowered to the server's chat limit "
        "(MEDMO_CHAT_MAX_NEW_TOKENS) and to what the context holds after the prompt.",
        examples=[256],
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="The same as max_tokens, OpenAI's newer name.", examples=[256]
    )
    stream: bool | None = Field(
        None, description="true: the answer as chunks, as it is written.", examples=[True]
    )
    stream_options: StreamOptions | None = Field(
        None, description="With stream.", examples=[{"include_usage": True}]
    )
    stop: str | list[str] | None = Field(
        None, description="Up to 4 sequences that end the answer; not included.", examples=[["\n\n"]]
    )
    temperature: float | None = Field(None, description="0 or absent: decoding is greedy.", examples=[0])
    top_p: float | None = Field(None, description="1 or absent.", examples=[1])
    n: int | None = Field(None, description="1 or absent.", examples=[1])
    presence_penalty: float | None = Field(None, description="0 or absent.", examples=[0])
    frequency_penalty: float | None = Field(None, description="0 or absent.", examples=[0])
    logprobs: bool | None = Field(None, description="false or absent.", examples=[False])
    seed: int | None = Field(
        None, description="Accepted: greedy decoding gives the same answer anyway.", examples=[1]
    )
    user: str | None = Field(None, description="Accepted, and never logged.", examples=["reader-17"])


# Parameters whose only values MedMO can honour are their neutral ones.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "temperature": (None, 0, 0.0),
    "top_p": (None, 1, 1.0),
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
}


# --- the answer ---


class ChatMessage(BaseModel):
    role: Literal["assistant"] = Field("assistant", description="Always assistant.", examples=["assistant"])
    content: str = Field(description="MedMO's answer.", examples=["Yes, a small left pleural effusion."])


class Choice(BaseModel):
    index: int = Field(0, description="Always 0: one answer per request.", examples=[0])
    message: ChatMessage = Field(
        description="The answer.", examples=[{"role": "assistant", "content": "Yes."}]
    )
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended its turn or wrote a stop sequence; length: max_tokens was reached.",
        examples=["stop"],
    )
    logprobs: None = Field(None, description="Not provided.", examples=[None])


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens fed to the model, image tokens included.", examples=[320])
    completion_tokens: int = Field(description="Tokens generated.", examples=[12])
    total_tokens: int = Field(description="The two together.", examples=[332])


class ChatCompletion(BaseModel):
    id: str = Field(description="Identifier of this completion.", examples=[_UID])
    object: Literal["chat.completion"] = Field(
        "chat.completion", description="The type.", examples=["chat.completion"]
    )
    created: int = Field(description="Unix time of the request.", examples=[1795000000])
    model: str = Field(description="The model that answered.", examples=["MBZUAI/MedMO-8B-Next"])
    choices: list[Choice] = Field(
        description="One answer.",
        examples=[
            [{"index": 0, "message": {"role": "assistant", "content": "Yes."}, "finish_reason": "stop"}]
        ],
    )
    usage: CompletionUsage = Field(
        description="Tokens in and out.",
        examples=[{"prompt_tokens": 320, "completion_tokens": 2, "total_tokens": 322}],
    )


class ModelCard(BaseModel):
    id: str = Field(
        description="The model's id, for the model field of requests.", examples=["MBZUAI/MedMO-8B-Next"]
    )
    object: Literal["model"] = Field("model", description="The type.", examples=["model"])
    created: int = Field(description="Unknown: 0.", examples=[0])
    owned_by: str = Field(description="Who serves it.", examples=["medmo-serve"])


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="The type.", examples=["list"])
    data: list[ModelCard] = Field(
        description="The model served.",
        examples=[
            [{"id": "MBZUAI/MedMO-8B-Next", "object": "model", "created": 0, "owned_by": "medmo-serve"}]
        ],
    )


class OpenAIErrorDetail(BaseModel):
    message: str = Field(
        description="What went wrong, for a person.", examples=["temperature: only 0 is supported"]
    )
    type: str = Field(description="OpenAI's error type.", examples=["invalid_request_error"])
    param: str | None = Field(description="The parameter at fault, when known.", examples=[None])
    code: str = Field(description="Stable machine-readable code.", examples=["unsupported_parameter"])


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail = Field(
        description="OpenAI's error shape.",
        examples=[
            {"message": "n: only 1 is supported", "type": "invalid_request_error", "param": None, "code": "x"}
        ],
    )
