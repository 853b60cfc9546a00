"""Tests for expqa.data.html_markdown: Stack Exchange post bodies (HTML) to Markdown."""

from __future__ import annotations

from html import escape

from expqa.data.html_markdown import html_to_markdown


def test_paragraphs_and_line_breaks() -> None:
    assert html_to_markdown("<p>one\ntwo</p>\n\n<p>three<br>four</p>") == "one two\n\nthree\nfour"


def test_code_block_content_is_preserved_exactly() -> None:
    code = 'def f(x):\n    if x < 1 and y > 2:\n\n\n        return "a & b"\n'
    escaped = escape(code, quote=False)
    body = f'<pre class="lang-py prettyprint-override"><code>{escaped}</code></pre>'
    assert html_to_markdown(f"<p>Try:</p>\n\n{body}") == f"Try:\n\n```py\n{code}```"


def test_code_block_containing_a_fence_gets_a_longer_fence() -> None:
    assert html_to_markdown("<pre><code>```\nx\n```\n</code></pre>") == "````\n```\nx\n```\n````"


def test_code_inside_list_and_quote_keeps_its_lines() -> None:
    html = "<ul><li><pre><code>x = 1\n    \ny = 2\n</code></pre></li></ul>"
    assert html_to_markdown(html) == "- ```\n  x = 1\n      \n  y = 2\n  ```"
    html = "<blockquote><pre><code>a\n\nb\n</code></pre></blockquote>"
    assert html_to_markdown(html) == "> ```\n> a\n>\n> b\n> ```"


def test_inline_code_and_entities() -> None:
    html = "<p>Use <code>a &lt; b</code> &amp; don&#39;t &quot;panic&quot; &mdash;</p>"
    markdown = html_to_markdown(html)
    assert markdown == 'Use `a < b` & don\'t "panic" —'


def test_latex_is_kept_verbatim() -> None:
    display = "$$\n  \\hat\\beta = (X^\\top X)^{-1} X^\\top y \\\\\n  a_i * b_j\n$$"
    html = f"<p>Inline $x_1 * y_2 = \\alpha_{{i}}$ and   spaced.</p>\n\n<p>{display}</p>"
    assert html_to_markdown(html) == f"Inline $x_1 * y_2 = \\alpha_{{i}}$ and spaced.\n\n{display}"


def test_nested_lists() -> None:
    html = "<ul>\n<li>a <strong>bold</strong></li>\n<li>b\n<ol>\n<li>one</li>\n<li>two</li>\n</ol></li>\n</ul>"
    assert html_to_markdown(html) == "- a **bold**\n- b\n  1. one\n  2. two"


def test_ordered_list_start_and_multi_paragraph_items() -> None:
    html = '<ol start="3"><li><p>first</p><p>more</p></li><li><p>second</p></li></ol>'
    assert html_to_markdown(html) == "3. first\n\n   more\n4. second"


def test_links_images_emphasis() -> None:
    html = (
        '<p>See <a href="https://e.org/?a=1&amp;b=2">the <em>docs</em></a>, '
        '<b>bold</b>, <i>it</i>, <img src="https://i.e.org/p.png" alt="plot"></p>'
    )
    assert html_to_markdown(html) == (
        "See [the *docs*](https://e.org/?a=1&b=2), **bold**, *it*, ![plot](https://i.e.org/p.png)"
    )


def test_blockquote_headings_rule_and_unknown_tags() -> None:
    html = (
        "<h2>Title</h2>\n<blockquote><p>quoted</p><p>two</p></blockquote>\n<hr>\n"
        "<p><span class='x'>kept</span> <sup>2</sup> <kbd>Ctrl</kbd></p>"
    )
    assert html_to_markdown(html) == "## Title\n\n> quoted\n>\n> two\n\n---\n\nkept 2 Ctrl"


def test_blank_line_runs_are_collapsed_and_result_stripped() -> None:
    assert html_to_markdown("\n\n<p>a<br><br><br><br>b</p>\n\n\n") == "a\n\nb"


def test_inline_code_fence_outgrows_its_backticks_and_pads_only_when_needed() -> None:
    assert html_to_markdown("<p>a <code>x`y</code> b <code>`z</code></p>") == "a ``x`y`` b `` `z ``"


def test_table_gets_a_header_row_and_a_link_keeps_its_text() -> None:
    html = (
        "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td><code>2</code></td></tr></table>"
        "<p><a href='https://x.org'>https://x.org</a></p>"
    )
    assert html_to_markdown(html) == ("| a | b |\n| --- | --- |\n| 1 | `2` |\n\n[https://x.org](https://x.org)")
