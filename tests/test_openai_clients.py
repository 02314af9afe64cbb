"""The API as the OpenAI SDKs, LangChain and litellm send to it: the fields they send by
default (often as null), the history they hand back, structured output and the model lookup."""

from __future__ import annotations

import json
import random
import re

import openai
import pydantic
import pytest

from appliance.service.grammars import LARGEST_INTEGER, integer_range
from tests.helpers import error_of, http_json, launch_server, sse_chunks

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
        "temperature": 0, "seed": 1}
# What a ChatCompletion's `message.model_dump()` is, sent back as history by the SDK's users.
SDK_ASSISTANT_MESSAGE = {"role": "assistant", "content": "Blue.", "refusal": None,
                         "tool_calls": None, "function_call": None, "audio": None,
                         "annotations": []}
COLOUR_SCHEMA = {"type": "object", "additionalProperties": False,
                 "required": ["colour", "count"],
                 "properties": {"colour": {"type": "string", "maxLength": 16},
                                "count": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.mark.parametrize("defaults", [
    {"temperature": None, "top_p": None, "stream": None, "stop": None, "logprobs": None,
     "max_tokens": None, "n": None, "stream_options": None, "seed": None, "user": None},
    {"logprobs": False, "tools": [], "tool_choice": "none", "parallel_tool_calls": False,
     "n": 1, "store": False, "response_format": {"type": "text"}, "logit_bias": {},
     "tools_extra": None},
], ids=["null", "off"])
def test_fields_sent_as_null_or_off_are_taken_as_left_out(client, defaults):
    defaults = {key: value for key, value in defaults.items() if key != "tools_extra"}
    response = client.post("/v1/chat/completions",
                           json={"messages": CHAT["messages"], "max_tokens": 4, **defaults})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["choices"][0]["message"]["content"]


def test_history_as_the_sdk_hands_it_back_is_accepted(client):
    messages = [*CHAT["messages"], SDK_ASSISTANT_MESSAGE,
                {"role": "user", "content": "Another one."}]
    response = client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("body, fragment", [
    ({**CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({**CHAT, "logit_bias": {"5": 500}}, "logit_bias.5"),
    ({**CHAT, "logit_bias": {"ab": 1}}, "logit_bias.ab"),
    ({**CHAT, "store": True}, "store"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, "json_schema is given"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({**CHAT, "n": 2}, "n: Input should be 1"),
    ({**CHAT, "reasoning_effort": "high"}, "reasoning_effort: unknown parameter"),
    ({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     "messages.0.content"),
])
def test_features_switched_on_that_are_not_served_are_400_and_say_which(client, body,
                                                                         fragment):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert fragment in error_of(response)["message"]


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/fine_tuning/jobs",
                                  "/v1/audio/speech", "/v1/moderations"])
def test_endpoints_for_what_the_appliance_does_not_do_are_404(client, path):
    assert client.post(path, json={}).status_code == 404


def test_completions_refuse_more_than_one_answer_and_echo(client):
    for extra, fragment in (({"n": 3}, "n: Input should be 1"), ({"echo": True}, "echo"),
                            ({"best_of": 2}, "best_of: unknown parameter")):
        response = client.post("/v1/completions", json={"prompt": "a", **extra})
        assert response.status_code == 400 and fragment in error_of(response)["message"]


def test_seed_minus_one_is_random_and_a_seed_does_not_carry_over(client):
    request = {**CHAT, "temperature": 1.5, "max_tokens": 24, "ignore_eos": True}
    seeded = client.post("/v1/chat/completions", json={**request, "seed": 7}).get_json()
    answers = {client.post("/v1/chat/completions", json={**request, "seed": -1})
               .get_json()["choices"][0]["message"]["content"] for _ in range(3)}
    assert len(answers) > 1  # 24 tokens at temperature 1.5: the same three times is not random
    assert seeded["choices"][0]["message"]["content"] not in answers or len(answers) == 3


def test_a_list_of_one_prompt_is_a_prompt(client):
    one = client.post("/v1/completions", json={"prompt": ["The sky is"], "max_tokens": 4,
                                               "temperature": 0, "logprobs": None})
    assert one.status_code == 200, one.get_json()
    text = client.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 4,
                                                "temperature": 0}).get_json()
    assert one.get_json()["choices"][0]["text"] == text["choices"][0]["text"]
    two = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 4})
    assert two.status_code == 400 and "prompt" in error_of(two)["message"]


def test_a_model_is_retrieved_by_its_id(client, shared_engine):
    listed = client.get("/v1/models").get_json()["data"][0]
    response = client.get(f"/v1/models/{shared_engine.facts.id}")
    assert response.status_code == 200 and response.get_json() == listed
    missing = client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "model_not_found"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_always_parses_and_matches_the_schema(client, seed):
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Give a colour and a count as JSON."}],
        "max_tokens": 96, "temperature": 1.0, "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "colour", "strict": True, "schema": COLOUR_SCHEMA}}})
    body = response.get_json()
    assert response.status_code == 200, body
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(answer) == {"colour", "count"}
    assert isinstance(answer["colour"], str) and len(answer["colour"]) <= 16
    assert isinstance(answer["count"], int) and 0 <= answer["count"] <= 99


def test_json_object_mode_streams_a_json_object(client):
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": 'Repeat this JSON: {"sky": "blue"}'}],
        "max_tokens": 128, "temperature": 0, "stream": True,
        "response_format": {"type": "json_object"}})
    assert response.status_code == 200
    events = sse_chunks(response.get_data())
    text = "".join(event["choices"][0]["delta"].get("content", "") for event in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop", text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
     "Fetching remote schemas is not allowed: put what it refers to in $defs"),
    ({"type": "string", "pattern": "a+"}, 'Pattern must start with "^"'),
    ({"type": "mystery"}, "Unrecognized schema"),
    # Bounds of the grammar: the converter would write 10⁹ rules out; a grammar over 256 KiB.
    ({"type": "string", "maxLength": 10**9}, "maxLength 1000000000 repeats more than 2048"),
    ({"type": "string", "pattern": "^a{1,999999}$"}, "repeats more than 2048 times"),
    ({"type": "object", "required": [f"p{n}" for n in range(40)], "properties": {
        f"p{n}": {"type": "string", "maxLength": 2000} for n in range(40)}},
     "over 262144"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer meets"),
])
def test_a_schema_that_cannot_be_enforced_is_400_and_says_which_part(client, schema,
                                                                      fragment):
    response = client.post("/v1/chat/completions", json={**CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "unsupported_schema" and fragment in error["message"]


GREEDY = {**CHAT, "max_tokens": 6, "ignore_eos": True}


class Colour(pydantic.BaseModel):
    """COLOUR_SCHEMA as the client libraries' users write it."""

    colour: str = pydantic.Field(max_length=16)
    count: int = pydantic.Field(ge=0, le=99)


@pytest.fixture
def openai_client(start_server) -> openai.OpenAI:
    server = start_server()
    server.wait_ready()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_logprobs_are_the_models_own_and_the_greedy_choice_is_the_likeliest(client):
    body = client.post("/v1/chat/completions",
                       json={**GREEDY, "logprobs": True, "top_logprobs": 3}).get_json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode() == entry["token"]
        top = [alternative["logprob"] for alternative in entry["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert entry["token"] == entry["top_logprobs"][0]["token"]  # greedy takes the first
        assert entry["logprob"] == pytest.approx(top[0])
    plain = client.post("/v1/chat/completions", json=GREEDY).get_json()["choices"][0]
    assert plain["logprobs"] is None and plain["message"] == choice["message"]

    stream = client.post("/v1/chat/completions", json={**GREEDY, "logprobs": True,
                                                       "top_logprobs": 3, "stream": True})
    streamed = [entry for event in sse_chunks(stream.get_data())
                for entry in (event["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == content


def test_completions_give_logprobs_in_the_legacy_form(client):
    body = client.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 5,
                                                "temperature": 0, "ignore_eos": True,
                                                "logprobs": 2}).get_json()
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert len(logprobs["token_logprobs"]) == 5 and all(lp <= 0 for lp in
                                                        logprobs["token_logprobs"])
    assert all(len(alternatives) == 2 for alternatives in logprobs["top_logprobs"])
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_logit_bias_bans_and_forces_tokens(client):
    first = client.post("/v1/chat/completions", json={**GREEDY, "logprobs": True}).get_json()
    greedy_first = first["choices"][0]["logprobs"]["content"][0]
    token = _token_id(client, greedy_first["token"])
    banned = client.post("/v1/chat/completions", json={
        **GREEDY, "logprobs": True, "logit_bias": {str(token): -100}}).get_json()
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != greedy_first["token"]
    forced = client.post("/v1/chat/completions", json={
        **GREEDY, "logit_bias": {str(token): 100}}).get_json()
    assert forced["choices"][0]["message"]["content"] == greedy_first["token"] * 6
    unknown = client.post("/v1/chat/completions", json={**GREEDY, "logit_bias": {"999999": 1}})
    assert unknown.status_code == 400
    assert "token 999999 is not in the model's vocabulary" in error_of(unknown)["message"]


def _token_id(client, text: str) -> int:
    engine = client.application.extensions["appliance.engine"]
    [token] = engine._llama.tokenize(text.encode(), add_bos=False, special=False)
    return token


@pytest.mark.slow
def test_the_openai_client_parses_structured_output_retrieves_the_model_and_sends_history_back(
        openai_client):
    """The official client against a real server: `chat.completions.parse` into a pydantic
    model, `models.retrieve`, logprobs, and its own answer object sent back as history."""
    with openai_client as client:
        model = client.models.retrieve(client.models.list().data[0].id)
        assert model.id and model.object == "model"
        parsed = client.chat.completions.parse(
            model=model.id, max_tokens=96, temperature=0,
            messages=[{"role": "user", "content": "Give a colour and a count."}],
            response_format=Colour)
        answer = parsed.choices[0].message.parsed
        assert isinstance(answer, Colour) and 0 <= answer.count <= 99
        reply = client.chat.completions.create(
            model=model.id, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
            messages=[{"role": "user", "content": "Name a colour."}])
        assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
        follow_up = client.chat.completions.create(
            model=model.id, max_tokens=4, messages=[
                {"role": "user", "content": "Name a colour."},
                reply.choices[0].message.model_dump(),
                {"role": "user", "content": "Another one."}])
        assert follow_up.choices[0].message.content


def test_responses_answer_text_and_message_input_with_instructions(client):
    body = client.post("/v1/responses", json={
        "input": "Name a colour.", "instructions": "Answer in one word.",
        "max_output_tokens": 6, "temperature": 0}).get_json()
    assert body["object"] == "response" and body["id"].startswith("resp_")
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["content"][0]["type"] == "output_text" and item["content"][0]["text"]
    assert body["usage"]["output_tokens"] >= 1 and body["store"] is False
    assert body["text"] == {"format": {"type": "text"}}  # what was asked, as OpenAI echoes it
    assert body["status"] in ("completed", "incomplete")
    # The output handed back as input, as the SDK's users do for a conversation.
    again = client.post("/v1/responses", json={
        "input": [{"role": "user", "content": "Name a colour."}, item,
                  {"role": "user", "content": [{"type": "input_text", "text": "Another."}]}],
        "max_output_tokens": 4})
    assert again.status_code == 200, again.get_json()


@pytest.mark.parametrize("body, fragment", [
    ({"input": "hi", "store": True}, "nothing is kept on this appliance"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "nothing is kept on this appliance"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "hi", "background": True}, "background: unknown parameter"),
    ({"input": []}, "input"),
])
def test_responses_refuse_what_the_appliance_cannot_do_and_say_why(client, body, fragment):
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400
    assert fragment in error_of(response)["message"]


@pytest.mark.slow
def test_the_openai_client_creates_streams_and_parses_responses(openai_client):
    with openai_client as client:
        model = client.models.list().data[0].id
        whole = client.responses.create(model=model, input="Say hello.", max_output_tokens=8,
                                        temperature=0)
        assert whole.output_text and whole.usage.output_tokens >= 1
        events = list(client.responses.create(model=model, input="Say hello.",
                                              max_output_tokens=8, temperature=0,
                                              stream=True))
        kinds = [event.type for event in events]
        assert kinds[:4] == ["response.created", "response.in_progress",
                             "response.output_item.added", "response.content_part.added"]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        assert [event.sequence_number for event in events] == list(range(len(events)))
        streamed = "".join(event.delta for event in events
                           if event.type == "response.output_text.delta")
        assert streamed == whole.output_text == events[-1].response.output_text
        parsed = client.responses.parse(model=model, input="Give a colour and a count.",
                                        max_output_tokens=96, temperature=0, text_format=Colour)
        assert isinstance(parsed.output_parsed, Colour)


def _as_regex(expression: str) -> re.Pattern:
    """A GBNF expression of literals, digit classes, repeats and alternatives as a regex."""
    return re.compile("^(?:" + re.sub(r'"([^"]*)"', lambda found: re.escape(found[1]),
                                      expression).replace(" ", "") + ")$")


@pytest.mark.parametrize("low, high", [(0, 99), (5, 5), (1, 100), (-5, 5), (-100, -3),
                                       (17, 4321), (190, 210), (999, 1000),
                                       (-LARGEST_INTEGER, 7)])
def test_an_integer_range_admits_exactly_its_integers(low, high):
    pattern = _as_regex(integer_range(low, high))
    rng = random.Random(low * 31 + high)  # noqa: S311 - test inputs, not secrets
    around = [*range(low - 60, low + 60), *range(high - 60, high + 60),
              *(rng.randint(low - 10**6, high + 10**6) for _ in range(2000))]
    assert [n for n in around if bool(pattern.match(str(n))) != (low <= n <= high)] == []
    assert not any(pattern.match(text) for text in ("00", "01", "-0", "-01", "1.0"))


def test_integer_bounds_hold_in_structured_output(client):
    """llama-cpp-python's converter drops them; {"maximum": 99} must not let 100 through."""
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 10, "exclusiveMaximum": 13}}}
    for seed in range(4):
        body = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a big number, like 1000000."}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "n", "schema": schema}},
            "temperature": 1.5, "seed": seed, "max_tokens": 24}).get_json()
        assert json.loads(body["choices"][0]["message"]["content"])["n"] in (10, 11, 12)


@pytest.fixture(scope="module")
def embedding_server(model_path, tmp_path_factory):
    """A server that pools the small model's hidden states (it declares no pooling itself)."""
    server = launch_server(tmp_path_factory.mktemp("embeddings"), model_path,
                           model={"embedding_pooling": "mean"})
    server.wait_ready()
    yield server
    server.stop()


@pytest.mark.slow
def test_embeddings_with_the_openai_client_are_unit_vectors_that_rank_meaning(
        embedding_server):
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.",
             "Stock markets fell sharply today.", "The cat sat on the mat."]
    with openai.OpenAI(base_url=embedding_server.url + "/v1", api_key="unused",
                       max_retries=0) as client:
        # The client asks for base64 unless told: both forms are served.
        answer = client.embeddings.create(model="appliance", input=texts)
        floats = client.embeddings.create(model="appliance", input=texts[0],
                                          encoding_format="float")
    vectors = [item.embedding for item in answer.data]
    assert [item.index for item in answer.data] == [0, 1, 2, 3]
    assert answer.usage.prompt_tokens > len(texts)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert all(dot(vector, vector) == pytest.approx(1.0, abs=1e-4) for vector in vectors)
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    assert dot(vectors[0], vectors[3]) == pytest.approx(1.0, abs=1e-5)  # the same text
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])  # nearer in meaning
    url = embedding_server.url + "/v1/embeddings"
    status, body = http_json(url, {"input": "word " * 600})
    assert status == 400 and "at most 512 (model.batch)" in body["error"]["message"]
    status, body = http_json(url, {"input": "x", "dimensions": 8})
    assert status == 400 and "cannot shorten them" in body["error"]["message"]


def test_embeddings_without_pooling_are_a_clear_400(client):
    response = client.post("/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "model_cannot_embed" and "model.embedding_pooling" in error["message"]


@pytest.mark.parametrize("body, fragment", [
    ({"input": [1, 2, 3]}, "token ids are another tokenizer's"),
    ({"input": [[1, 2], [3]]}, "token ids are another tokenizer's"),
    ({"input": []}, "input"),
    ({"input": ["x"] * 257}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_embedding_requests_are_400_and_say_which_part(client, body, fragment):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 400
    assert fragment in error_of(response)["message"]
