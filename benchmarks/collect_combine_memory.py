"""Peak memory and time of the collect and combine stages on large generated inputs.

    python benchmarks/collect_combine_memory.py combine --rows 1000000
    python benchmarks/collect_combine_memory.py collect-7z --rows 1000000   # a site's .7z, as distributed

Each part generates its input in a temporary directory, runs the stage in a subprocess (so
the generator's memory is not counted) and prints elapsed seconds and the subprocess's peak
RSS from resource.getrusage(RUSAGE_CHILDREN).ru_maxrss. Each part adds its subcommand to
PART_PARSERS at the bottom of the file.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def peak_child_rss_mib() -> float:
    """Largest resident set of any finished child process, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def child_cpu_s() -> float:
    """CPU seconds used by finished child processes: steadier than wall time on a busy box."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- combine ----------------------------------------------------------------------------------

_WORDS = (
    "variance treatment control uplift power sample size p-value bootstrap confidence interval "
    "bayesian prior posterior stratification cuped novelty effect sequential testing peeking "
    "false discovery rate bonferroni heterogeneity regression covariate randomisation unit "
    "metric guardrail ratio delta method cluster robust standard error experiment"
).split()
# In the combine input every 50th row repeats an earlier row: 2 % duplicates, alternately
# exact copies and normalised variants (different case and trailing punctuation).
_DUPLICATE_EVERY = 50


def _combine_row(index: int) -> dict[str, Any]:
    """The index-th generated conversation (~1 KB), the same on every call."""
    rng = random.Random(index)
    question = " ".join(rng.choices(_WORDS, k=18)) + f" (case {index})?"
    answer = " ".join(rng.choices(_WORDS, k=80)) + "."
    return {
        "id": f"bench-{index}",
        "source": "cross_validated" if index % 5 < 3 else "arxiv_synthetic",
        "messages": [
            {"role": "system", "content": "You are an experimentation and statistics expert."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
    }


def _duplicate_row(index: int) -> dict[str, Any]:
    """A duplicate of an earlier row, with its own id: exact or normalised-text variant."""
    # A non-duplicate row from the first half of the file so far (a multiple of 50).
    original = _combine_row(index // 2 // _DUPLICATE_EVERY * _DUPLICATE_EVERY)
    if index // _DUPLICATE_EVERY % 2:
        for message in original["messages"][1:]:
            message["content"] = message["content"].upper() + "!!"
    original["id"] = f"bench-dup-{index}"
    return original


def write_combine_input(path: Path, n_rows: int) -> int:
    """Stream ``n_rows`` generated ChatML rows to ``path``; returns the file size in bytes."""
    with open(path, "w", encoding="utf-8") as out:
        for index in range(n_rows):
            is_duplicate = index % _DUPLICATE_EVERY == _DUPLICATE_EVERY - 1
            row = _duplicate_row(index) if is_duplicate else _combine_row(index)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path.stat().st_size


_COMBINE_CHILD = """
import json, sys
from pathlib import Path
from expqa.data.combine import combine_datasets
from expqa.config import DataConfig
data = DataConfig(weights={"cross_validated": 2.0, "arxiv_synthetic": 1.0}, test_fraction=0.10, val_fraction=0.05,
                  on_invalid="error", sources=[])
manifest = combine_datasets([Path(sys.argv[1])], Path(sys.argv[2]), data, seed=42)
print(json.dumps(manifest["totals"], sort_keys=True))
"""


def bench_combine(n_rows: int) -> dict[str, Any]:
    """Generate ``n_rows`` rows, run combine_datasets on them in a subprocess, report cost."""
    with tempfile.TemporaryDirectory(prefix="expqa-bench-combine-") as tmp:
        input_path = Path(tmp) / "generated.jsonl"
        started = time.perf_counter()
        input_bytes = write_combine_input(input_path, n_rows)
        generate_s = time.perf_counter() - started
        started, cpu_before = time.perf_counter(), child_cpu_s()
        child = subprocess.run(
            [sys.executable, "-c", _COMBINE_CHILD, str(input_path), str(Path(tmp) / "combined")],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        elapsed_s, cpu_s = time.perf_counter() - started, child_cpu_s() - cpu_before
        if child.returncode != 0:
            raise SystemExit(f"combine failed (exit {child.returncode}):\n{child.stderr}")
    return {
        "part": "combine",
        "rows": n_rows,
        "input_mib": round(input_bytes / 2**20, 1),
        "generate_s": round(generate_s, 1),
        "elapsed_s": round(elapsed_s, 1),
        "cpu_s": round(cpu_s, 1),
        "peak_rss_mib": round(peak_child_rss_mib(), 1),
        "totals": json.loads(child.stdout),
    }


def add_combine_parser(parts: argparse._SubParsersAction) -> None:
    parser = parts.add_parser("combine", help="combine_datasets on a generated ChatML file")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate")
    parser.set_defaults(run=lambda args: bench_combine(args.rows))


# --- collect ----------------------------------------------------------------------------------

_COLLECT_TAGS = (
    "ab-testing",
    "hypothesis-testing",
    "statistical-power",
    "sample-size",
    "p-value",
    "bayesian",
    "bootstrap",
    "variance-reduction",
    "t-test",
    "experiment-design",
)
_OTHER_TAGS = ("r", "ggplot2", "time-series", "regression", "machine-learning")
# Answers per question cycle through this pattern: as many answers as questions, and some
# questions with none or with competing answers.
_ANSWERS_PER_QUESTION = (0, 1, 2, 1)


def _collect_body(rng: random.Random, index: int) -> str:
    """A ~1 KB post body in the dump's HTML: prose with TeX, a list and a Python block."""

    def words(k: int) -> str:
        return " ".join(rng.choices(_WORDS, k=k))

    return (
        f"<p>{words(28)} with $\\hat{{\\theta}}_{{{index}}} = \\bar{{y}}_1 - \\bar{{y}}_0$ "
        f"&amp; {words(12)}.</p>\n\n"
        f"<ul>\n<li><strong>{words(3)}</strong>: {words(10)}</li>\n"
        f'<li>see <a href="https://example.org/{index}">{words(2)}</a> &mdash; '
        f"{words(8)}</li>\n</ul>\n\n"
        f'<pre class="lang-py prettyprint-override"><code>import numpy as np\n\n'
        f"def effect(y1, y0):\n    return np.mean(y1) - np.mean(y0)  # {words(4)}\n"
        f"print(effect(a, b) &lt; {rng.random():.3f})\n</code></pre>\n\n"
        f"<p>$$\\operatorname{{Var}}(\\hat\\theta) = \\frac{{\\sigma^2}}{{n}}$$ {words(25)}</p>\n"
    )


def _xml_attribute(value: str) -> str:
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\n", "&#xA;")
    )


def _post_row(attributes: dict[str, Any]) -> str:
    text = " ".join(f'{name}="{_xml_attribute(str(value))}"' for name, value in attributes.items())
    return f"  <row {text} />\n"


def _question_row(rng: random.Random, qid: int, answer_ids: list[int]) -> str:
    tags = rng.sample(_COLLECT_TAGS if rng.random() < 0.7 else _OTHER_TAGS, 2)
    attributes = {"Id": qid, "PostTypeId": 1}
    if answer_ids and qid % 3:
        attributes["AcceptedAnswerId"] = answer_ids[0]
    attributes.update(
        {
            "CreationDate": "2021-03-04T05:06:07.890",
            "Score": rng.randint(-1, 30),
            "ViewCount": rng.randint(10, 50_000),
            "Body": _collect_body(rng, qid),
            "OwnerUserId": rng.randint(1, 100_000),
            "Title": " ".join(rng.choices(_WORDS, k=9)) + "?",
            # Newer dumps write |a|b|, older ones <a><b>: generate both.
            "Tags": f"|{tags[0]}|{tags[1]}|" if qid % 2 else f"<{tags[0]}><{tags[1]}>",
            "AnswerCount": len(answer_ids),
            "CommentCount": 0,
            "ContentLicense": "CC BY-SA 4.0",
        }
    )
    return _post_row(attributes)


def _answer_row(rng: random.Random, aid: int, qid: int) -> str:
    return _post_row(
        {
            "Id": aid,
            "PostTypeId": 2,
            "ParentId": qid,
            "CreationDate": "2021-03-05T05:06:07.890",
            "Score": rng.randint(-1, 25),
            "Body": _collect_body(rng, aid),
            "OwnerUserId": rng.randint(1, 100_000),
            "CommentCount": 0,
            "ContentLicense": "CC BY-SA 4.0",
        }
    )


def write_posts_xml(path: Path, n_rows: int) -> int:
    """Stream a Posts.xml of ``n_rows`` rows (half questions, half answers); returns its bytes."""
    rng = random.Random(1234)
    next_id, written, question_index = 1, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        out.write('<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        while written < n_rows:
            n_answers = min(_ANSWERS_PER_QUESTION[question_index % 4], n_rows - written - 1)
            qid, answer_ids = next_id, list(range(next_id + 1, next_id + 1 + n_answers))
            out.write(_question_row(rng, qid, answer_ids))
            for aid in answer_ids:
                out.write(_answer_row(rng, aid, qid))
            next_id, written = next_id + 1 + n_answers, written + 1 + n_answers
            question_index += 1
        out.write("</posts>\n")
    return path.stat().st_size


_COLLECT_CHILD = """
import json, sys
from pathlib import Path
from expqa.data.stackexchange import collect_stackexchange
from expqa.config import CollectConfig
config = CollectConfig(
    posts=sys.argv[1],
    tags=["ab-testing", "hypothesis-testing", "statistical-power", "sample-size", "p-value",
          "confidence-interval", "experiment-design", "bayesian", "causality",
          "multiple-comparisons", "bootstrap", "variance-reduction", "t-test"],
    min_question_score=1, min_answer_score=2, min_answer_chars=80, max_answer_chars=6000,
    site_url="https://stats.stackexchange.com",
)
stats = collect_stackexchange(Path(sys.argv[1]), Path(sys.argv[2]), config)
print(json.dumps(stats, sort_keys=True))
"""


def bench_collect(n_rows: int) -> dict[str, Any]:
    """Generate a Posts.xml of ``n_rows`` rows, import it in a subprocess, report cost."""
    with tempfile.TemporaryDirectory(prefix="expqa-bench-collect-") as tmp:
        posts_path, out_path = Path(tmp) / "Posts.xml", Path(tmp) / "out" / "pairs.jsonl"
        started = time.perf_counter()
        input_bytes = write_posts_xml(posts_path, n_rows)
        generate_s = time.perf_counter() - started
        started, cpu_before = time.perf_counter(), child_cpu_s()
        child = subprocess.run(
            [sys.executable, "-c", _COLLECT_CHILD, str(posts_path), str(out_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        elapsed_s, cpu_s = time.perf_counter() - started, child_cpu_s() - cpu_before
        if child.returncode != 0:
            raise SystemExit(f"collect failed (exit {child.returncode}):\n{child.stderr}")
        output_bytes = out_path.stat().st_size
    return {
        "part": "collect",
        "rows": n_rows,
        "input_mib": round(input_bytes / 2**20, 1),
        "output_mib": round(output_bytes / 2**20, 1),
        "generate_s": round(generate_s, 1),
        "elapsed_s": round(elapsed_s, 1),
        "cpu_s": round(cpu_s, 1),
        "peak_rss_mib": round(peak_child_rss_mib(), 1),
        "stats": json.loads(child.stdout),
    }


def add_collect_parser(parts: argparse._SubParsersAction) -> None:
    parser = parts.add_parser("collect", help="collect_stackexchange on a generated Posts.xml")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate")
    parser.set_defaults(run=lambda args: bench_collect(args.rows))


# --- collect from a site's .7z archive ----------------------------------------------------------------------------

# LZMA2 preset 1 (7-Zip's "fastest") keeps compressing the 1.6 GB file to minutes on 2 shared cores; the dump's own
# archives use a higher preset, which decompresses at a similar speed (LZMA decoding cost follows the output size).
_ARCHIVE_FILTERS = [{"id": 0x21, "preset": 1}]  # py7zr.FILTER_LZMA2


def bench_collect_7z(n_rows: int) -> dict[str, Any]:
    """Generate a Posts.xml of ``n_rows`` rows, pack it into a .7z after a small Badges.xml (a solid archive, as
    the dump's), delete the XML, then import the archive in a subprocess and report cost."""
    import py7zr  # only this part needs it

    with tempfile.TemporaryDirectory(prefix="expqa-bench-collect-7z-") as tmp:
        posts_path, archive_path = Path(tmp) / "Posts.xml", Path(tmp) / "stats.stackexchange.com.7z"
        out_path = Path(tmp) / "out" / "pairs.jsonl"
        started = time.perf_counter()
        input_bytes = write_posts_xml(posts_path, n_rows)
        generate_s = time.perf_counter() - started
        started = time.perf_counter()
        with py7zr.SevenZipFile(archive_path, "w", filters=_ARCHIVE_FILTERS) as archive:
            archive.writestr(b'<?xml version="1.0" encoding="utf-8"?>\n<badges />\n' * 20_000, "Badges.xml")
            archive.write(posts_path, "Posts.xml")
        compress_s = time.perf_counter() - started
        posts_path.unlink()  # only the archive is on disk while collect runs
        started, cpu_before = time.perf_counter(), child_cpu_s()
        child = subprocess.run(
            [sys.executable, "-c", _COLLECT_CHILD, str(archive_path), str(out_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        elapsed_s, cpu_s = time.perf_counter() - started, child_cpu_s() - cpu_before
        if child.returncode != 0:
            raise SystemExit(f"collect failed (exit {child.returncode}):\n{child.stderr}")
        output_bytes, archive_bytes = out_path.stat().st_size, archive_path.stat().st_size
    return {
        "part": "collect-7z",
        "rows": n_rows,
        "posts_xml_mib": round(input_bytes / 2**20, 1),
        "archive_mib": round(archive_bytes / 2**20, 1),
        "output_mib": round(output_bytes / 2**20, 1),
        "generate_s": round(generate_s, 1),
        "compress_s": round(compress_s, 1),
        "elapsed_s": round(elapsed_s, 1),
        "cpu_s": round(cpu_s, 1),
        "peak_rss_mib": round(peak_child_rss_mib(), 1),
        "stats": json.loads(child.stdout),
    }


def add_collect_7z_parser(parts: argparse._SubParsersAction) -> None:
    parser = parts.add_parser("collect-7z", help="collect_stackexchange on a generated site .7z archive")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to generate")
    parser.set_defaults(run=lambda args: bench_collect_7z(args.rows))


# --- command line -----------------------------------------------------------------------------

PART_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_combine_parser,
    add_collect_parser,
    add_collect_7z_parser,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = parser.add_subparsers(dest="part", required=True)
    for add_part in PART_PARSERS:
        add_part(parts)
    args = parser.parse_args(argv)
    print(json.dumps(args.run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
