"""`expqa chat`: talk to the merged model (or base + --adapter, or --base) in the terminal, model loaded once.

    expqa chat                                  # models/merged, params.yaml's generation settings (greedy)
    expqa chat --temperature 0.7 --seed 1       # sampled
    printf 'What is CUPED?\\nAnd its variance?\\n' | expqa chat   # scripted: one question per line

Answers stream token by token, each followed by a blank line; scripted, each question is echoed first as "> question"
(the transcript a terminal shows), so answers that span lines stay apart. An answer that reaches --max-new-tokens
before its end is followed by a note on stderr, where /command replies and the other notes go. The conversation is
kept and sent with every question; when it no longer fits the context window (minus room for the answer) the oldest
exchanges are dropped, and the chat says so. Commands:
/reset forgets the conversation, /system <text> sets the system prompt (/system alone shows it), /exit or Ctrl-D
quits; Ctrl-C stops the answer being written, not the chat. Generation is serving/inference.py's Engine (the same
prompt, end of turn and stop handling as `expqa serve`).
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable

from expqa.data.dataset import render
from expqa.serving.inference import (
    ChatRequest,
    Engine,
    RequestError,
    add_generation_options,
    add_model_options,
    chosen_generation,
    chosen_model,
    cut_note,
)

COMMANDS = "/reset (forget the conversation), /system [text] (show or set the system prompt), /exit (or Ctrl-D)"


class ContextFull(ValueError):
    """The newest question (with the system prompt) alone does not fit the context window's budget."""

    def __init__(self, tokens: int, budget: int):
        super().__init__(f"{tokens} tokens, over a budget of {budget}")
        self.tokens, self.budget = tokens, budget


def trim_history(
    messages: list[dict], count_tokens: Callable[[list[dict]], int], budget: int
) -> tuple[list[dict], int]:
    """Drop the oldest exchanges (a question and its answer) until count_tokens(messages) <= budget.

    messages: an optional system message, then user/assistant exchanges, then the newest question. The system
    message and the newest question are always kept (ContextFull when they alone are too long). Returns the kept
    messages and the number of exchanges dropped.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while (tokens := count_tokens(system + turns)) > budget:
        if len(turns) <= 1:
            raise ContextFull(tokens, budget)
        turns = turns[2:]
        dropped += 1
    return system + turns, dropped


class ChatSession:
    """One conversation with one loaded model: the system prompt, the exchanges so far, the answers' length (the
    engine's settings pick the tokens), whether the last answer was cut at that length."""

    def __init__(self, engine: Engine, *, max_new_tokens: int, system: str | None = None):
        if max_new_tokens >= engine.context_window:
            raise ValueError(
                f"--max-new-tokens {max_new_tokens} leaves no room for a question in the "
                f"{engine.context_window}-token context window"
            )
        self.engine, self.max_new_tokens, self.system = engine, max_new_tokens, system
        self.history: list[dict] = []  # user/assistant messages, oldest first
        self.cut = False

    def prompt_tokens(self, messages: list[dict]) -> int:
        prompt = render(self.engine.tokenizer, messages, add_generation_prompt=True)
        return len(self.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def reply(self, question: str, write: Callable[[str], None], note: Callable[[str], None]) -> str:
        """Answer with the conversation so far, passing the text to write as it comes; remember the exchange.

        Ctrl-C (KeyboardInterrupt) while answering stops generation and keeps what was written so far.
        """
        system = [{"role": "system", "content": self.system}] if self.system else []
        budget = self.engine.context_window - self.max_new_tokens
        messages, dropped = trim_history(
            system + self.history + [{"role": "user", "content": question}], self.prompt_tokens, budget
        )
        if dropped:
            note(
                f"[history trimmed: dropped the oldest {dropped} exchange{'s' * (dropped > 1)} to fit the "
                f"{self.engine.context_window}-token context window ({self.max_new_tokens} kept for the answer)]"
            )
        request = ChatRequest(messages=messages, max_tokens=self.max_new_tokens)
        result: dict = {}
        self.cut = False
        pieces = self.engine.stream(request, self.engine.prompt_ids(request), threading.Event(), result)
        written, stopped = [], False
        try:
            for piece in pieces:
                write(piece)
                written.append(piece)
        except KeyboardInterrupt:
            pieces.close()  # sets the generator's cancel event and waits for generation to stop
            stopped = True
            note(" [stopped]")
        self.cut = result.get("finish_reason") == "length"  # absent when stopped: Ctrl-C is no cut
        text = "".join(written).strip()
        self.history = messages[len(system) : -1]  # what survived trimming
        if text or not stopped:  # a question stopped before any answer is forgotten with it
            self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
        return text

    def command(self, line: str, say: Callable[[str], None]) -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, rest = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.history = []
            say("[conversation forgotten; the system prompt is kept]")
        elif name == "/system" and rest.strip():
            self.system = rest.strip()
            say("[system prompt set; the conversation is kept (/reset forgets it)]")
        elif name == "/system":
            say(
                f"system prompt: {self.system}"
                if self.system
                else "no system prompt set (the model's chat template may add its own default)"
            )
        else:
            say(f"unknown command {name}; commands: {COMMANDS}")
        return True


def chat_loop(
    session: ChatSession,
    read_line: Callable[[], str | None],
    write: Callable[[str], None],
    note: Callable[[str], None],
    echo: bool = False,
) -> None:
    """Questions and commands until /exit or the end of input (read_line returns None). echo: write each question
    as "> question" first (input that is not a terminal shows no prompt of its own)."""
    while (line := read_line()) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line, note):
                return
            continue
        if echo:
            write(f"> {line}\n")
        try:
            session.reply(line, write, note)
        except KeyboardInterrupt:  # Ctrl-C while the prompt is prepared (reply handles it from generation on)
            note(" [stopped]")
            continue
        except RequestError as exc:  # a template that rejects the messages, a failed generation: not fatal
            note(f"error: {exc}")
            continue
        except ContextFull as exc:
            note(
                f"error: the prompt for this question{' (with the system prompt)' if session.system else ''} is "
                f"{exc.tokens} tokens; the context window minus --max-new-tokens {session.max_new_tokens} leaves "
                f"{exc.budget}: shorten it or lower --max-new-tokens"
            )
            continue
        write("\n")  # ends the answer's last line
        if session.cut:
            note(cut_note(session.max_new_tokens))
        write("\n")  # a blank line between one exchange and the next


def terminal_reader(prompt: str) -> Callable[[], str | None]:
    """input() with line editing; Ctrl-C at the prompt clears the line, Ctrl-D ends."""
    try:
        import readline  # noqa: F401  (arrow keys and history for input())
    except ImportError:
        pass

    def read_line() -> str | None:
        try:
            return input(prompt)
        except EOFError:
            print()
            return None
        except KeyboardInterrupt:
            print()
            return ""

    return read_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="expqa chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_options(parser)
    parser.add_argument("--system", help="system prompt to start with (the /system command changes it)")
    add_generation_options(parser)
    parser.add_argument("--seed", type=int, help="seed for sampling (once, at the start)")
    parser.add_argument(
        "--context-window", type=int, help="tokens of conversation kept (default: the model's max_position_embeddings)"
    )
    args = parser.parse_args(argv)
    settings = chosen_generation(parser, args)
    try:
        model_dir, adapter = chosen_model(args)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"loading {adapter or model_dir} ...", file=sys.stderr, flush=True)
    import torch

    from expqa.model.loading import load_for_inference

    model, tokenizer = load_for_inference(model_dir, adapter)
    engine = Engine(model, tokenizer, "expqa", settings, max_tokens_limit=settings.max_new_tokens)
    if args.context_window:
        engine.context_window = min(args.context_window, engine.context_window)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        session = ChatSession(engine, max_new_tokens=settings.max_new_tokens, system=args.system)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def note(text: str) -> None:  # stderr, so that piped stdout holds the answers only
        print(text, file=sys.stderr, flush=True)

    if interactive:
        note(
            f"chatting with {adapter or model_dir} ({engine.context_window}-token context, "
            f"{'greedy' if settings.temperature == 0 else f'temperature {settings.temperature:g}'}, repetition "
            f"penalty {settings.repetition_penalty:g}); Ctrl-C stops an answer"
        )
        note(f"commands: {COMMANDS}")
        chat_loop(session, terminal_reader("> "), write, note)
    else:
        chat_loop(session, lambda: sys.stdin.readline() or None, write, note, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
