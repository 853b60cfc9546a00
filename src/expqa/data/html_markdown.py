"""Stack Exchange post bodies (HTML) to Markdown: `html_to_markdown`, used by expqa.data.stackexchange.

Stack Exchange bodies are sanitised, well-formed HTML rendered from Markdown, so a small tree
builder (the standard library's HTMLParser) plus a recursive renderer is enough. Text is never
Markdown-escaped: the bodies were written as Markdown and TeX in the first place, and escaping
would mangle `$a_i * b$`. Whitespace is collapsed as a browser would, except inside `$...$` /
`$$...$$` spans and code, which are kept exactly as written.

Why not a library (compared on 2026-11-29 with the shipped sample's 44 bodies and this module's
tests, tests/data/test_html_markdown.py):
- markdownify 1.2.3 (BeautifulSoup), with heading_style="ATX", bullets="-", no escaping,
  code_language_callback for `lang-*` classes: all 44 sample bodies identical, but 5 of the 11
  tests fail. It keeps newlines inside paragraphs ("one\\ntwo", not "one two"); ends a <br> line
  with a backslash or two spaces; strips the indentation of lines inside display math ("$$\\n  \\hat\\beta"
  becomes "$$\\n\\hat\\beta"); always fences code with ``` even when the code holds ```; renders
  <kbd> as inline code; pads inline code holding a backtick with spaces (`` x`y ``). Matching it
  took a subclass overriding five methods (process_text re-implemented with this module's
  TeX-aware whitespace rule, br, code, kbd, pre) plus a blank-line fix that must skip code, so
  the delicate parts stayed here anyway, at 4x the time per body (0.53 ms against 0.13 ms) and
  three more dependencies (markdownify, beautifulsoup4, soupsieve).
- html2text 2025.4.15 (body_width=0, "-" bullets, no escaping): 16 of the 44 sample bodies
  differ: indented instead of fenced code blocks (language lost), display math joined onto one
  line ("$$ n = \\frac{...} $$"), list items indented by two spaces, "—" written as "--".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "source"})
BLOCK_TAGS = frozenset(
    {
        "p",
        "div",
        "pre",
        "ul",
        "ol",
        "blockquote",
        "hr",
        "table",
        "dl",
        "dt",
        "dd",
        "details",
        "summary",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
    }
)
# Dollar-delimited TeX: display math first so `$$x$$` is not read as two inline spans.
# `\$` is a literal dollar on MathJax-enabled sites, so it never opens or closes math.
MATH_RE = re.compile(r"(?<!\\)\$\$.+?(?<!\\)\$\$|(?<!\\)\$[^$]+?(?<!\\)\$", re.DOTALL)
WHITESPACE_RE = re.compile(r"\s+")
LINE_END_SPACE_RE = re.compile(r"[ \t]*\n[ \t]*")
BLANK_RUN_RE = re.compile(r"\n{3,}")


@dataclass
class _Node:
    """One HTML element (tag) or text run (tag is None, text set)."""

    tag: str | None
    attrs: dict[str, str] = field(default_factory=dict)
    children: list[_Node] = field(default_factory=list)
    text: str = ""


class _TreeBuilder(HTMLParser):
    """Builds a `_Node` tree; stray end tags are ignored, unclosed tags closed at the end."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # text arrives with entities unescaped
        self.root = _Node("root")
        self._stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = _Node(tag, {name: value or "" for name, value in attrs})
        self._stack[-1].children.append(node)
        if tag not in VOID_TAGS:
            self._stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._stack[-1].children.append(_Node(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        # Pop up to the matching open tag, which also closes implicitly-closed <p>/<li>.
        for depth in range(len(self._stack) - 1, 0, -1):
            if self._stack[depth].tag == tag:
                del self._stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._stack[-1].children.append(_Node(None, text=data))


def html_to_markdown(html_text: str) -> str:
    """Convert a Stack Exchange post body (HTML) to Markdown; TeX and code are kept verbatim."""
    builder = _TreeBuilder()
    builder.feed(html_text)
    builder.close()
    return _join_blocks(_render_blocks(builder.root)).strip()


def _render_blocks(node: _Node) -> list[tuple[str, str]]:
    """Render a container's children as (kind, markdown) blocks; inline runs become paragraphs."""
    blocks: list[tuple[str, str]] = []
    inline: list[_Node] = []
    for child in node.children:
        if child.tag in BLOCK_TAGS or child.tag in {"li", "tr", "thead", "tbody", "tfoot"}:
            _flush_paragraph(inline, blocks)
            blocks.extend(_render_block(child))
        else:
            inline.append(child)
    _flush_paragraph(inline, blocks)
    return blocks


def _flush_paragraph(inline: list[_Node], blocks: list[tuple[str, str]]) -> None:
    """Turn pending inline nodes into one paragraph block; whitespace between blocks is dropped."""
    text = _tidy_paragraph(_render_inline_nodes(inline))
    if text:
        blocks.append(("p", text))
    inline.clear()


def _tidy_paragraph(text: str) -> str:
    """Strip line ends and collapse blank-line runs that <br>s or joins can produce."""

    def tidy(prose: str) -> str:
        if "\n" not in prose:
            return prose
        return BLANK_RUN_RE.sub("\n\n", LINE_END_SPACE_RE.sub("\n", prose))

    return _map_outside_math(text, tidy).strip()


def _join_blocks(blocks: list[tuple[str, str]], tight: bool = False) -> str:
    """Join blocks with blank lines; in tight list items a nested list follows on the next line."""
    parts: list[str] = []
    for index, (kind, text) in enumerate(blocks):
        if index:
            parts.append("\n" if tight and kind == "list" else "\n\n")
        parts.append(text)
    return "".join(parts)


def _render_block(node: _Node) -> list[tuple[str, str]]:
    """Render one block-level element."""
    tag = node.tag or ""
    if tag == "pre":
        return [("code", _render_code_block(node))]
    if tag in {"ul", "ol"}:
        text = _render_list(node)
        return [("list", text)] if text else []
    if tag == "blockquote":
        inner = _join_blocks(_render_blocks(node))
        return [("quote", _prefix_lines(inner, "> ", ">"))] if inner else []
    if tag == "hr":
        return [("hr", "---")]
    if len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
        text = " ".join(_render_inline_nodes(node.children).split())
        return [("heading", f"{'#' * int(tag[1])} {text}")] if text else []
    if tag == "table":
        text = _render_table(node)
        return [("table", text)] if text else []
    # div, dl, li outside a list, tr outside a table, ...: keep the content, drop the wrapper.
    return _render_blocks(node)


def _render_code_block(pre: _Node) -> str:
    """A fenced block whose content is the <pre>'s text exactly (entities already unescaped)."""
    code = "".join(_raw_text(pre))
    code = code[:-1] if code.endswith("\n") else code  # the dump ends every block with "\n"
    longest_run = max((len(run) for run in re.findall(r"`{3,}", code)), default=2)
    fence = "`" * (longest_run + 1)
    return f"{fence}{_code_language(pre)}\n{code}\n{fence}"


def _code_language(pre: _Node) -> str:
    """The language from class="lang-python" / "language-r" on <pre> or its <code>, else ''."""
    for node in [pre, *[child for child in pre.children if child.tag == "code"]]:
        for css_class in node.attrs.get("class", "").split():
            for prefix in ("lang-", "language-"):
                if css_class.startswith(prefix) and css_class != "lang-none":
                    return css_class[len(prefix) :]
    return ""


def _raw_text(node: _Node) -> Iterator[str]:
    """All text below a node, untouched; <br> counts as a newline."""
    for child in node.children:
        if child.tag is None:
            yield child.text
        elif child.tag == "br":
            yield "\n"
        else:
            yield from _raw_text(child)


def _render_list(node: _Node) -> str:
    """`- ` or `1. ` items; continuation lines and nested lists indent under the item text."""
    ordered = node.tag == "ol"
    start = int(node.attrs.get("start", "1")) if node.attrs.get("start", "").isdigit() else 1
    items: list[str] = []
    for child in node.children:
        if child.tag != "li":
            continue  # whitespace between <li>s; anything else is invalid inside a list
        marker = f"{start + len(items)}. " if ordered else "- "
        body = _join_blocks(_render_blocks(child), tight=True)
        indented = _prefix_lines(body, " " * len(marker), "")
        items.append(marker + indented[len(marker) :] if body else marker.rstrip())
    return "\n".join(items)


def _prefix_lines(text: str, prefix: str, empty_line: str) -> str:
    """Prefix every line; empty lines get `empty_line` (whitespace-only code lines keep theirs)."""
    return "\n".join(prefix + line if line else empty_line for line in text.split("\n"))


def _render_table(table: _Node) -> str:
    """A pipe table; the first row is the header (Markdown tables need one)."""
    rows = [row for row in _iter_descendants(table) if row.tag == "tr"]
    lines: list[str] = []
    for row in rows:
        cells = [child for child in row.children if child.tag in {"td", "th"}]
        texts = [" ".join(_render_inline_nodes(cell.children).split()) for cell in cells]
        lines.append("| " + " | ".join(texts) + " |")
        if len(lines) == 1:
            lines.append("|" + "|".join(" --- " for _ in cells) + "|")
    return "\n".join(lines)


def _iter_descendants(node: _Node) -> Iterator[_Node]:
    for child in node.children:
        yield child
        yield from _iter_descendants(child)


def _render_inline_nodes(nodes: list[_Node]) -> str:
    """Concatenate inline renderings, never doubling the whitespace at a node boundary."""
    out = ""
    for node in nodes:
        piece = _render_inline(node)
        if out and out[-1] in " \n" and piece[:1] == " ":
            piece = piece.lstrip(" ")
        out += piece
    return out


def _render_inline(node: _Node) -> str:
    """Render text or one inline element (unknown elements keep their text)."""
    if node.tag is None:
        return _collapse_whitespace_outside_math(node.text)
    tag = node.tag
    if tag == "br":
        return "\n"
    if tag == "img":
        return f"![{node.attrs.get('alt', '')}]({node.attrs.get('src', '')})"
    if tag == "code":
        return _code_span("".join(_raw_text(node)))
    if tag in BLOCK_TAGS or tag == "li":  # a block inside inline context, e.g. <p> in <a>
        return " " + _join_blocks(_render_blocks(node)) + " "
    inner = _render_inline_nodes(node.children)
    if tag in {"strong", "b"}:
        return _wrap_emphasis(inner, "**")
    if tag in {"em", "i"}:
        return _wrap_emphasis(inner, "*")
    if tag == "a" and node.attrs.get("href"):
        href = node.attrs["href"]
        return f"[{inner.strip()}]({href})" if inner.strip() else f"<{href}>"
    return inner


def _collapse_whitespace_outside_math(text: str) -> str:
    """HTML whitespace rules for prose; TeX spans are returned exactly as written."""
    return _map_outside_math(text, lambda prose: WHITESPACE_RE.sub(" ", prose))


def _map_outside_math(text: str, transform: Callable[[str], str]) -> str:
    """Apply `transform` to the prose between TeX spans, leaving the spans untouched."""
    if "$" not in text:  # the common case, and the hot path on large dumps
        return transform(text)
    pieces: list[str] = []
    position = 0
    for match in MATH_RE.finditer(text):
        pieces.append(transform(text[position : match.start()]))
        pieces.append(match.group())
        position = match.end()
    pieces.append(transform(text[position:]))
    return "".join(pieces)


def _wrap_emphasis(inner: str, marker: str) -> str:
    """`**x**`, keeping surrounding spaces outside the markers (`** x **` is not emphasis)."""
    core = inner.strip()
    if not core:
        return inner
    lead = inner[: len(inner) - len(inner.lstrip())]
    trail = inner[len(inner.rstrip()) :]
    return f"{lead}{marker}{core}{marker}{trail}"


def _code_span(code: str) -> str:
    """Inline code with a backtick fence longer than any run inside it."""
    code = code.replace("\n", " ")
    longest_run = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * (longest_run + 1)
    pad = " " if code.startswith("`") or code.endswith("`") else ""
    return f"{fence}{pad}{code}{pad}{fence}"
