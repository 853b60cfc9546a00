"""Inference, shared by every command that generates text: the one place that turns a loaded model, its chat
template and end-of-turn tokens into answers.

- which model to answer with (`--model` / `--adapter` / `--base`) and what to say when it is not built yet (ask, chat,
  serve); loading it is expqa.model.loading.load_for_inference;
- how tokens are picked: params.yaml's generation section (`generation_defaults`), the options that override it
  (`add_generation_options`: ask, chat) and generate()'s arguments for it (`decoding_options`: every command that
  answers, and the evaluate stage);
- `answer`: one question as the model's own chat prompt, streamed to a TextStreamer (ask);
- `generate_answers`: answers to many prompts in left-padded batches of similar length, with whether each
  ended with an end-of-turn token (the evaluate stage's ROUGE and stop rate, the generate stage's teacher);
- `Engine`: one model, one generation at a time, a chat request's prompt checked against the context window and its
  answer streamed in pieces, cut at stop strings (serve, chat). torch is imported where generation starts, so the
  commands answer --help and argument errors without loading it.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

from expqa.config import ConfigError, GenerationConfig, load_params, section_help
from expqa.data.dataset import end_of_turn_ids, render
from expqa.progress import progress

BUILT_BY = {"models/merged": "dvc repro merge", "models/adapter": "dvc repro train", "models/base": "dvc repro base"}


# ---------------------------------------------------------------------------------------------------------------
# which model


def missing_model_message(path: Path) -> str:
    stage = BUILT_BY.get(path.as_posix(), "dvc repro")
    return f"{path} does not exist yet: build it with `{stage}` (or `make repro`), or pull it with `dvc pull`"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model / --adapter / --base, shared by `ask` and `chat`."""
    parser.add_argument(
        "--model", type=Path, default=Path("models/merged"), help="merged model directory (default: %(default)s)"
    )
    parser.add_argument("--adapter", type=Path, help="use models/base + this adapter instead of the merged model")
    parser.add_argument("--base", action="store_true", help="answer with the base model (no fine-tuning)")


def require_model(model_dir: Path, adapter: Path | None = None) -> None:
    """FileNotFoundError, saying how to build it, unless model_dir is a model (config.json) and the adapter, when
    given, an adapter (adapter_config.json): another folder would fail deep inside transformers, in a traceback."""
    wanted = [(model_dir, "config.json", "models/merged")]
    wanted += [(adapter, "adapter_config.json", "models/adapter")] if adapter else []
    for path, marker, usual in wanted:
        if not path.exists():
            raise FileNotFoundError(missing_model_message(path))
        if not (path / marker).is_file():
            built = path.as_posix() if path.as_posix() in BUILT_BY else usual
            raise FileNotFoundError(
                f"{path} has no {marker}, so it is not a {'LoRA adapter' if path == adapter else 'model'} folder; "
                f"{built} is built by `{BUILT_BY[built]}` (or pulled with `dvc pull`)"
            )


def chosen_model(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(model directory, adapter or None) as the options chose them; FileNotFoundError says how to build one."""
    model_dir = Path("models/base") if (args.base or args.adapter) else args.model
    require_model(model_dir, args.adapter)
    return model_dir, args.adapter


# ---------------------------------------------------------------------------------------------------------------
# how to pick tokens: params.yaml's generation section

GENERATION_OPTIONS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


def generation_defaults(parser: argparse.ArgumentParser, params: Path = Path("params.yaml")) -> GenerationConfig:
    """params.yaml's generation section, read from the current folder as --model's models/merged is (a command run
    in the project answers as the evaluate stage and the Modelfile do); outside a project the shipped values
    (GenerationConfig's defaults, which tests/config checks equal params.yaml's). A bad params.yaml is a usage error."""
    if not params.is_file():
        return GenerationConfig()
    try:
        return load_params(params).generation
    except ConfigError as exc:
        parser.error(str(exc))


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --repetition-penalty, --no-repeat-ngram-size (ask, chat);
    --help shows each default and the params.yaml key it comes from."""
    defaults, helps = generation_defaults(parser), section_help(GenerationConfig)
    for key in GENERATION_OPTIONS:
        value = getattr(defaults, key)
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=type(value),
            default=value,
            help=helps[key].replace("%", "%%") + f" (default: %(default)s, params.yaml generation.{key})",
        )


def chosen_generation(parser: argparse.ArgumentParser, args: argparse.Namespace) -> GenerationConfig:
    """The generation settings the options chose; invalid ones are a usage error naming the option."""
    settings = GenerationConfig(**{key: getattr(args, key) for key in GENERATION_OPTIONS})
    if errors := settings.validate():
        for key in GENERATION_OPTIONS:
            errors = [e.replace(f"generation.{key}", f"--{key.replace('_', '-')}") for e in errors]
        parser.error("; ".join(errors))
    return settings


def decoding_options(settings: GenerationConfig) -> dict:
    """generate()'s sampling options: greedy at temperature 0 (do_sample follows from the temperature), the
    repetition penalty and the n-gram ban either way. top_k is always passed: transformers' own default (50) would
    apply silently."""
    options: dict = {
        "repetition_penalty": settings.repetition_penalty,
        "no_repeat_ngram_size": settings.no_repeat_ngram_size,
    }
    if settings.temperature > 0:
        return {
            **options,
            "do_sample": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
        }
    return {**options, "do_sample": False}


def cut_note(max_new_tokens: int) -> str:
    """What ask and chat say after an answer that reached the token limit before its end (serve: finish_reason
    "length")."""
    return f"[cut at {max_new_tokens} tokens: raise --max-new-tokens]"


# ---------------------------------------------------------------------------------------------------------------
# one question, streamed (expqa ask)


def answer(model, tokenizer, question: str, settings: GenerationConfig, stream=None) -> dict:
    """{"answer", "stopped" (ended with an end-of-turn token, not at settings.max_new_tokens), "new_tokens"}."""
    import torch

    prompt = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    eos_ids = end_of_turn_ids(tokenizer)
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=eos_ids[0],
            streamer=stream,
            **decoding_options(settings),
        )
    new = output[0, ids.shape[1] :].tolist()
    stopped = bool(new) and new[-1] in eos_ids
    text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True).strip()
    return {"answer": text, "stopped": stopped, "new_tokens": len(new) - stopped}


# ---------------------------------------------------------------------------------------------------------------
# many prompts, greedy, in batches (evaluate, generate)


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_answers(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    label: str = "evaluate",
    position: int | None = None,
    decoding: dict | None = None,
) -> list[dict]:
    """Answers in left-padded batches; records whether each ended with an end-of-turn token. decoding: generate()'s
    sampling options (`decoding_options`: params.yaml's generation section); None is plain greedy decoding."""
    import torch

    with torch.no_grad():  # as a decorator it would import torch with this module
        eos_ids = end_of_turn_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        encoded_all = [
            tokenizer(render(tokenizer, m, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for m in prompts
        ]
        # batch prompts of similar length together: left padding to a long neighbour costs a full prefill
        order = sorted(range(len(prompts)), key=lambda i: len(encoded_all[i]))
        results: list[dict] = [{}] * len(prompts)
        for batch_indices in progress(
            batches(order, batch_size),
            desc=f"{label}: generate",
            unit="batch",
            total=-(-len(order) // batch_size),
            position=position,
        ):
            encoded = [encoded_all[i] for i in batch_indices]
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=model.device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
                **(decoding or {"do_sample": False}),
            )[:, width:].tolist()
            for index, tokens in zip(batch_indices, output):
                stop_at = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
                answer = tokens if stop_at is None else tokens[:stop_at]
                results[index] = {
                    "answer": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    "stopped": stop_at is not None,
                    "new_tokens": len(answer),
                }
        return results


# ---------------------------------------------------------------------------------------------------------------
# a chat request, streamed (expqa serve, expqa chat)


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, offending parameter, OpenAI error code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A chat request; the sampling fields left None take the Engine's generation settings (params.yaml's)."""

    messages: list[dict]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None


class StopText:
    """Cuts streamed text at the first stop string, holding back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """One model, one generation at a time (a lock), the model's chat template and end-of-turn tokens; settings:
    what a request does not say (params.yaml's generation section: max_new_tokens is the default max_tokens)."""

    def __init__(self, model, tokenizer, model_id: str, settings: GenerationConfig, max_tokens_limit: int = 2048):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.settings, self.max_tokens_limit = settings, max_tokens_limit
        self.default_max_tokens = min(settings.max_new_tokens, max_tokens_limit)
        self.context_window = model.config.max_position_embeddings
        self.eos_ids = end_of_turn_ids(tokenizer)
        self.lock = threading.Lock()

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        try:
            prompt = render(self.tokenizer, request.messages, add_generation_prompt=True)
        except Exception as exc:  # the template's own checks, e.g. roles that must alternate
            raise RequestError(400, f"the chat template rejects these messages: {exc}", "messages") from None
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = self.context_window - len(ids)
        if room < 1:
            raise RequestError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context window is {self.context_window} tokens",
                "messages",
                "context_length_exceeded",
            )
        if request.max_tokens is None:
            request.max_tokens = min(self.default_max_tokens, room)
        elif request.max_tokens > room:
            raise RequestError(
                400,
                f"the prompt has {len(ids)} tokens and max_tokens is {request.max_tokens}, more "
                f"than the model's context window of {self.context_window} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return ids

    def stream(self, request: ChatRequest, ids: list[int], cancel: threading.Event, result: dict):
        """Yield text pieces; fill result with finish_reason and completion_tokens. Caller holds self.lock."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        if request.seed is not None:
            torch.manual_seed(request.seed)
        asked = {key: getattr(request, key) for key in ("temperature", "top_p", "repetition_penalty")}
        settings = dataclasses.replace(self.settings, **{k: v for k, v in asked.items() if v is not None})
        input_ids = torch.tensor([ids], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        output: dict = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    output["ids"] = self.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        streamer=streamer,
                        max_new_tokens=request.max_tokens,
                        eos_token_id=self.eos_ids,
                        pad_token_id=self.eos_ids[0],
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        **decoding_options(settings),
                    )
            except Exception as exc:  # reported to the client as a 500, the server stays up
                output["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        stop = StopText(request.stop)
        try:
            for piece in streamer:
                if not stop.stopped and (text := stop.feed(piece)):
                    yield text
                if stop.stopped:
                    cancel.set()
            if not stop.stopped and (text := stop.flush()):
                yield text
        finally:
            cancel.set()  # no-op when generation is over; stops it when the consumer quit early
            worker.join()
        if "error" in output:
            raise RequestError(500, f"generation failed: {output['error']}")
        new = output["ids"][0, len(ids) :].tolist()
        ended = bool(new) and new[-1] in self.eos_ids
        result["completion_tokens"] = len(new)
        result["finish_reason"] = "stop" if ended or stop.stopped or len(new) < request.max_tokens else "length"
