"""An Ollama Modelfile for an exported GGUF: FROM, a TEMPLATE in Ollama's Go-template syntax that renders what the
model's own chat template renders, a stop PARAMETER per end-of-turn token, and params.yaml's generation settings as
Ollama's PARAMETERs (so `ollama run` answers as `expqa ask` does).

The template is not written per model family: the literal text around each message (system, user and assistant
openers and closers, the default system turn, the generation prompt) is read off the chat template's own renderings
of placeholder messages, then checked by rendering probe conversations both ways.
"""

from __future__ import annotations

from expqa.config import GenerationConfig
from expqa.data.dataset import end_of_turn_ids, render

MARKS = {name: f"\ue000{name}\ue000" for name in ("S", "U", "A", "V")}  # private-use characters: never in a template


class TemplateError(ValueError):
    """The chat template does not have the per-message shape a Go template can reproduce."""


def _split(text: str, *marks: str) -> list[str]:
    parts = []
    for mark in marks:
        if mark not in text:
            raise TemplateError(f"the chat template drops message content {mark!r}")
        before, text = text.split(mark, 1)
        parts.append(before)
    return parts + [text]


def _strip(text: str, part: str, *, prefix: bool) -> str:
    if not (text.startswith(part) if prefix else text.endswith(part)):
        raise TemplateError(f"{text!r} does not {'start' if prefix else 'end'} with {part!r}")
    return text[len(part) :] if prefix else text[: len(text) - len(part)]


def adds_bos(tokenizer) -> bool:
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def turn_segments(tokenizer) -> dict[str, str]:
    """The literal text around each message, read off the chat template's renderings of placeholder messages."""
    s, u, a, v = MARKS.values()
    msg = [
        {"role": "system", "content": s},
        {"role": "user", "content": u},
        {"role": "assistant", "content": a},
        {"role": "user", "content": v},
    ]
    full = _split(render(tokenizer, msg, add_generation_prompt=True), s, u, a, v)
    lone = _split(render(tokenizer, msg[1:2]), u)
    lone_gen = _split(render(tokenizer, msg[1:2], add_generation_prompt=True), u)
    pair = _split(render(tokenizer, msg[1:3]), u, a)
    seg = {"user_close": lone[1], "gen": _strip(lone_gen[1], lone[1], prefix=True), "assistant_close": pair[2]}
    seg["assistant_open"] = _strip(full[2], seg["user_close"], prefix=True)
    seg["user_open"] = _strip(full[3], seg["assistant_close"], prefix=True)
    seg["system_close"] = _strip(full[1], seg["user_open"], prefix=False)
    # the BOS the template writes itself is left to the runtime when the tokenizer adds it (llama.cpp, Ollama do)
    seg["bos"] = tokenizer.bos_token if adds_bos(tokenizer) and full[0].startswith(tokenizer.bos_token) else ""
    seg["system_open"] = _strip(full[0], seg["bos"], prefix=True)
    seg["default_system"] = _strip(_strip(lone[0], seg["bos"], prefix=True), seg["user_open"], prefix=False)
    return seg


def compose(seg: dict[str, str], messages: list[dict]) -> str:
    """What the Go template renders (plus the BOS the runtime adds), in Python: checked against the chat template."""
    text = seg["bos"] + ("" if messages and messages[0]["role"] == "system" else seg["default_system"])
    for m in messages:
        text += seg[f"{m['role']}_open"] + m["content"] + seg[f"{m['role']}_close"]
    return text + seg["gen"]


def go_template(seg: dict[str, str]) -> str:
    """Ollama TEMPLATE: no whitespace-trimming `{{-`, so every newline of the chat template is kept as is."""
    turns = "{{ else if ".join(
        f'eq .Role "{role}" }}}}{seg[role + "_open"]}{{{{ .Content }}}}{seg[role + "_close"]}'
        for role in ("system", "user", "assistant")
    )
    return (
        f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{seg["default_system"]}'
        f"{{{{ end }}}}{{{{ range .Messages }}}}{{{{ if {turns}{{{{ end }}}}{{{{ end }}}}{seg['gen']}"
    )


def checked_template(tokenizer) -> str:
    seg = turn_segments(tokenizer)
    probes = [
        [{"role": "user", "content": "What is a p-value?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define power."}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is CUPED?"},
        ],
    ]
    for messages in probes:
        if compose(seg, messages) != render(tokenizer, messages, add_generation_prompt=True):
            raise TemplateError(f"the chat template renders {messages} differently from a per-message template")
    if any("{{" in part or '"""' in part for part in seg.values()):
        raise TemplateError("the chat template's text contains '{{' or '\"\"\"', which a Modelfile cannot quote")
    return go_template(seg)


def generation_parameters(settings: GenerationConfig) -> list[str]:
    """params.yaml's generation section in Ollama's names. temperature 0 is greedy in llama.cpp too. transformers
    penalises every token of the prompt and answer; Ollama's repeat_penalty looks back repeat_last_n tokens (64 by
    default), so -1 (the whole context) is the nearest. Ollama's engine written in Go (ollamarunner) has ignored the
    penalties (ollama issue #15783); its llama.cpp runner applies them. no_repeat_ngram_size has no counterpart: a
    comment says it is left out, so Ollama's answers may repeat where expqa's do not."""
    unmirrored = (
        [f"# no_repeat_ngram_size {settings.no_repeat_ngram_size} (params.yaml generation) has no Ollama PARAMETER"]
        if settings.no_repeat_ngram_size
        else []
    )
    return unmirrored + [
        f"PARAMETER temperature {settings.temperature:g}",
        f"PARAMETER top_p {settings.top_p:g}",
        f"PARAMETER top_k {settings.top_k}",
        f"PARAMETER repeat_penalty {settings.repetition_penalty:g}",
        "PARAMETER repeat_last_n -1",
        f"PARAMETER num_predict {settings.max_new_tokens}",
    ]


def modelfile(tokenizer, gguf_file: str, settings: GenerationConfig) -> str:
    """Modelfile text: `ollama create expqa -f Modelfile` in the folder of gguf_file."""
    lines = ["# Ollama: ollama create expqa -f Modelfile && ollama run expqa", f"FROM ./{gguf_file}"]
    try:
        lines.append(f'TEMPLATE """{checked_template(tokenizer)}"""')
    except TemplateError as exc:
        lines.append(f"# TEMPLATE not written ({exc}); Ollama falls back to its reading of the GGUF chat template")
    for token_id in end_of_turn_ids(tokenizer):
        lines.append(f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(token_id)}"')
    lines += generation_parameters(settings)
    return "\n".join(lines) + "\n"
