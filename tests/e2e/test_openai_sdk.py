"""The official OpenAI SDK, unmodified, against real `hunyuan-service` processes."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from tests.images import data_uri, png_bytes
from tests.service_process import ServiceProcess, tiny_env

pytestmark = pytest.mark.slow
KEY = "test-key-123"


def sdk(service: ServiceProcess, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def flux_service(tiny_cache: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_env(tiny_cache, API_KEY=KEY, MAX_QUEUE_SIZE="1")) as service:
        yield service


@pytest.fixture(scope="module")
def qwen_service(tiny_cache: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_env(tiny_cache, MODEL_TYPE="image2text", API_KEY=KEY)) as service:
        yield service


def test_images_generate_decodes_to_the_requested_size(flux_service: ServiceProcess) -> None:
    client = sdk(flux_service)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="model"):
        client.models.retrieve("dall-e-3")
    result = client.images.generate(
        model="tiny", prompt="a red fox", size="128x64", n=2, extra_body={"seed": 11}
    )
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [(i.format, i.size) for i in images] == [("PNG", (128, 64))] * 2
    assert images[0].tobytes() != images[1].tobytes()  # seeds 11 and 12


def test_auto_and_opaque_ask_for_what_is_made_without_them(flux_service: ServiceProcess) -> None:
    # OpenAI's "auto", the SDK's default for its newer image models.
    client = sdk(flux_service)
    result = client.images.generate(model="tiny", prompt="a red fox", size="auto")
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (1024, 1024)
    edited = client.images.edit(
        model="tiny", image=png_file(Image.new("RGB", (96, 64))), prompt="a fox", size="auto"
    )
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).size == (96, 64)
    # FLUX's images are opaque: asking for that, or for what the model picks, is no refusal.
    for background in ("auto", "opaque"):
        result = client.images.generate(prompt="x", size="64x64", background=background)
        assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).mode == "RGB"
    with pytest.raises(openai.BadRequestError, match="background"):
        client.images.generate(prompt="x", size="64x64", background="transparent")


def test_images_refusals_raise_the_sdk_exceptions(flux_service: ServiceProcess) -> None:
    client = sdk(flux_service)
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="x", size="100x100")
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="x", size="64x64", response_format="url")
    with pytest.raises(openai.NotFoundError, match="/v1/images/generations"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="model"):
        client.images.generate(model="dall-e-3", prompt="x", size="64x64")


def png_file(image: Image.Image) -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return ("image.png", buffer.getvalue(), "image/png")


def test_images_edit_without_and_with_a_mask(flux_service: ServiceProcess) -> None:
    import numpy as np

    client = sdk(flux_service)
    rng = np.random.default_rng(7)
    source = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    reworked = client.images.edit(
        model="tiny", image=png_file(source), prompt="a red fox", n=2, extra_body={"seed": 3}
    )
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in reworked.data]
    assert [i.size for i in images] == [(96, 64)] * 2  # the image's size, none asked
    assert images[0].tobytes() != images[1].tobytes()  # seeds 3 and 4
    # OpenAI's mask: the image with the part to repaint made transparent (the left half).
    mask = source.convert("RGBA")
    alpha = np.full((64, 96), 255, dtype=np.uint8)
    alpha[:, :48] = 0
    mask.putalpha(Image.fromarray(alpha))
    painted = client.images.edit(
        image=png_file(source), mask=png_file(mask), prompt="a red fox", size="96x64"
    )
    result = np.asarray(Image.open(io.BytesIO(base64.b64decode(painted.data[0].b64_json))))
    assert np.array_equal(result[:, 48:], np.asarray(source)[:, 48:])
    assert not np.array_equal(result[:, :48], np.asarray(source)[:, :48])
    with pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(image=png_file(source), mask=png_file(mask.crop((0, 0, 32, 32))),
                           prompt="x")  # fmt: skip


def test_wrong_key_raises_authentication_error(flux_service: ServiceProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(flux_service, key="wrong").images.generate(prompt="x", size="64x64")
    assert httpx.get(f"{flux_service.url}/health").status_code == 200  # probes stay open


def wait_for(service: ServiceProcess, key: str, value: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{service.url}/health").json()[key] != value:
        assert time.monotonic() < deadline, f"/health never showed {key}={value}"
        time.sleep(0.02)


def test_overflow_surfaces_as_the_sdk_503_error(flux_service: ServiceProcess) -> None:
    # About 4 s per job on the development machines: one runs, one waits, the queue is full.
    slow = {"prompt": "slow", "width": 1024, "height": 1024, "num_inference_steps": 30}
    headers = {"Authorization": f"Bearer {KEY}"}
    threads = [
        threading.Thread(
            target=httpx.post,
            args=(f"{flux_service.url}/infer",),
            kwargs={"json": slow, "headers": headers, "timeout": 120},
        )
        for _ in range(2)
    ]
    threads[0].start()
    wait_for(flux_service, "busy", True)
    threads[1].start()
    wait_for(flux_service, "queue_depth", 1)
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(flux_service).images.generate(prompt="x", size="64x64")
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1
    for thread in threads:
        thread.join()


def chat_messages() -> list[dict]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": data_uri(png_bytes())}},
            ],
        },
    ]


def test_chat_with_an_image_non_streamed(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    completion = client.chat.completions.create(
        model="tiny", messages=chat_messages(), max_tokens=6
    )
    assert completion.object == "chat.completion"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 6
    text_only = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6
    )
    assert completion.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image counted


def test_chat_choices_with_their_seeds(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    hello = [{"role": "user", "content": "hi"}]
    both = client.chat.completions.create(
        model="tiny", messages=hello, n=2, temperature=1.0, seed=5, max_tokens=6
    )
    assert [choice.index for choice in both.choices] == [0, 1]
    second = client.chat.completions.create(
        model="tiny", messages=hello, temperature=1.0, seed=6, max_tokens=6
    )
    assert both.choices[1].message.content == second.choices[0].message.content


def test_chat_with_an_image_streamed_with_usage(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=chat_messages(),
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    same = client.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=6)
    assert streamed == same.choices[0].message.content  # greedy: the same text either way


class Forecast(BaseModel):
    """A tool's arguments, as an app declares them with pydantic (bounded: random weights never
    end a free string or number by choice)."""

    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


def test_chat_tool_calls_parsed_streamed_and_answered(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    tool = openai.pydantic_function_tool(Forecast)  # strict, as apps send it
    messages: list = [{"role": "user", "content": "Forecast for Oslo?"}]
    parsed = client.chat.completions.parse(
        model="tiny", messages=messages, tools=[tool], tool_choice="required", max_tokens=300
    )
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls
    assert all(isinstance(c.function.parsed_arguments, Forecast) for c in calls)
    with client.chat.completions.stream(
        model="tiny", messages=messages, tools=[tool], tool_choice="required", max_tokens=300
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.parsed_arguments for e in done] == [c.function.parsed_arguments for c in calls]
    assert final.choices[0].message.tool_calls[0].function.name == "Forecast"
    # The app runs the tool and sends the result back, as the SDK's types have it.
    messages.append(choice.message.model_dump(exclude_none=True, exclude={"parsed"}))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "-3 C"})
    answer = client.chat.completions.create(
        model="tiny", messages=messages, tools=[tool], tool_choice="none", max_tokens=6
    )
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].message.tool_calls is None


def test_responses_function_calls_parsed_streamed_and_answered(
    qwen_service: ServiceProcess,
) -> None:
    client = sdk(qwen_service)
    tool = openai.pydantic_function_tool(Forecast)
    question: list = [{"role": "user", "content": "Forecast for Oslo?"}]
    parsed = client.responses.parse(
        model="tiny", input=question, tools=[tool], tool_choice="required", max_output_tokens=300
    )
    calls = [item for item in parsed.output if item.type == "function_call"]
    assert calls
    assert all(isinstance(call.parsed_arguments, Forecast) for call in calls)
    with client.responses.stream(
        model="tiny", input=question, tools=[tool], tool_choice="required", max_output_tokens=300
    ) as stream:
        done = [e for e in stream if e.type == "response.function_call_arguments.done"]
        final = stream.get_final_response()
    assert [e.arguments for e in done] == [call.arguments for call in calls]
    assert [item.type for item in final.output] == ["function_call"] * len(calls)
    # The app runs the tool and sends the calls and their results back, as the Agents SDK does.
    follow_up = question + [item.model_dump(exclude={"parsed_arguments"}) for item in calls]
    for call in calls:
        follow_up.append(
            {"type": "function_call_output", "call_id": call.call_id, "output": "-3 C"}
        )
    # `parse` turned the pydantic tool into this API's flat shape; `create` takes it as it is.
    flat = {"type": "function", "strict": True, **tool["function"]}
    answer = client.responses.create(
        model="tiny", input=follow_up, tools=[flat], tool_choice="none", max_output_tokens=6
    )
    assert isinstance(answer.output_text, str)
    assert [item.type for item in answer.output] == ["message"]


def response_input() -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this image?"},
                {"type": "input_image", "image_url": data_uri(png_bytes()), "detail": "auto"},
            ],
        }
    ]


def test_responses_create_and_stream_with_an_image(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    asked = {"model": "tiny", "instructions": "Answer briefly.", "input": response_input()}
    response = client.responses.create(**asked, max_output_tokens=6)
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.usage is not None
    assert 1 <= response.usage.output_tokens <= 6
    chat = client.chat.completions.create(model="tiny", messages=chat_messages(), max_tokens=6)
    assert response.output_text == chat.choices[0].message.content  # the same, greedy
    # The stream, raw, then through the SDK's helper that rebuilds the response from it.
    events = list(client.responses.create(**asked, max_output_tokens=6, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == response.output_text
    assert events[-1].type == f"response.{response.status}"
    with client.responses.stream(**asked, max_output_tokens=40) as stream:
        final = stream.get_final_response()  # needs response.completed: the answer ends
    assert final.status == "completed"
    assert final.output_text == client.responses.create(**asked, max_output_tokens=40).output_text
    # The conversation goes on by sending the answer back, as the SDK's docs do.
    follow_up = [*response_input(), *[item.model_dump() for item in final.output]]
    follow_up.append({"role": "user", "content": "And its colour?"})
    again = client.responses.create(model="tiny", input=follow_up, max_output_tokens=4)
    assert again.usage is not None
    assert again.usage.input_tokens > final.usage.input_tokens


class Colour(BaseModel):
    colour: Literal["red", "green", "blue"]
    shade: int = Field(ge=0, le=9)


def test_responses_parse_returns_the_pydantic_model(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    for seed in (1, 2):
        response = client.responses.parse(
            model="tiny",
            input=response_input(),
            max_output_tokens=200,
            temperature=1.0,
            text_format=Colour,
            extra_body={"seed": seed},
        )
        assert isinstance(response.output_parsed, Colour)


def test_responses_refusals(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="'function'"):
        client.responses.create(model="tiny", input="hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.NotFoundError, match="model"):
        client.responses.create(model="gpt-5", input="hi")


def test_chat_refusals(qwen_service: ServiceProcess) -> None:
    client = sdk(qwen_service)
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="from 1 to 8"):
        client.chat.completions.create(model="tiny", messages=hello, n=9)
    with pytest.raises(openai.BadRequestError, match="send tools"):
        client.chat.completions.create(model="tiny", messages=hello, functions=[{"name": "f"}])
    with pytest.raises(openai.BadRequestError, match="not among tools"):
        client.chat.completions.create(
            model="tiny",
            messages=hello,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        )
    with pytest.raises(openai.PermissionDeniedError, match="ALLOWED_MEDIA_DOMAINS"):
        client.chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}
                    ],
                }
            ],
        )
    with pytest.raises(openai.AuthenticationError):
        sdk(qwen_service, key="nope").chat.completions.create(model="tiny", messages=hello)
