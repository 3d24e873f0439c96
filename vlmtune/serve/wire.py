"""The OpenAI chat-completions request body -> prompt ids, images and settings, or an ApiError naming the field.

Every field is checked; fields vlmtune does not implement (n > 1, tools, logprobs, response_format, ...) are a
400 naming them, never silently ignored. Images are data: URLs, or file:// inside --allow-local-images; the
server fetches nothing over the network.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from vlmtune.chat import with_images
from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.errors import UserError
from vlmtune.inference import Generator

ACCEPTED = {"model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
            "seed", "user", "n", "stream_options"}
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclasses.dataclass
class Limits:
    """What a request may ask for (the serve flags)."""

    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    local_images: Path | None = None  # --allow-local-images
    max_tokens: int = 2048


@dataclasses.dataclass
class Parsed:
    ids: list[int]
    images: list[Image.Image]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool


def parse(body, generator: Generator, limits: Limits) -> Parsed:
    """The request as Generator inputs; ApiError(400) naming the field for anything wrong or unsupported."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in body:
        if name not in ACCEPTED:
            raise ApiError(400, f"'{name}' is not supported by vlmtune serve", name)
    if body.get("n", 1) != 1:
        raise ApiError(400, "'n' must be 1: vlmtune serve returns one choice", "n")
    turns, system, images = _conversation(body.get("messages"), limits)
    generator = dataclasses.replace(generator, system=system) if system is not None else generator
    try:
        ids = generator.prompt_ids(turns)
    except UserError as e:
        raise ApiError(400, str(e), "messages") from None
    length = generator.expanded_length(ids)
    if length >= generator.context_length:
        raise ApiError(400, f"the prompt takes {length} tokens (images counted), the model's context is "
                       f"{generator.context_length}", "messages")
    return Parsed(ids, images, _max_tokens(body, limits), _number(body, "temperature", 0.0, 0.0, 2.0),
                  _number(body, "top_p", 1.0, 0.0, 1.0), _seed(body), _stop(body), _stream(body))


def _conversation(messages, limits: Limits) -> tuple[list[tuple[str, str | None]], str | None, list[Image.Image]]:
    """(turns ending with (user, None), system text or None, images of the first user message)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    system, images, turns, user = None, [], [], None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        role = message["role"]
        first_user = role == "user" and not turns and user is None
        text, found = _content(message.get("content"), where, limits, allow_images=first_user)
        if not first_user:  # image slots belong to the first user message only, as in chat
            text = text.replace(DEFAULT_IMAGE_TOKEN, "")
        if role == "system":
            if i:
                raise ApiError(400, f"{where}: a system message must come first", f"{where}.role")
            system = text
        elif role == "user":
            if user is not None:
                raise ApiError(400, f"{where}: two user messages in a row", f"{where}.role")
            user, images = text, (found if not turns else images)
        else:
            if user is None:
                raise ApiError(400, f"{where}: an assistant message must follow a user message", f"{where}.role")
            turns.append((user, text))
            user = None
    if user is None:
        raise ApiError(400, "the last message must be from the user", f"messages[{len(messages) - 1}].role")
    if len(images) > limits.max_images:
        raise ApiError(400, f"{len(images)} images, at most {limits.max_images} per request", "messages")
    turns.append((user, None))
    try:
        turns[0] = (with_images(turns[0][0], len(images)), turns[0][1])
    except UserError as e:
        raise ApiError(400, str(e), "messages[0].content") from None
    return turns, system, images


def _content(content, where: str, limits: Limits, allow_images: bool) -> tuple[str, list[Image.Image]]:
    """A message's text (image parts become <image> tags where they stand) and its images."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_images:
                raise ApiError(400, f"{at}: images are accepted in the first user message only", at)
            images.append(_image(part.get("image_url"), at, limits))
            texts.append(DEFAULT_IMAGE_TOKEN)
        else:
            raise ApiError(400, f"{at} must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}", at)
    return "\n".join(texts), images


def _image(value, at: str, limits: Limits) -> Image.Image:
    """A decoded RGB image from a data: URL or an allowed file:// URL; refused over the pixel limit."""
    url = value.get("url") if isinstance(value, dict) else None
    if not isinstance(url, str):
        raise ApiError(400, f"{at}.image_url.url must be a string", f"{at}.image_url.url")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        try:
            raw = base64.b64decode(data, validate=True) if head.endswith(";base64") else unquote(data).encode("latin-1")
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{at}.image_url.url: the data URL is not valid base64", f"{at}.image_url.url") from None
        source = io.BytesIO(raw)
    elif url.startswith("file://") and limits.local_images is not None:
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(limits.local_images) or not path.is_file():
            raise ApiError(400, f"{at}.image_url.url: not a file inside --allow-local-images", f"{at}.image_url.url")
        source = path
    else:
        raise ApiError(400, f"{at}.image_url.url: only data: URLs are accepted (file:// with --allow-local-images); "
                       "the server fetches nothing", f"{at}.image_url.url")
    return _decode(source, at, limits)


def _decode(source, at: str, limits: Limits) -> Image.Image:
    try:
        image = Image.open(source)
        if image.width * image.height > limits.max_image_pixels:
            raise ApiError(400, f"{at}: {image.width}x{image.height} is over --max-image-pixels "
                           f"{limits.max_image_pixels}", f"{at}.image_url.url")
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{at}.image_url.url: the image does not decode ({e})", f"{at}.image_url.url") from None


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number in [{low}, {high}]", name)
    return float(value)


def _max_tokens(body: dict, limits: Limits) -> int:
    name = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    value = body.get(name)
    if value is None:
        return limits.max_tokens
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"'{name}' must be a positive integer", name)
    if value > limits.max_tokens:  # refused, never lowered without a word
        raise ApiError(400, f"'{name}' {value} is over this server's --max-new-tokens {limits.max_tokens}", name)
    return value


def _seed(body: dict) -> int | None:
    value = body.get("seed")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, "'seed' must be an integer", "seed")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    return tuple(stops)


def _stream(body: dict) -> bool:
    value = body.get("stream", False)
    if not isinstance(value, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    return value
