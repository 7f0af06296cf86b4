"""OpenAI's chat completion protocol as request and response models, narrowed to what MedMO does.

The request model forbids what it does not name, so a parameter this service does not implement is
refused rather than ignored; the parameters it names but can only honour at their neutral values are
listed in NEUTRAL and checked by the route.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.engine.request import Priority

# Most answers (n) any server may be set to give one request (MEDMO_MAX_N's bound).
MAX_CHOICES = 16

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


class TextFormat(BaseModel):
    type: Literal["text"] = Field(description="Free text, as without response_format.", examples=["text"])


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"] = Field(description="Any JSON object.", examples=["json_object"])


class JsonSchema(BaseModel):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="The schema's name: letters, digits, _ and -, up to 64.",
        examples=["finding"],
    )
    description: str | None = Field(None, description="Accepted.", examples=["One finding."])
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description="The JSON Schema the answer is valid under (objects, arrays, enums, bounds, lengths, "
        "$ref, anyOf, formats); absent: any JSON value.",
        examples=[
            {"type": "object", "properties": {"effusion": {"type": "boolean"}}, "required": ["effusion"]}
        ],
    )
    strict: bool | None = Field(
        None, description="Accepted: the answer always follows the schema.", examples=[True]
    )


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"] = Field(description="JSON valid under a schema.", examples=["json_schema"])
    json_schema: JsonSchema = Field(
        description="The schema.",
        examples=[{"name": "finding", "schema": {"type": "object"}, "strict": True}],
    )


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Decoding is greedy unless a temperature above 0 is given."""

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
    temperature: float | None = Field(
        None,
        ge=0,
        le=2,
        description="0 to 2: sample each token from the model's probabilities sharpened (below 1) or flattened "
        "(above 1). Absent or 0: greedy decoding, the most likely token each time (unlike OpenAI's default "
        "of 1), so that an answer is the same every time unless sampling is asked for.",
        examples=[0.7],
    )
    top_p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Above 0, up to 1: when sampling, only the most likely tokens that together hold this "
        "share of the probability. 1 or absent: all.",
        examples=[0.9],
    )
    top_k: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="0 to 1000: when sampling, only the k most likely tokens. 0 or absent: no bound (an "
        "extension vLLM also takes).",
        examples=[50],
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0,
        le=2,
        description="Above 0, up to 2: a token already in the prompt or the answer is made less likely "
        "(above 1) or more likely (below 1), greedy or sampled, as transformers applies it. 1 or absent: "
        "none (an extension vLLM also takes).",
        examples=[1.1],
    )
    priority: Priority | None = Field(
        None,
        description="stat, urgent or routine (the default; the X-Priority header says the same): stat work is "
        "started before waiting urgent and routine work (an extension, as vLLM's priority).",
        examples=["stat"],
    )
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**64 - 1,
        description="Any 64-bit integer: when sampling, the same seed, parameters and request write the same "
        "answer, whatever else the server is doing. Absent: one is drawn. No effect when greedy.",
        examples=[1234],
    )
    n: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description="Answers to write, 1 to the server's MEDMO_MAX_N (4 unless set; see /info), each a "
        "choice of its own; the prompt is read once for them all. The k-th choice (from 0) is sampled with "
        "seed + k; greedy choices are all the same answer. Absent: 1.",
        examples=[1],
    )
    presence_penalty: float | None = Field(None, description="0 or absent.", examples=[0])
    frequency_penalty: float | None = Field(None, description="0 or absent.", examples=[0])
    logprobs: bool | None = Field(
        None,
        description="true: each choice's logprobs hold every token of its answer with its log-probability "
        "under the model (before temperature, penalty and response_format shape it).",
        examples=[True],
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="0 to 20, with logprobs true: also the most likely tokens at each position, with theirs.",
        examples=[5],
    )
    response_format: ResponseFormat | None = Field(
        None,
        description="json_schema: the answer is JSON valid under the schema (written compactly); "
        "json_object: any JSON object; text or absent: free text. The answer's end is where the JSON ends, "
        "unless max_tokens comes first (finish_reason length).",
        examples=[{"type": "json_schema", "json_schema": {"name": "finding", "schema": {"type": "object"}}}],
    )
    user: str | None = Field(None, description="Accepted, and never logged.", examples=["reader-17"])


# Parameters whose only values MedMO can honour are their neutral ones.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


# --- the answer ---


class ChatMessage(BaseModel):
    role: Literal["assistant"] = Field("assistant", description="Always assistant.", examples=["assistant"])
    content: str = Field(description="MedMO's answer.", examples=["Yes, a small left pleural effusion."])


class TopLogprob(BaseModel):
    token: str = Field(
        description="The token's text; a control token's own name (<|im_end|>).", examples=[" effusion"]
    )
    logprob: float = Field(
        description="Its log-probability under the model; -9999 for one too unlikely to hold.",
        examples=[-0.31],
    )
    bytes: list[int] | None = Field(
        description="Its UTF-8 bytes, which may be part of a character that the next tokens complete; null "
        "for a control token, which the answer's text does not show.",
        examples=[[32, 101, 102, 102, 117, 115, 105, 111, 110]],
    )


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(
        description="The top_logprobs most likely tokens at this position, most likely first.",
        examples=[
            [{"token": " effusion", "logprob": -0.31, "bytes": [32, 101, 102, 102, 117, 115, 105, 111, 110]}]
        ],
    )


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(
        description="One entry per token of the answer, in order: not the end of the turn, nor the tokens "
        "after a stop sequence begins.",
        examples=[[{"token": "Yes", "logprob": -0.02, "bytes": [89, 101, 115], "top_logprobs": []}]],
    )
    refusal: None = Field(None, description="Always null.", examples=[None])


class Choice(BaseModel):
    index: int = Field(0, description="Which of the n answers, from 0.", examples=[0])
    message: ChatMessage = Field(
        description="The answer.", examples=[{"role": "assistant", "content": "Yes."}]
    )
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended its turn or wrote a stop sequence; length: max_tokens was reached.",
        examples=["stop"],
    )
    logprobs: ChoiceLogprobs | None = Field(
        None,
        description="With logprobs true: the answer's tokens and their log-probabilities.",
        examples=[None],
    )


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens fed to the model, image tokens included.", examples=[320])
    completion_tokens: int = Field(description="Tokens generated, for every choice together.", examples=[12])
    total_tokens: int = Field(description="The two together.", examples=[332])


class ChatCompletion(BaseModel):
    id: str = Field(description="Identifier of this completion.", examples=[_UID])
    object: Literal["chat.completion"] = Field(
        "chat.completion", description="The type.", examples=["chat.completion"]
    )
    created: int = Field(description="Unix time of the request.", examples=[1795000000])
    model: str = Field(description="The model that answered.", examples=["MBZUAI/MedMO-8B-Next"])
    choices: list[Choice] = Field(
        description="The n answers, in the order of their index.",
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
        description="What went wrong, for a person.",
        examples=["temperature: Input should be less than or equal to 2"],
    )
    type: str = Field(description="OpenAI's error type.", examples=["invalid_request_error"])
    param: str | None = Field(description="The parameter at fault, when known.", examples=[None])
    code: str = Field(description="Stable machine-readable code.", examples=["unsupported_parameter"])


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail = Field(
        description="OpenAI's error shape.",
        examples=[
            {
                "message": "n: at most 4 on this server (MEDMO_MAX_N, within MEDMO_MAX_QUEUE)",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request",
            }
        ],
    )
