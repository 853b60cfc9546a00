"""`expqa serve`: an OpenAI-compatible chat-completions endpoint for models/merged (or base + --adapter).

    expqa serve                          # http://127.0.0.1:8000/v1, model id "expqa"
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "What is CUPED?"}]}'

POST /v1/chat/completions (non-streaming JSON, or server-sent events with "stream": true) and GET /v1/models. The
prompt is the model's own chat template. What a request leaves out (temperature, top_p, repetition_penalty as vLLM
names it, max_tokens) comes from params.yaml's generation section, as for `expqa ask`; an answer cut at max_tokens
ends with finish_reason "length". Bad requests get a 4xx JSON error in OpenAI's shape
({"error": {"message", "type", "param", "code"}}), never a crash; a response_format other than text is one (no
constrained decoding here), so that a client asking for JSON learns to ask without it instead of getting free text.

Authentication, as vLLM's and llama.cpp's servers do it: with the environment variable EXPQA_API_KEY set, every
request but GET /health needs `Authorization: Bearer <that key>` (the openai client's api_key); others get 401.
The key comes from the environment only, not from an option, so that it is not in `ps` or the shell history:

    EXPQA_API_KEY=$(openssl rand -hex 16) expqa serve --host 0.0.0.0

Bound to 127.0.0.1 unless --host says otherwise; another address without a key is refused unless --allow-no-auth
says it is meant. The port is bound before the model loads, so a port in use fails at once.

`transformers serve` was the first choice but does not fit: it needs the fastapi/uvicorn/openai extras, answers a
missing `messages` with a server error and checks neither roles nor the context window, and cannot apply an
unmerged adapter. This server uses the standard library and one model at a time.
"""

from __future__ import annotations

import argparse
import errno
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from expqa.serving.inference import ChatRequest, Engine, RequestError, generation_defaults, require_model

ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "EXPQA_API_KEY"
OPEN_PATHS = ("/health",)  # answered without a key: load balancers and `curl` checks carry none


# ---------------------------------------------------------------------------------------------------------------
# request parsing: everything a client can get wrong is a RequestError here, before the model is touched


def _number(body: dict, key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:  # the engine's default (params.yaml's generation section)
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"{key} must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(
            400, f"messages[{i}].content must be a string (or a list of text parts)", f"messages[{i}].content"
        )
    return content


def parse_chat_request(raw: bytes, model_id: str, max_tokens_limit: int) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model_id):
        raise RequestError(
            404, f"model {body['model']!r} does not exist; this server has {model_id!r}", "model", "model_not_found"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise RequestError(
                400, f"messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}", f"messages[{i}].role"
            )
        parsed.append({"role": message["role"], "content": _content(message, i)})
    if body.get("n") not in (None, 1):
        raise RequestError(400, "only n=1 is supported", "n")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        # ignoring it would return free text to a client that parses JSON; a 400 tells it to ask without
        kind = response_format.get("type") if isinstance(response_format, dict) else response_format
        raise RequestError(
            400,
            f"response_format {kind!r} is not supported: this server does not constrain its output; "
            "leave response_format out (or use {'type': 'text'})",
            "response_format",
        )
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit
    ):
        raise RequestError(
            400, f"{key} must be an integer from 1 to {max_tokens_limit} (this server's limit), got {max_tokens!r}", key
        )
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"seed must be an integer, got {seed!r}", "seed")
    options = body.get("stream_options") or {}
    return ChatRequest(
        messages=parsed,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", 1, 2),
        stop=stop,
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, fmt: str, *args) -> None:
        if self.server.verbose:
            super().log_message(fmt, *args)

    def authorized(self) -> bool:
        """True when no key is set, the path is open, or the request carries the key; otherwise answers 401."""
        key = self.server.api_key
        if key is None or self.path.rstrip("/") in OPEN_PATHS:
            return True
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        # constant time, so that the answer's timing does not tell how much of a guess was right; bytes, because
        # compare_digest takes str only when it is ASCII
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape")
        ):
            return True
        message = (
            f"missing API key: send `Authorization: Bearer <key>` (the server's {API_KEY_ENV})"
            if not given
            else "invalid API key"
        )
        # read what the client sent: closing a socket with unread data resets the connection, and the client
        # would see that instead of the 401
        length = self.headers.get("Content-Length") or ""
        if length.isdigit() and int(length) <= MAX_BODY_BYTES:
            self.rfile.read(int(length))
        self.send_json(401, RequestError(401, message, code="invalid_api_key").body(), {"WWW-Authenticate": "Bearer"})
        return False

    def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if not self.authorized():
            return
        engine = self.server.engine
        if self.path.rstrip("/") == "/v1/models":
            self.send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": engine.model_id, "object": "model", "created": self.server.started, "owned_by": "expqa"}
                    ],
                },
            )
        elif self.path.rstrip("/") == "/health":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, RequestError(404, f"no route GET {self.path}").body())

    def do_POST(self) -> None:
        if not self.authorized():
            return
        try:
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise RequestError(404, f"no route POST {self.path}; use /v1/chat/completions")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise RequestError(411, "a Content-Length header is required")
            if int(length) > MAX_BODY_BYTES:
                raise RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            request = parse_chat_request(
                self.rfile.read(int(length)), self.server.engine.model_id, self.server.engine.max_tokens_limit
            )
            self.complete(request)
        except RequestError as exc:
            self.send_json(exc.status, exc.body())
        except Exception as exc:  # a bug must cost one request, not the server
            self.send_json(500, RequestError(500, f"{type(exc).__name__}: {exc}").body())

    def complete(self, request: ChatRequest) -> None:
        engine = self.server.engine
        ids = engine.prompt_ids(request)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id}
        result: dict = {}
        cancel = threading.Event()
        with engine.lock:
            pieces = engine.stream(request, ids, cancel, result)
            if not request.stream:
                text = "".join(pieces)
                usage = {
                    "prompt_tokens": len(ids),
                    "completion_tokens": result["completion_tokens"],
                    "total_tokens": len(ids) + result["completion_tokens"],
                }
                message = {"role": "assistant", "content": text}
                self.send_json(
                    200,
                    {
                        **head,
                        "object": "chat.completion",
                        "usage": usage,
                        "choices": [
                            {"index": 0, "message": message, "finish_reason": result["finish_reason"], "logprobs": None}
                        ],
                    },
                )
                return
            first = next(pieces, "")  # errors before the first token still get a JSON status
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                self.send_chunk(head, {"role": "assistant", "content": first})
                try:
                    for piece in pieces:
                        self.send_chunk(head, {"content": piece})
                except RequestError as exc:  # headers are out: the error goes in the stream
                    self.send_event(exc.body())
                    return
                self.send_chunk(head, {}, result["finish_reason"])
                if request.include_usage:
                    usage = {
                        "prompt_tokens": len(ids),
                        "completion_tokens": result["completion_tokens"],
                        "total_tokens": len(ids) + result["completion_tokens"],
                    }
                    self.send_event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                cancel.set()  # the client went away: stop generating
                pieces.close()

    def send_chunk(self, head: dict, delta: dict, finish_reason: str | None = None) -> None:
        self.send_event(
            {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    def send_event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    """Binds and listens when made. `engine` may come later: `main` binds first, so that a port in use fails before
    the model loads, and starts answering once it is set. `api_key` None: no authentication."""

    daemon_threads = True

    def __init__(
        self,
        engine: Engine | None,
        host: str = "127.0.0.1",
        port: int = 8000,
        verbose: bool = False,
        api_key: str | None = None,
    ):
        # the socket's family from the host (HTTPServer's is IPv4 only, so --host ::1 could not bind)
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        super().__init__((host, port), Handler)
        self.engine, self.verbose, self.api_key, self.started = engine, verbose, api_key, int(time.time())


# ---------------------------------------------------------------------------------------------------------------
# command line: every check that can fail runs before the model loads, and fails in one line


class ServeError(ValueError):
    """A setting `expqa serve` cannot start with; the message names it and the fix."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may be any interface of this machine
        return False


def api_key_for(host: str, allow_no_auth: bool) -> str | None:
    """The key requests must carry (None: none), from the environment; refuses an open server off loopback."""
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ServeError(f"{API_KEY_ENV} is set but empty; set a key (e.g. `openssl rand -hex 16`) or unset it")
    if key is None and not is_loopback(host) and not allow_no_auth:
        raise ServeError(
            f"--host {host} without a key lets anyone who reaches this machine use the model; set {API_KEY_ENV} "
            "to require `Authorization: Bearer <key>`, or pass --allow-no-auth if that is meant"
        )
    return key.strip() if key is not None else None


def bind(host: str, port: int, verbose: bool, api_key: str | None) -> ChatServer:
    """The server listening on host:port, without a model yet."""
    try:
        return ChatServer(None, host, port, verbose, api_key)
    except OSError as exc:  # socket.gaierror (a host name that does not resolve) too
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is in use ({reason}); pick another with --port") from None
        if exc.errno == errno.EACCES:
            raise ServeError(f"cannot listen on port {port} ({reason}); pick one above 1023 with --port") from None
        raise ServeError(
            f"cannot listen on {host}:{port} ({reason}); --host must be an address of this machine"
        ) from None


def auth_line(api_key: str | None, host: str) -> str:
    """Whether requests need a key (never the key itself)."""
    if api_key is not None:
        return f"auth: on (requests need `Authorization: Bearer <key>`, the key in {API_KEY_ENV}; /health is open)"
    if is_loopback(host):
        return f"auth: off (loopback only; set {API_KEY_ENV} to require a key)"
    return f"auth: off (--allow-no-auth): anyone who reaches {host} can use the model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="expqa serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("models/merged"), help="merged model directory")
    parser.add_argument("--adapter", type=Path, help="serve models/base + this adapter instead of the merged model")
    parser.add_argument(
        "--host", default="127.0.0.1", help=f"address to bind; other than loopback it needs {API_KEY_ENV} set"
    )
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    parser.add_argument(
        "--allow-no-auth",
        action="store_true",
        help=f"serve a non-loopback --host without {API_KEY_ENV}: anyone who reaches it can use the model",
    )
    parser.add_argument("--model-id", default="expqa", help="the id clients pass as `model`")
    parser.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    settings = generation_defaults(parser)
    model_dir = Path("models/base") if args.adapter else args.model
    try:
        api_key = api_key_for(args.host, args.allow_no_auth)
        require_model(model_dir, args.adapter)
        server = bind(args.host, args.port, args.verbose, api_key)
    except (ServeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from expqa.model.loading import load_for_inference

        model, tokenizer = load_for_inference(model_dir, args.adapter)
        server.engine = Engine(model, tokenizer, args.model_id, settings, args.max_tokens)
        print(
            f"serving {args.adapter or model_dir} as {args.model_id!r} on http://{args.host}:{server.server_port}/v1 "
            "(Ctrl-C stops)",
            flush=True,
        )
        print(auth_line(api_key, args.host), flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
