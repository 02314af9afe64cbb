"""The clients people point at a local model, each against one real server on the small model:
LangChain, litellm, the `llm` CLI and the Vercel AI SDK (from npm, with the machine's Node.js).
Each uses the features it exists for: structured output, tools, streaming, the Responses API.
(The `openai` client's own tests are in test_openai_clients.py and test_tools.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from tests.helpers import ServerProcess, launch_server

pytestmark = pytest.mark.slow

AI_SDK = Path(__file__).parent / "clients" / "ai-sdk"
ASK_WEATHER = "What is the weather in Paris?"
CITY_PARAMETERS = {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 40}}}


class Colour(pydantic.BaseModel):
    colour: str = pydantic.Field(max_length=16)
    count: int = pydantic.Field(ge=0, le=99)


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    started = launch_server(tmp_path_factory.mktemp("server"), model_path,
                            model={"embedding_pooling": "mean"})
    started.wait_ready()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def model_id(server: ServerProcess) -> str:
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused") as client:
        return client.models.list().data[0].id


def test_langchain_chat_model_structured_output_tools_streaming_and_responses(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    @tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        return "sunny"

    chat = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="appliance",
                      temperature=0, max_tokens=96, max_retries=0)
    assert chat.invoke("Name a colour.").content
    assert len(list(chat.stream("Name a colour."))) > 2
    # Its default method is json_schema (response_format); json_mode asks for any object.
    for method in ("json_schema", "json_mode"):
        answer = chat.with_structured_output(Colour, method=method).invoke(
            "Give a colour and a count as JSON with the keys colour and count.")
        assert isinstance(answer, Colour)
    [call] = chat.bind_tools([get_weather], tool_choice="get_weather",
                             parallel_tool_calls=False).invoke(
        ASK_WEATHER).tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    responses = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="appliance",
                           temperature=0, max_tokens=16, max_retries=0, use_responses_api=True)
    assert responses.invoke("Name a colour.").text
    # Without the length check it sends text, not tiktoken's ids (which fetch a vocabulary).
    embeddings = OpenAIEmbeddings(base_url=server.url + "/v1", api_key="unused",
                                  model="appliance", check_embedding_ctx_length=False,
                                  max_retries=0)
    vectors = embeddings.embed_documents(["a cat", "a kitten"])
    assert len(vectors) == 2 and len(vectors[0]) == len(embeddings.embed_query("a dog"))


def test_langchain_completions_llm_with_its_defaults(server):
    """It sends `logprobs: null`, a list `prompt` and its other defaults on every call."""
    from langchain_openai import OpenAI

    llm = OpenAI(base_url=server.url + "/v1", api_key="unused", model="appliance",
                 max_tokens=8, max_retries=0)
    assert llm.invoke("The sky is").strip()
    assert len(list(llm.stream("The sky is"))) > 1


def test_litellm_completion_structured_output_tools_and_text(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # it fetches the map otherwise
    import litellm

    options = {"model": "openai/appliance", "api_base": server.url + "/v1",
               "api_key": "unused", "temperature": 0, "max_tokens": 96, "num_retries": 0}
    ask = [{"role": "user", "content": "Give a colour and a count."}]
    assert litellm.completion(messages=ask, **options).choices[0].message.content
    structured = litellm.completion(messages=ask, response_format=Colour, **options)
    Colour.model_validate_json(structured.choices[0].message.content)
    assert sum(1 for _ in litellm.completion(messages=ask, stream=True, **options)) > 2
    called = litellm.completion(
        messages=[{"role": "user", "content": ASK_WEATHER}], tool_choice="required",
        parallel_tool_calls=False,
        tools=[{"type": "function", "function": {"name": "get_weather",
                                                 "parameters": CITY_PARAMETERS}}], **options)
    [call] = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"]
    assert litellm.text_completion(prompt="The sky is", **options).choices[0].text
    embedded = litellm.embedding(model="openai/appliance", api_base=server.url + "/v1",
                                 api_key="unused", input=["a cat", "a kitten"])
    assert len(embedded.data) == 2 and len(embedded.data[0]["embedding"]) > 100


@pytest.fixture
def llm_cli(server, model_id, tmp_path):
    """The `llm` CLI with the appliance as an OpenAI-compatible model (its documented way)."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: appliance\n  model_name: {model_id}\n  api_base: {server.url}/v1\n"
        "  api_key_name: appliance\n  supports_schema: true\n  supports_tools: true\n")
    (tmp_path / "keys.json").write_text('{"appliance": "unused"}')
    llm = Path(sys.executable).with_name("llm")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(llm), "-m", "appliance", "-o", "temperature", "0", *args],
                              capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "LLM_USER_PATH": str(tmp_path)})

    return run


def test_llm_cli_prompt_schema_and_tools(llm_cli):
    plain = llm_cli("-o", "max_tokens", "16", "Name a colour.")
    assert plain.returncode == 0 and plain.stdout.strip(), plain.stderr
    schema = llm_cli("--schema", "colour, count int", "Give a colour and a count.")
    assert schema.returncode == 0, schema.stderr
    answer = json.loads(schema.stdout)
    assert isinstance(answer["colour"], str) and isinstance(answer["count"], int)
    # A tool offered (llm's own llm_time): the request is taken; whether to call is the model's.
    tools = llm_cli("-o", "max_tokens", "32", "-T", "llm_time", "What time is it?")
    assert tools.returncode == 0 and tools.stdout.strip(), tools.stderr


@pytest.fixture(scope="module")
def ai_sdk() -> Path:
    """The AI SDK installed from npm as its lock file pins it (`npm ci`)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("the AI SDK test needs Node.js and npm (scripts/install-debian-packages)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=AI_SDK,
                   check=True, timeout=600)
    return AI_SDK


def test_vercel_ai_sdk_generates_text_objects_and_tool_calls(ai_sdk, server, model_id):
    """Its openai-compatible provider (chat completions) and its default OpenAI provider
    (the Responses API): generateText, streamText, generateObject with a zod schema, and a
    required tool call."""
    run = subprocess.run(["node", "check.mjs", server.url + "/v1", model_id], cwd=ai_sdk,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    for provider in ("compatible", "responses"):
        result = results[provider]
        assert result["text"] and result["streamedText"] == result["text"]
        assert result["streamedChunks"] > 2
        Colour.model_validate(result["object"])
        assert result["toolCalls"]  # several if the model goes on: each must be valid
        for call in result["toolCalls"]:
            assert call["name"] == "get_weather" and isinstance(call["input"]["city"], str)
