"""The generate stage's teacher behind an OpenAI-compatible server: llama.cpp's server, vLLM, Ollama, `expqa serve`.

One chat completion per question/answer pair (POST {base}/chat/completions), standard library only (urllib; the
stage runs requests in threads). Each request asks for JSON that follows a schema (`response_format` json_schema,
which llama.cpp, vLLM, Ollama and OpenAI turn into constrained decoding); a server that answers such a request with
HTTP 400 is asked again without it, once, and from then on the whole run asks in plain text.

What can go wrong is one TeacherError line naming the server, the request and the fix:
  not reachable (connection refused, unknown host)   no retry: nothing listens there
  HTTP 429 or 5xx, or no answer within timeout_s     retried `retries` times, waiting retry_wait_s, 2x, 4x ...
  another 4xx (bad key, unknown model)               no retry: the request itself is wrong
  a body that is not chat-completion JSON            no retry: not an OpenAI-compatible address
The API key comes from the environment variable generate.api_key_env names; it is sent only in the Authorization
header, and no message, log line or record of this module holds it.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from expqa.config import GenerateConfig

RETRIED = (429, 500, 502, 503, 504)  # rate limits and server-side failures: the same request may work later


class TeacherError(RuntimeError):
    """A request the teacher's server did not answer usefully; the message is one line with the fix."""


@dataclass(frozen=True)
class Reply:
    """One chat completion: the text, the model id the server reported, how the text was asked for, and the tokens
    the server counted (what the answer cost; None where it does not say)."""

    text: str
    model: str
    finish_reason: str | None
    output_format: str  # json_schema (constrained by the server) | plain (parsed from free text)
    completion_tokens: int | None


class Refused(Exception):
    """A 4xx answer that is not retried; the caller decides what it means."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


@dataclass
class Endpoint:
    """A server's base address (…/v1), the model name to send, and how long and how often to try a request."""

    url: str
    model: str
    timeout_s: float
    retries: int
    retry_wait_s: float
    api_key_env: str
    api_key: str | None = field(default=None, repr=False)
    constrained: bool = True  # False once the server has refused response_format
    requests: int = 0  # HTTP requests sent, retries included
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- requests ----------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: dict | None, what: str) -> dict:
        """The JSON object the server answered, after retries; Refused for a 4xx, TeacherError for the rest."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_wait_s * 2 ** (attempt - 1))
            with self._lock:
                self.requests += 1
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code not in RETRIED:
                    raise Refused(exc.code, detail) from None
                failure = f"answered HTTP {exc.code} ({detail})"
                continue
            except TimeoutError:  # the answer did not come within timeout_s
                failure = f"gave no answer within generate.timeout_s = {self.timeout_s:g} s"
                continue
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):  # the connection itself timed out
                    failure = f"did not accept a connection within generate.timeout_s = {self.timeout_s:g} s"
                    continue
                raise TeacherError(
                    f"teacher {self.url} is not reachable ({_reason(exc.reason)}) for {what}; start the server "
                    '(README "More training data") or correct generate.model'
                ) from None
            except (ConnectionError, http.client.HTTPException) as exc:
                raise TeacherError(
                    f"teacher {self.url} dropped the connection ({type(exc).__name__}: {exc}) for {what}; see "
                    "the server's log, then run again"
                ) from None
            return _json_object(raw, self.url, what)
        raise TeacherError(
            f"teacher {self.url} {failure} for {what}, {self.retries + 1} tries; "
            + (
                "raise generate.timeout_s, or lower generate.concurrency or generate.max_new_tokens"
                if "within" in failure
                else "see the server's log, then run again"
            )
        )

    def chat(self, messages: list[dict], *, max_tokens: int, schema: dict, what: str) -> Reply:
        """One greedy chat completion; JSON following `schema` where the server constrains it."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        constrained = self.constrained
        if constrained:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "question_answer_pair", "strict": True, "schema": schema},
            }
        try:
            answer = self._send("POST", "/chat/completions", body, what)
        except Refused as exc:
            if constrained and exc.status == 400:
                self._give_up_constraints(exc)
                return self.chat(messages, max_tokens=max_tokens, schema=schema, what=what)
            raise TeacherError(self._refusal(exc, what)) from None
        try:
            choice = answer["choices"][0]
            text, finish_reason = choice["message"]["content"], choice.get("finish_reason")
            if not isinstance(text, str):
                raise TypeError("message.content is not a string")
        except (KeyError, IndexError, TypeError) as exc:
            raise TeacherError(
                f"teacher {self.url} answered {what} with JSON that is not a chat completion ({type(exc).__name__}: "
                f"{exc}); generate.model must be an OpenAI-compatible base address ending in /v1"
            ) from None
        model = answer.get("model") if isinstance(answer.get("model"), str) else self.model
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        tokens = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
        return Reply(text, model, finish_reason, "json_schema" if constrained else "plain", tokens)

    def _give_up_constraints(self, refusal: Refused) -> None:
        with self._lock:
            if self.constrained:
                self.constrained = False
                print(
                    f"generate: teacher {self.url} refused response_format ({refusal}); asking in plain text, "
                    "each answer parsed as JSON or Q:/A: lines"
                )

    def _refusal(self, refusal: Refused, what: str) -> str:
        fix = {
            401: f"put the server's API key in ${self.api_key_env} (generate.api_key_env)",
            403: f"put the server's API key in ${self.api_key_env} (generate.api_key_env)",
            404: "check generate.model (the base address, ending in /v1) and generate.endpoint_model",
        }.get(refusal.status, "check the request the server names, or generate.endpoint_model")
        return f"teacher {self.url} refused {what} ({refusal}); {fix}"

    # --- the model's name ----------------------------------------------------------------------------------------

    def listed_models(self) -> list[str]:
        what = "the list of its models (GET /models)"
        try:
            answer = self._send("GET", "/models", None, what)
        except Refused as exc:
            if exc.status in (401, 403):
                raise TeacherError(self._refusal(exc, what)) from None
            raise TeacherError(
                f"teacher {self.url} did not list its models ({exc}); set generate.endpoint_model to the model name"
            ) from None
        data = answer.get("data")
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise TeacherError(
                f"teacher {self.url} answered GET /models without a list of model ids; set generate.endpoint_model"
            )
        return [m["id"] for m in data]


def connect(config: GenerateConfig) -> Endpoint:
    """The endpoint of generate.model, its model name settled: generate.endpoint_model, or else the one model the
    server lists (asked only then, so that a run answered wholly from the cache needs no server)."""
    endpoint = Endpoint(
        url=config.model.rstrip("/"),
        model=config.endpoint_model,
        timeout_s=config.timeout_s,
        retries=config.retries,
        retry_wait_s=config.retry_wait_s,
        api_key_env=config.api_key_env,
        api_key=os.environ.get(config.api_key_env) or None,
    )
    if not endpoint.model:
        models = endpoint.listed_models()
        if len(models) != 1:
            raise TeacherError(
                f"teacher {endpoint.url} serves {len(models)} models ({', '.join(models) or 'none'}); set "
                "generate.endpoint_model to the one to ask"
            )
        endpoint.model = models[0]
    return endpoint


def _json_object(raw: bytes, url: str, what: str) -> dict:
    try:
        answer = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        start = raw[:60].decode("utf-8", "replace")
        raise TeacherError(
            f"teacher {url} answered {what} with a body that is not JSON ({exc}; it starts {start!r}); "
            "generate.model must be an OpenAI-compatible base address ending in /v1"
        ) from None
    if not isinstance(answer, dict):
        raise TeacherError(f"teacher {url} answered {what} with JSON that is not an object; is it OpenAI-compatible?")
    return answer


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own message: OpenAI's {"error": {"message"}}, llama.cpp's and vLLM's alike, else the reason."""
    try:
        body = json.loads(exc.read() or b"null")
    except (ValueError, OSError):
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error if isinstance(error, str) else None
    return " ".join(str(message).split())[:200] if message else str(exc.reason)


def _reason(reason: object) -> str:
    return getattr(reason, "strerror", None) or str(reason)
