"""`expqa serve`: a real server on a free loopback port with the tiny model, spoken to with plain HTTP (urllib) and
the `openai` client: answers equal `expqa ask`'s, streaming chunks add up to the same answer, bad requests get 4xx
JSON errors and the server keeps answering afterwards; with a key, requests without it get 401; the command's
settings (port in use, a public host without a key) fail in one line before the model loads."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from expqa.config import load_params
from expqa.serving.inference import ChatRequest, Engine, StopText, answer
from expqa.serving.serve import API_KEY_ENV, ChatServer, main
from helpers import REPO

QUESTION = "What is a p-value?"
SHIPPED = load_params(REPO / "params.yaml").generation  # what `expqa serve` answers with in the project


@pytest.fixture(scope="module")
def engine(tiny_base):
    from expqa.model.loading import load_for_inference

    model, tokenizer = load_for_inference(tiny_base)
    return Engine(model, tokenizer, "expqa", SHIPPED, max_tokens_limit=64)


def ask_answer(engine, **settings) -> dict:
    """`expqa ask`'s answer to QUESTION with the engine's settings, changed by settings."""
    return answer(engine.model, engine.tokenizer, QUESTION, dataclasses.replace(engine.settings, **settings))


@pytest.fixture(scope="module")
def url(engine):
    server = ChatServer(engine, port=0)  # a free port on 127.0.0.1
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def post(url: str, body, path: str = "/v1/chat/completions", headers: dict | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def ask_request(**extra) -> dict:
    return {
        "model": "expqa",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


def sse_events(raw: bytes) -> list:
    lines = [line for line in raw.decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_binds_loopback_by_default(engine):
    server = ChatServer(engine, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_models_lists_the_served_model(url):
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
        body = json.loads(response.read())
    assert [m["id"] for m in body["data"]] == ["expqa"] and body["object"] == "list"


def test_answer_is_expqa_ask_with_the_chat_template(url, engine):
    status, raw = post(url, ask_request())
    assert status == 200
    body = json.loads(raw)
    # exact on any CPU: the same model and prompt through model.generate in this process (the server's generation
    # thread inherits its thread count): the same kernels on the same shapes
    expected = ask_answer(engine, max_new_tokens=8)["answer"]
    assert body["object"] == "chat.completion" and body["model"] == "expqa"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip() == expected
    prompt_ids = engine.prompt_ids(ChatRequest(messages=ask_request()["messages"], max_tokens=8))
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert choice["finish_reason"] in ("stop", "length") and 1 <= body["usage"]["completion_tokens"] <= 8


def test_what_a_request_leaves_out_comes_from_params_yaml_and_its_fields_override(url, engine):
    request = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8}  # no sampling fields
    choice = json.loads(post(url, request)[1])["choices"][0]
    default = ask_answer(engine, max_new_tokens=8)
    assert choice["message"]["content"].strip() == default["answer"]
    assert choice["finish_reason"] == ("stop" if default["stopped"] else "length")
    # the tiny model repeats newlines (empty answers); a strong penalty, asked for in the request, breaks the loop
    strong = ask_answer(engine, max_new_tokens=12, repetition_penalty=2.0)
    choice = json.loads(post(url, {**request, "max_tokens": 12, "repetition_penalty": 2.0})[1])["choices"][0]
    assert choice["message"]["content"].strip() == strong["answer"] != ask_answer(engine, max_new_tokens=12)["answer"]
    body = json.loads(post(url, {"messages": request["messages"]})[1])  # no max_tokens: generation.max_new_tokens
    assert body["usage"]["completion_tokens"] <= min(SHIPPED.max_new_tokens, engine.max_tokens_limit)


def test_stream_chunks_add_up_to_the_answer(url):
    _, plain = post(url, ask_request())
    status, raw = post(url, ask_request(stream=True, stream_options={"include_usage": True}))
    assert status == 200
    events = sse_events(raw)
    chunks, usage = events[:-1], events[-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == json.loads(plain)["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == json.loads(plain)["choices"][0]["message"]["content"]
    assert usage["choices"] == [] and usage["usage"] == json.loads(plain)["usage"]


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 400, "must be a JSON object"),
        ({"max_tokens": 8}, 400, "messages must be a non-empty list"),
        ({"messages": []}, 400, "messages must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role is 'bot'; allowed: system, user"),
        ({"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens must be an integer"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "this server's limit"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature must be a number"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "only n=1"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0.5},
            400,
            "repetition_penalty must be a number in [1, 2]",
        ),
        ({"messages": [{"role": "user", "content": "word " * 2100}]}, 400, "context window is 2048 tokens"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "this server has 'expqa'"),
        (
            ask_request(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            400,
            "response_format 'json_schema' is not supported: this server does not constrain its output",
        ),
        (ask_request(response_format={"type": "json_object"}), 400, "response_format 'json_object' is not supported"),
    ],
)
def test_bad_requests_get_4xx_json_and_the_server_stays_up(url, body, status, message):
    got, raw = post(url, body)
    error = json.loads(raw)["error"]
    assert got == status and message in error["message"] and error["type"] == "invalid_request_error"
    assert post(url, ask_request(max_tokens=1))[0] == 200


def test_a_text_response_format_is_answered(url):
    """What a client asks when it wants free text; the generate stage's fallback leaves response_format out."""
    assert post(url, ask_request(response_format={"type": "text"}))[0] == 200


def test_context_window_counts_max_tokens(url, engine):
    engine.context_window, saved = 40, engine.context_window
    try:
        status, raw = post(url, ask_request(max_tokens=30))
    finally:
        engine.context_window = saved
    assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"


def test_unknown_route_and_missing_length(url):
    assert post(url, ask_request(), path="/v1/completions")[0] == 404
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.0 411")


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(url):
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(ask_request(stream=True, max_tokens=64)).encode()
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert b"200" in conn.recv(32)
    assert post(url, ask_request(max_tokens=2))[0] == 200


def test_openai_client(url, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="expqa", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0
    )
    # exact on any CPU: the same model and prompt through model.generate in this process (the server's generation
    # thread inherits its thread count): the same kernels on the same shapes
    expected = ask_answer(engine, max_new_tokens=8)["answer"]
    assert reply.choices[0].message.content.strip() == expected
    stream = client.chat.completions.create(
        model="expqa", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="allowed: system, user, assistant"):
        client.chat.completions.create(model="expqa", messages=[{"role": "tool", "content": "x"}])


def test_stop_strings_cut_the_stream_and_hold_back_partial_matches():
    stop = StopText(["lo w", "XYZ"])
    assert stop.feed("Hel") == "He" and not stop.stopped  # "l" may start "lo w"
    assert stop.feed("lo wor") == "l" and stop.stopped
    assert StopText(["\n\n"]).feed("a\nb") == "a\nb"
    tail = StopText(["END"])
    assert tail.feed("abcEN") == "abc" and tail.flush() == "EN"


def test_cli_reports_a_missing_model(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert "does not exist yet" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# authentication and the command's checks


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def keyed_url(engine):
    server = ChatServer(engine, port=0, api_key="s3cret-key")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "headers,message",
    [
        ({}, "missing API key: send `Authorization: Bearer <key>`"),
        ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
        ({"Authorization": "Bearer s3cret-ke"}, "invalid API key"),  # a prefix of the key
        ({"Authorization": "Basic s3cret-key"}, "invalid API key"),  # the key, in another scheme
    ],
)
def test_a_key_is_required_on_every_route_but_health(keyed_url, headers, message):
    for status, raw in (post(keyed_url, ask_request(), headers=headers), get(keyed_url, "/v1/models", headers)):
        error = json.loads(raw)["error"]
        assert status == 401 and message in error["message"], raw
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
        assert "s3cret-key" not in raw.decode()
    assert get(keyed_url, "/health") == (200, b'{"status": "ok"}')


def test_the_right_key_gets_answers(keyed_url):
    key = {"Authorization": "Bearer s3cret-key"}
    assert post(keyed_url, ask_request(max_tokens=2), headers=key)[0] == 200
    assert get(keyed_url, "/v1/models", key)[0] == 200


@pytest.fixture
def loader(engine, monkeypatch):
    """Records the calls to load_for_inference (answering with the tiny model) and stops serve_forever at once."""
    from expqa.model import loading

    calls = []

    def load(model_dir, adapter=None):
        calls.append(model_dir)
        return engine.model, engine.tokenizer

    monkeypatch.setattr(loading, "load_for_inference", load)
    monkeypatch.setattr(ChatServer, "serve_forever", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return calls


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_base, loader, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--model", str(tiny_base), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} on 127.0.0.1 is in use (") and err.endswith("pick another with --port\n")
    assert err.count("\n") == 1 and loader == []


def test_a_public_host_needs_a_key_or_allow_no_auth(tiny_base, loader, capsys, monkeypatch):
    assert main(["--model", str(tiny_base), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and API_KEY_ENV in err and "--allow-no-auth" in err and loader == []

    assert main(["--model", str(tiny_base), "--host", "0.0.0.0", "--port", "0", "--allow-no-auth"]) == 0
    assert "auth: off (--allow-no-auth)" in capsys.readouterr().out and loader == [tiny_base]

    monkeypatch.setenv(API_KEY_ENV, "s3cret-key")
    assert main(["--model", str(tiny_base), "--host", "0.0.0.0", "--port", "0"]) == 0
    captured = capsys.readouterr()
    assert "auth: on" in captured.out and "s3cret-key" not in captured.out + captured.err

    monkeypatch.setenv(API_KEY_ENV, " ")
    assert main(["--model", str(tiny_base), "--port", "0"]) == 2
    assert f"{API_KEY_ENV} is set but empty" in capsys.readouterr().err and len(loader) == 2


def test_loopback_serves_without_a_key_and_says_so(tiny_base, loader, capsys):
    assert main(["--model", str(tiny_base), "--host", "localhost", "--port", "0"]) == 0
    assert "auth: off (loopback only" in capsys.readouterr().out and loader == [tiny_base]


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path, loader, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no config.json, so it is not a model folder" in err and loader == []
