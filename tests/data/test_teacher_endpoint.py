"""The generate stage with its teacher behind an OpenAI-compatible server, against real servers: llama.cpp's
(`expqa llama-serve` on a tiny random GGUF: JSON-schema constrained answers, the cache, a changed prompt), `expqa
serve` (no constrained decoding: it refuses response_format and the stage asks in plain text; the API key), and
small standard-library servers for what goes wrong (nothing listening, HTTP 500, too slow, not JSON): one line
each, and the answers got before a failure stay in the cache for the next run."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from expqa.config import ConfigError, GenerateConfig, load_params
from expqa.data.answer_cache import AnswerCache, answer_key
from expqa.data.chatml import DataError
from expqa.data.generate import PAIR_PROMPT_VERSION, generate_qa, parse_pair_reply
from expqa.data.teacher_endpoint import TeacherError
from expqa.pipeline.generate import main as generate_stage
from helpers import REPO

SAMPLE_PAPERS = REPO / "data" / "raw" / "arxiv_papers_sample.jsonl"
GROUNDED = (
    "Fixed-sample p-values mislead experimenters who keep checking an A/B test, but p-values and confidence "
    "intervals built from sequential tests stay valid at whatever moment the user decides to stop."
)
GOOD_REPLY = {
    "model": "scripted-teacher",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": json.dumps({"question": "Why peek?", "answer": GROUNDED})},
            "finish_reason": "stop",
        }
    ],
}


def endpoint_config(url: str, **overrides) -> GenerateConfig:
    """params.yaml's generate section with the server as teacher: the first paper, quick retries."""
    shipped = load_params(REPO / "params.yaml").generate
    settings = dict(enabled=True, model=f"{url}/v1", max_papers=1, concurrency=1, retry_wait_s=0.01)
    return dataclasses.replace(shipped, **{**settings, **overrides})


def run_stage(config: GenerateConfig, tmp_path: Path, papers: Path = SAMPLE_PAPERS) -> dict:
    return generate_qa(papers, tmp_path / "out.jsonl", config, base_dir=tmp_path / "no-model", cache=tmp_path / "c")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ScriptedServer(ThreadingHTTPServer):
    """A real HTTP server on a free loopback port whose every answer is `respond(number of this POST)`:
    (status, body bytes, seconds to wait first). Counts the POSTs it got."""

    daemon_threads = True

    def __init__(self, respond):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.respond, self.posts = respond, 0
        self.url = f"http://127.0.0.1:{self.server_port}"


class ScriptedHandler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        status, body, wait = self.server.respond(self.server.posts)
        time.sleep(wait)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            pass


@pytest.fixture
def scripted():
    servers = []

    def start(respond) -> ScriptedServer:
        server = ScriptedServer(respond)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def one_line_error(config: GenerateConfig, tmp_path: Path) -> str:
    with pytest.raises(TeacherError) as caught:
        run_stage(config, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and config.model in message, message
    return message


# --- what goes wrong -------------------------------------------------------------------------------------------------


def test_nothing_listening_is_one_line_from_the_stage(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    params = tmp_path / "params.json"
    config = endpoint_config(url, endpoint_model="teacher")
    params.write_text(json.dumps({"stage": "generate", "generate": dataclasses.asdict(config)}))
    paths = {"--papers": SAMPLE_PAPERS, "--base": tmp_path / "no-model", "--cache": tmp_path / "cache.jsonl"}
    paths |= {"--out": tmp_path / "out.jsonl", "--report": tmp_path / "report.json", "--params": params}
    code = generate_stage([str(part) for option, path in paths.items() for part in (option, path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: teacher {url}/v1 is not reachable (Connection refused) for arXiv:1512.04922 pair 1")
    assert "start the server" in err and "0 new answers (0 in all) are kept" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_http_500_is_retried_with_back_off_then_one_line(scripted, tmp_path):
    server = scripted(lambda n: (500, b'{"error": {"message": "CUDA out of memory"}}', 0))
    started = time.perf_counter()
    message = one_line_error(endpoint_config(server.url, endpoint_model="t", retries=2, retry_wait_s=0.1), tmp_path)
    assert server.posts == 3 and time.perf_counter() - started >= 0.1 + 0.2  # waits 0.1 s, then 0.2 s
    assert "answered HTTP 500 (CUDA out of memory) for arXiv:1512.04922 pair 1, 3 tries" in message


def test_a_server_slower_than_timeout_s_is_one_line(scripted, tmp_path):
    server = scripted(lambda n: (200, json.dumps(GOOD_REPLY).encode(), 1.0))
    message = one_line_error(endpoint_config(server.url, endpoint_model="t", timeout_s=0.2, retries=1), tmp_path)
    assert server.posts == 2 and "gave no answer within generate.timeout_s = 0.2 s" in message
    assert "raise generate.timeout_s" in message


def test_a_body_that_is_not_json_is_one_line_and_not_retried(scripted, tmp_path):
    server = scripted(lambda n: (200, b"<html>502 Bad Gateway</html>", 0))
    message = one_line_error(endpoint_config(server.url, endpoint_model="t"), tmp_path)
    assert server.posts == 1 and "with a body that is not JSON" in message and "'<html>502 Bad Gateway" in message


def test_answers_got_before_a_failure_are_kept_and_the_next_run_asks_only_the_rest(scripted, tmp_path):
    healthy = threading.Event()
    server = scripted(
        lambda n: (200, json.dumps(GOOD_REPLY).encode(), 0) if n <= 2 or healthy.is_set() else (503, b"", 0)
    )
    config = endpoint_config(server.url, endpoint_model="t", max_papers=2, retries=0)
    message = one_line_error(config, tmp_path)
    assert "answered HTTP 503" in message and "2 new answers (2 in all) are kept in" in message
    assert len((tmp_path / "c").read_text().splitlines()) == 2 and not (tmp_path / "out.jsonl").exists()
    healthy.set()
    counts = run_stage(config, tmp_path)
    assert counts["this_run"] == {"answers_asked": 4, "answers_cached": 2, "requests": 4} and server.posts == 7
    assert counts["pairs_kept"] + sum(counts["dropped"].values()) == 6 and counts["teacher"] == "t"
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["metadata"]["teacher"] for row in rows] == ["scripted-teacher"] * len(rows) and rows  # the server's


def test_endpoint_settings_are_checked_with_the_config(tmp_path):
    config = endpoint_config("http://127.0.0.1:8080", api_key_env="sk-secret-123", concurrency=0)
    with pytest.raises(ConfigError) as caught:
        run_stage(config, tmp_path)
    message = str(caught.value)
    assert "generate.model is 'http://127.0.0.1:8080/v1'" not in message  # that one is fine
    assert "generate.concurrency is 0" in message and "generate.api_key_env is not" in message
    assert "sk-secret-123" not in message  # a key pasted in the wrong place is not printed
    bad = dataclasses.replace(config, model="http://127.0.0.1:8080", api_key_env="KEY", concurrency=1)
    assert bad.validate() == [
        "generate.model is 'http://127.0.0.1:8080'; give the server's OpenAI-compatible base address, e.g. "
        "http://127.0.0.1:8080/v1 (the part before /chat/completions)"
    ]


# --- the cache and the answers' form ---------------------------------------------------------------------------------


def test_cache_cuts_a_torn_last_line_and_a_later_answer_wins(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "text": "1"}\n{"key": "a", "text": "2"}\n{"key": "b", "te')
    with AnswerCache(path) as cache:
        assert len(cache) == 1 and cache.get("a")["text"] == "2" and cache.get("b") is None
        cache.add({"key": "b", "text": "3"})
    assert path.read_text().splitlines()[-1] == '{"key": "b", "text": "3"}'
    path.write_text('{"key": "a"}\n[1]\n{"key": "b"}\n')
    with pytest.raises(DataError, match=r"cache.jsonl:2: not an answer of the cache"):
        AnswerCache(path)
    assert answer_key(paper="1", pair=2) == answer_key(pair=2, paper="1") != answer_key(paper="1", pair=3)


def test_a_pair_reply_is_json_or_q_and_a_lines():
    pair = ("Why peek?", GROUNDED)
    assert parse_pair_reply(json.dumps({"question": " Why  peek?", "answer": GROUNDED})) == pair
    assert parse_pair_reply(f"```json\n{json.dumps({'question': 'Why peek?', 'answer': GROUNDED})}\n```") == pair
    assert parse_pair_reply(f"Q: Why peek?\nA: {GROUNDED}") == pair
    assert parse_pair_reply('{"question": "Why peek?", "answer": ') is None  # cut at max_tokens
    assert parse_pair_reply('{"question": "Why peek?"}') is None and parse_pair_reply("prose") is None


# --- real servers ----------------------------------------------------------------------------------------------------


def start_server(command: list[str], url: str, env: dict | None = None) -> subprocess.Popen:
    """`python -m expqa.cli <command>` in a subprocess, once it answers GET /v1/models (it loads a model first)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "expqa.cli", *command],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        request = urllib.request.Request(f"{url}/health")
        try:
            urllib.request.urlopen(request, timeout=2).close()
            return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    pytest.fail(f"{command[0]} did not start: {process.communicate()[0]}")


@pytest.fixture
def stop_servers():
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def tiny_gguf(talkative_base, tmp_path_factory) -> Path:
    """The tiny random Llama (its own output layer) as an f32 GGUF, written by the export stage's writer."""
    from transformers import AutoTokenizer

    from expqa.serving.export import write_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(talkative_base, path, "f32", "tiny", AutoTokenizer.from_pretrained(talkative_base))
    return path


@pytest.mark.slow
def test_llama_cpp_answers_json_of_the_schema_and_the_cache_asks_only_what_changed(tiny_gguf, tmp_path, stop_servers):
    pytest.importorskip("xllamacpp", reason="llama.cpp runtime wheel (pip install xllamacpp)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["llama-serve", str(tiny_gguf), "--port", str(port), "--threads", "1", "--ctx-size", "4096"]
    stop_servers.append(start_server(command, url))
    papers = tmp_path / "papers.jsonl"
    sample = [json.loads(line) for line in SAMPLE_PAPERS.read_text().splitlines()]
    papers.write_text("".join(json.dumps(paper) + "\n" for paper in sample[:2]))
    config = endpoint_config(url, max_papers=0, categories=[], keywords=[], concurrency=2, max_new_tokens=1024)

    first = run_stage(config, tmp_path, papers)
    assert first["this_run"] == {"answers_asked": 6, "answers_cached": 0, "requests": 7}  # GET /models + 6 pairs
    assert first["teacher"].startswith("tiny-f32.gguf@") and first["output_format"] == ["json_schema"]
    assert first["prompt_version"] == PAIR_PROMPT_VERSION
    assert first["pairs_kept"] + sum(first["dropped"].values()) == 6
    entries = [json.loads(line) for line in (tmp_path / "c").read_text().splitlines()]
    # the random model's words are noise, but in the schema's form: every answer is the asked JSON object
    assert len(entries) == 6 and all(entry["finish_reason"] == "stop" for entry in entries)
    assert all(set(json.loads(entry["text"])) == {"question", "answer"} for entry in entries)
    assert first["dropped"]["unparseable"] == 0
    output = (tmp_path / "out.jsonl").read_bytes()

    second = run_stage(config, tmp_path, papers)  # the same teacher and prompts: nothing is asked
    assert second.pop("this_run") == {"answers_asked": 0, "answers_cached": 6, "requests": 1}  # GET /models only
    assert second == {key: value for key, value in first.items() if key != "this_run"}
    assert (tmp_path / "out.jsonl").read_bytes() == output

    sample[1]["abstract"] += " The authors also release their code."  # one paper's prompts change
    papers.write_text("".join(json.dumps(paper) + "\n" for paper in sample[:2]))
    assert run_stage(config, tmp_path, papers)["this_run"]["answers_asked"] == 3


@pytest.mark.slow
def test_expqa_serve_refuses_the_schema_so_the_stage_asks_in_plain_text_with_the_key(
    tiny_base, tmp_path, stop_servers, monkeypatch, capsys
):
    port, key = free_port(), "test-key-7f3a9c"
    url = f"http://127.0.0.1:{port}"
    command = ["serve", "--model", str(tiny_base), "--port", str(port)]
    stop_servers.append(start_server(command, url, env={"EXPQA_API_KEY": key}))
    config = endpoint_config(url, api_key_env="TEACHER_KEY_FOR_TEST", max_new_tokens=16)

    monkeypatch.delenv("TEACHER_KEY_FOR_TEST", raising=False)
    message = one_line_error(config, tmp_path)
    assert "refused the list of its models (GET /models) (HTTP 401: missing API key" in message
    assert "put the server's API key in $TEACHER_KEY_FOR_TEST" in message

    monkeypatch.setenv("TEACHER_KEY_FOR_TEST", key)
    counts = run_stage(config, tmp_path)
    printed = capsys.readouterr().out
    assert printed.count("refused response_format (HTTP 400: response_format 'json_schema' is not supported") == 1
    assert counts["teacher"] == "expqa" and counts["output_format"] == ["plain"]
    # GET /models, the refused request, then each pair in plain text
    assert counts["this_run"] == {"answers_asked": 3, "answers_cached": 0, "requests": 5}
    assert counts["pairs_kept"] + sum(counts["dropped"].values()) == 3
    written = [tmp_path / "c", tmp_path / "out.jsonl"]
    assert all(key not in path.read_text() for path in written) and key not in json.dumps(counts) + printed
