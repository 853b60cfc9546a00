"""Import a Stack Exchange data dump (Posts.xml) into ChatML JSON Lines.

Each output line pairs one question (title + body) with one answer: the accepted answer when
the dump has it, else the highest-scoring answer above a threshold. Bodies are converted from
the dump's HTML to Markdown by `expqa.data.html_markdown.html_to_markdown`.

Memory stays bounded on multi-GB dumps: the XML is streamed twice and everything that grows
with the dump lives in a temporary SQLite database next to the output, never in Python objects.
  pass 1  per-post integers only (id, parent, score, accepted id, tag match)
  choose  one answer per question, in SQL
  pass 2  Markdown of the chosen questions and answers only
  write   joined rows in question-Id order, to a temp file renamed over the output
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import secrets
import sqlite3
import struct
import tempfile
import threading
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import py7zr
from py7zr.io import Py7zIO, WriterFactory

from expqa.config import CollectConfig, ConfigError
from expqa.data.html_markdown import html_to_markdown
from expqa.progress import byte_progress
from expqa.wording import plural

SOURCE = "cross_validated"  # combine's source name (data.weights) for every collected pair
DEFAULT_LICENSE = "CC BY-SA 4.0"
QUESTION_TYPE = 1
ANSWER_TYPE = 2
DUMP_HINT = "check that the dump was fully downloaded and extracted (e.g. `7z t site.7z`, then extract again)"


class DumpError(ValueError):
    """A Posts.xml that cannot be imported; the message names file, line and the fix."""


# --------------------------------------------------------------------------------------------
# Streaming the dump
# --------------------------------------------------------------------------------------------

MAX_FEED_BYTES = 1 << 20  # a dump with no newlines is still read in bounded pieces


@dataclass(frozen=True)
class Row:
    """One <row> of Posts.xml with the line it ends on (for error messages)."""

    line: int
    attrs: dict[str, str]


def iter_rows(posts_xml: Path, desc: str = "read Posts.xml") -> Iterator[Row]:
    """Stream the <row> elements of a Posts.xml, keeping only the current row in memory.

    The pull parser is fed one line at a time (dumps write one row per line), so each row's
    line number is known; ElementTree's iterparse does not report it. On a terminal a progress bar
    named `desc` counts bytes read (the row total is unknown until the end) and rows so far.
    """
    _check_readable(posts_xml)
    parser = ET.XMLPullParser(events=("start", "end"))
    root: ET.Element | None = None
    line, rows = 1, 0
    with open_posts(posts_xml) as stream, byte_progress(_posts_bytes(posts_xml), desc=desc) as bar:
        while chunk := stream.readline(MAX_FEED_BYTES):
            bar.update(len(chunk))
            for event, element in _feed(parser, chunk, posts_xml):
                if root is None:
                    root = element
                    _check_root(element, posts_xml, line)
                elif event == "end" and element.tag == "row":
                    rows += 1
                    if rows % 1000 == 0:
                        bar.set_postfix_str(f"{rows:,} rows", refresh=False)
                    yield Row(line, dict(element.attrib))
                    root.clear()  # drop finished rows so the tree never grows
            line += chunk.endswith(b"\n")
    _close(parser, posts_xml)


def _posts_bytes(posts_xml: Path) -> int | None:
    """Uncompressed size of Posts.xml, the progress bar's total; None for a .7z (7z streams it without one)."""
    suffix = posts_xml.suffix.lower()
    if suffix == ".7z":
        return None
    if suffix == ".zip":
        with zipfile.ZipFile(posts_xml) as archive:
            return archive.getinfo(_zip_member(archive, posts_xml)).file_size
    return posts_xml.stat().st_size


def _check_readable(posts_xml: Path) -> None:
    if not posts_xml.exists():
        raise FileNotFoundError(
            f"{posts_xml}: no such file. Download the site's dump from "
            "https://archive.org/details/stackexchange and pass the path of its .7z archive or of the "
            "Posts.xml extracted from it (`7z x`)."
        )
    if not posts_xml.is_file():
        raise DumpError(f"{posts_xml}: is not a file; pass the path of the dump's Posts.xml.")


@contextmanager
def open_posts(path: Path) -> Iterator[IO[bytes]]:
    """A binary stream of Posts.xml: the file itself, or its member in a site's .7z or .zip archive.

    Archives are read as a stream, never extracted to disk: a site's 7z archive holds every table of the
    dump (PostHistory.xml is several times Posts.xml).
    """
    if path.suffix.lower() == ".7z":
        with _open_7z_member(path) as stream:
            yield stream
    elif path.suffix.lower() == ".zip":
        with _open_zip_member(path) as stream:
            yield stream
    else:
        with open(path, "rb") as stream:
            yield stream


@contextmanager
def _open_7z_member(path: Path) -> Iterator[IO[bytes]]:
    """Posts.xml of a .7z archive, decompressed by py7zr in a background thread into a bounded queue.

    Why py7zr: it is a PyPI wheel, so `make install` brings it on any machine, where the `7z` tool or the
    libarchive library that libarchive-c loads may be missing; its extract(factory=...) hands decompressed chunks to
    our writer instead of holding the member in memory (py7zr PR #620, for issue #579). Decompressing the same
    164 MB Posts.xml took 1.6-2.0 s CPU with py7zr, 1.3-1.7 s with libarchive-c and 1.4-1.6 s with 7zz, three runs
    each (benchmarks/results/collect_7z_2026-11-29.md): no reason to depend on a tool a fresh machine lacks. The
    thread only turns py7zr's push into the parser's pull.
    """
    _check_7z_complete(path)
    try:
        archive = py7zr.SevenZipFile(path)
    except py7zr.Bad7zFile as error:
        raise DumpError(f"{path}: unreadable 7z archive ({error}); {DUMP_HINT}.") from None
    with archive:
        member = _7z_member(archive.getnames(), path)
        pipe = _ChunkPipe()
        producer = threading.Thread(target=_decompress_into, args=(archive, member, pipe), daemon=True)
        producer.start()
        try:
            yield io.BufferedReader(pipe, buffer_size=MAX_FEED_BYTES)
        finally:
            pipe.close()  # a reader that stopped early (bad XML) unblocks the producer
            producer.join()
    if pipe.error is not None:
        raise DumpError(f"{path}: damaged 7z archive ({type(pipe.error).__name__}: {pipe.error}); {DUMP_HINT}.")


SEVEN_ZIP_SIGNATURE = b"7z\xbc\xaf\x27\x1c"
SEVEN_ZIP_START_HEADER = 32  # signature, version, CRC, then the offset and size of the header at the end


def _check_7z_complete(path: Path) -> None:
    """Not a 7z archive, or shorter than its start header says (an interrupted download): one clear error each.

    py7zr reports both, but as "next header size 22 exceeds the archive size", which names no fix.
    """
    with open(path, "rb") as stream:
        start = stream.read(SEVEN_ZIP_START_HEADER)
    if not start.startswith(SEVEN_ZIP_SIGNATURE):
        raise DumpError(
            f"{path}: not a 7z archive (no 7z signature); pass a site's dump archive as downloaded "
            "(e.g. stats.stackexchange.com.7z), or a Posts.xml or .zip under its own name."
        )
    expected = len(start)
    if len(start) == SEVEN_ZIP_START_HEADER:
        header_offset, header_size = struct.unpack("<QQ", start[12:28])
        expected += header_offset + header_size
    size = path.stat().st_size
    if len(start) < SEVEN_ZIP_START_HEADER or size < expected:
        raise DumpError(
            f"{path}: truncated 7z archive ({size:,} bytes, its header needs "
            f"{max(expected, SEVEN_ZIP_START_HEADER + 1):,}); download it again and compare its size "
            "with the published one."
        )


def _7z_member(names: list[str], path: Path) -> str:
    for name in names:
        if name.rsplit("/", 1)[-1] == "Posts.xml":
            return name
    held = ", ".join(names[:5]) or "nothing"
    raise DumpError(
        f"{path}: the archive has no Posts.xml (it holds {held}); pass a site's dump archive "
        "(e.g. stats.stackexchange.com.7z) or the Posts.xml extracted from it."
    )


# Decompressed chunks waiting for the parser: this bounds the memory. py7zr writes what one read of compressed
# input gives (7.5 MB at most on the benchmark's XML; never more than its 128 MB get_memory_limit).
PIPE_CHUNKS = 2


class _ReaderGone(Exception):
    """Raised in the producer thread when the reader closed the pipe: stops py7zr's extraction."""


class _ChunkPipe(io.RawIOBase):
    """A bounded queue of bytes chunks, written by the decompressing thread and read as a raw stream."""

    _END = b""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: queue.Queue[bytes] = queue.Queue(maxsize=PIPE_CHUNKS)
        self._pending = memoryview(b"")
        self._ended = False
        self.error: BaseException | None = None  # set by the producer before it ends the stream

    # the producer's side
    def put(self, chunk: bytes) -> None:
        while True:
            if self.closed:
                raise _ReaderGone
            try:
                self._chunks.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def end(self, error: BaseException | None = None) -> None:
        self.error = error
        try:
            self.put(self._END)
        except _ReaderGone:
            pass

    # the reader's side
    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending and not self._ended:
            chunk = self._chunks.get()
            self._ended = chunk is self._END
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


class _PipeWriter(Py7zIO):
    """What py7zr writes the member into: each chunk goes straight to the pipe."""

    def __init__(self, pipe: _ChunkPipe) -> None:
        self._pipe, self._size = pipe, 0

    def write(self, s: bytes | bytearray) -> int:
        self._pipe.put(bytes(s))
        self._size += len(s)
        return len(s)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._size

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return self._size


class _PipeWriterFactory(WriterFactory):
    def __init__(self, pipe: _ChunkPipe) -> None:
        self._pipe = pipe

    def create(self, filename: str) -> Py7zIO:
        return _PipeWriter(self._pipe)


def _decompress_into(archive: py7zr.SevenZipFile, member: str, pipe: _ChunkPipe) -> None:
    """The producer thread: extract `member` into the pipe; a decompression error ends the stream with it."""
    try:
        archive.extract(targets=[member], factory=_PipeWriterFactory(pipe))
    except _ReaderGone:
        return
    except Exception as error:  # LZMAError, CrcError, DecompressionError...: the reader reports it
        pipe.end(error)
        return
    pipe.end()


@contextmanager
def _open_zip_member(path: Path) -> Iterator[IO[bytes]]:
    try:
        with zipfile.ZipFile(path) as archive, archive.open(_zip_member(archive, path)) as stream:
            yield stream
    except (zipfile.BadZipFile, EOFError) as error:  # not a zip, or a truncated / corrupt member
        raise DumpError(f"{path}: unreadable zip archive ({error}); {DUMP_HINT}.") from None


def _zip_member(archive: zipfile.ZipFile, path: Path) -> str:
    for name in archive.namelist():
        if name.rsplit("/", 1)[-1] == "Posts.xml":
            return name
    held = ", ".join(archive.namelist()[:5]) or "nothing"
    raise DumpError(
        f"{path}: the archive has no Posts.xml (it holds {held}); pass a site's dump archive "
        "or the Posts.xml extracted from it."
    )


def _feed(parser: ET.XMLPullParser, chunk: bytes, path: Path) -> list[tuple[str, ET.Element]]:
    try:
        parser.feed(chunk)
        return list(parser.read_events())
    except ET.ParseError as error:
        raise _malformed(error, path) from None


def _close(parser: ET.XMLPullParser, path: Path) -> None:
    try:
        parser.close()
    except ET.ParseError as error:
        raise _malformed(error, path) from None


def _malformed(error: ET.ParseError, path: Path) -> DumpError:
    line, column = error.position
    return DumpError(f"{path}:{line}:{column}: malformed XML ({error}); {DUMP_HINT}.")


def _check_root(element: ET.Element, path: Path, line: int) -> None:
    if element.tag != "posts":
        raise DumpError(
            f"{path}:{line}: root element is <{element.tag}>, expected <posts>; pass the "
            "dump's Posts.xml (not Comments.xml, Users.xml, PostHistory.xml, ...)."
        )


def _required_int(row: Row, name: str, path: Path) -> int:
    value = row.attrs.get(name)
    if value is None:
        raise DumpError(
            f"{path}:{row.line}: <row> has no {name} attribute; every post in a Stack Exchange "
            f"Posts.xml has Id and PostTypeId. Check that this is an unmodified Posts.xml; "
            f"{DUMP_HINT}."
        )
    return _parse_int(value, row, name, path)


def _optional_int(row: Row, name: str, path: Path) -> int | None:
    value = row.attrs.get(name)
    return None if value is None or value == "" else _parse_int(value, row, name, path)


def _parse_int(value: str, row: Row, name: str, path: Path) -> int:
    try:
        return int(value)
    except ValueError:
        raise DumpError(f"{path}:{row.line}: {name}={value!r} is not an integer; {DUMP_HINT}.") from None


def parse_tags(raw: str) -> list[str]:
    """Tags from either dump format: `<a><b>` (older dumps) or `|a|b|` (2023 and later)."""
    if raw.startswith("<"):
        return re.findall(r"<([^<>]+)>", raw)
    return [tag for tag in raw.split("|") if tag]


# --------------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------------

INSERT_BATCH = 10_000
SCHEMA = """
CREATE TABLE questions (id INTEGER PRIMARY KEY, score INTEGER, accepted INTEGER,
                        matched INTEGER, line INTEGER);
CREATE TABLE answers (id INTEGER PRIMARY KEY, parent INTEGER, score INTEGER, line INTEGER);
CREATE TABLE chosen (qid INTEGER PRIMARY KEY, aid INTEGER UNIQUE, accepted INTEGER);
CREATE TABLE question_text (qid INTEGER PRIMARY KEY, content TEXT, tags TEXT, license TEXT,
                            score INTEGER);
CREATE TABLE answer_text (aid INTEGER PRIMARY KEY, content TEXT, license TEXT, score INTEGER);
"""


def collect_stackexchange(posts: Path, out: Path, config: CollectConfig) -> dict:
    """Write one ChatML pair per usable question of the dump `posts` to `out`; return counts.

    Counts: rows_read, questions_seen, answers_seen, other_posts (wiki, ...),
    questions_matched (tag filter), pairs_written, accepted_answers_used,
    accepted_answer_missing (fell back to the top answer), and `skipped` per reason:
    low_score, no_answer, low_answer_score, too_short, too_long (questions) and
    missing_parent (answers whose question is not in the dump); questions_per_tag (each
    configured tag's questions) and warnings (configured tags that matched nothing).
    """
    posts_xml, out_path = Path(posts), Path(out)
    _check(config)
    if out_path.is_dir():  # else the final rename fails after the whole import, naming the temp file
        raise IsADirectoryError(
            f"output {out_path} is a directory; give a file path, e.g. {out_path}/stackexchange.jsonl"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Next to the output, not in /tmp: /tmp is often RAM-backed and the spill can be GBs.
    with tempfile.TemporaryDirectory(prefix=".collect-", dir=out_path.parent) as scratch:
        db = _open_scratch_db(Path(scratch) / "posts.sqlite")
        try:
            counts, tag_counts = _index_posts(db, posts_xml, config)
            choice = _choose_answers(db, config)
            _store_chosen_texts(db, posts_xml)
            written = _write_pairs(db, out_path, config)
        finally:
            db.close()
    return {
        **counts,
        "questions_matched": choice["questions_matched"],
        "pairs_written": written["pairs_written"],
        "accepted_answers_used": written["accepted_answers_used"],
        "accepted_answer_missing": choice["accepted_answer_missing"],
        "skipped": {
            **choice["skipped"],
            **{reason: written[reason] for reason in ("too_short", "too_long", "empty_question")},
        },
        **_tag_report(tag_counts, config, counts["questions_seen"], posts_xml),
    }


def _check(config: CollectConfig) -> None:
    """CollectConfig.validate, for callers that built the config themselves instead of loading params.yaml."""
    problems = config.validate()
    if problems:
        raise ConfigError(problems)


def _wanted_tags(config: CollectConfig) -> frozenset[str]:
    """collect.tags as the dump writes them (lowercase, no edge spaces); empty keeps every question."""
    return frozenset(tag.strip().lower() for tag in config.tags)


# A configured tag with no question is only suspicious when the dump is big enough that a real tag of the site
# would show up: the shipped 19-question sample is not, a site's full dump (tens of thousands of questions) is.
MIN_QUESTIONS_FOR_TAG_WARNINGS = 1_000


def _tag_report(tag_counts: Counter, config: CollectConfig, questions_seen: int, posts_xml: Path) -> dict:
    """questions_per_tag for each configured tag, and a warning for each that matched no question."""
    per_tag = {tag: tag_counts[tag] for tag in sorted(_wanted_tags(config))}
    big_enough = questions_seen >= MIN_QUESTIONS_FOR_TAG_WARNINGS
    unmatched = [tag for tag, count in per_tag.items() if count == 0 and big_enough]
    warnings = [
        f"collect.tags: '{tag}' matched none of the {plural(questions_seen, 'question')} in {posts_xml}; it is "
        f"probably not a tag of this site (a synonym, a misspelling or another site's name). Pick the site's name from "
        f"`expqa collect --list-tags {posts_xml}` and fix it in params.yaml."
        for tag in unmatched
    ]
    return {"questions_per_tag": per_tag, "warnings": warnings}


def list_tags(dump: Path, config: CollectConfig, *, scratch_dir: Path) -> dict:
    """Every tag's question count in a dump, and what collect's tag filter and score thresholds would keep.

    Runs collect's pass 1 and answer choice only (no Markdown conversion), spilling to SQLite in a temporary
    folder under `scratch_dir`, so memory stays bounded on full dumps. Returns the counts of pass 1,
    tag_counts ([tag, questions], most frequent first), questions_matched, pairs_before_length_limits
    (questions with an answer that passes the score thresholds), questions_per_tag and warnings.
    """
    posts_xml = Path(dump)
    _check(config)
    with tempfile.TemporaryDirectory(prefix=".list-tags-", dir=scratch_dir) as scratch:
        db = _open_scratch_db(Path(scratch) / "posts.sqlite")
        try:
            counts, tag_counts = _index_posts(db, posts_xml, config)
            choice = _choose_answers(db, config)
            (chosen,) = db.execute("SELECT count(*) FROM chosen").fetchone()
        finally:
            db.close()
    return {
        **counts,
        "tag_counts": sorted(tag_counts.items(), key=lambda item: (-item[1], item[0])),
        "questions_matched": choice["questions_matched"],
        "pairs_before_length_limits": chosen,
        **_tag_report(tag_counts, config, counts["questions_seen"], posts_xml),
    }


def format_tag_listing(report: dict, dump: Path, config: CollectConfig, *, contains: str = "", top: int = 0) -> str:
    """The `--list-tags` text: the tag table (optionally filtered and cut), then what collect.tags keeps."""
    shown = [(tag, count) for tag, count in report["tag_counts"] if contains.lower() in tag]
    shown = shown[:top] if top else shown
    configured = report["questions_per_tag"]
    lines = [f"{'questions':>9}  tag (* = in collect.tags)"]
    lines += [f"{count:>9,}  {tag}{' *' if tag in configured else ''}" for tag, count in shown]
    selection = f"{len(shown)} shown" + (f", containing '{contains}'" if contains else "")
    lines += [
        "",
        f"{dump}: {plural(report['questions_seen'], 'question')}, {plural(report['answers_seen'], 'answer')}, "
        f"{plural(len(report['tag_counts']), 'tag')} ({selection})",
        f"{_tag_filter_text(configured)} match {plural(report['questions_matched'], 'question')}; "
        f"{report['pairs_before_length_limits']:,} question/answer pairs pass min_question_score "
        f"{config.min_question_score} and min_answer_score {config.min_answer_score}",
        "  (collect then also drops answers outside min_answer_chars .. max_answer_chars)",
    ]
    missing = [tag for tag, count in configured.items() if count == 0]
    if missing:
        lines.append(f"collect.tags with no question in this dump: {', '.join(missing)}")
    return "\n".join(lines)


def _tag_filter_text(configured: dict) -> str:
    return (
        f"collect.tags ({plural(len(configured), 'tag')})" if configured else "collect.tags is empty, so all questions"
    )


def _open_scratch_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    # A throwaway database: durability buys nothing, a bounded page cache keeps RSS flat.
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-65536;" + SCHEMA)
    return db


def _index_posts(db: sqlite3.Connection, posts_xml: Path, config: CollectConfig) -> tuple[dict, Counter]:
    """Pass 1: record the integers that answer choice needs; bodies are not kept.

    Also counts the questions of every tag: memory grows with the site's tag vocabulary, not with the dump.
    """
    counts = {"rows_read": 0, "questions_seen": 0, "answers_seen": 0, "other_posts": 0}
    tag_counts: Counter[str] = Counter()
    wanted_tags = _wanted_tags(config)
    questions: list[tuple[int, int, int | None, int, int]] = []
    answers: list[tuple[int, int | None, int, int]] = []
    for row in iter_rows(posts_xml, desc="collect: index Posts.xml"):
        counts["rows_read"] += 1
        post_id = _required_int(row, "Id", posts_xml)
        post_type = _required_int(row, "PostTypeId", posts_xml)
        score = _optional_int(row, "Score", posts_xml) or 0
        if post_type == QUESTION_TYPE:
            counts["questions_seen"] += 1
            accepted = _optional_int(row, "AcceptedAnswerId", posts_xml)
            question_tags = {tag.lower() for tag in parse_tags(row.attrs.get("Tags", ""))}
            tag_counts.update(question_tags)
            matched = _matches_tags(question_tags, wanted_tags)
            questions.append((post_id, score, accepted, matched, row.line))
        elif post_type == ANSWER_TYPE:
            counts["answers_seen"] += 1
            parent = _optional_int(row, "ParentId", posts_xml)
            answers.append((post_id, parent, score, row.line))
        else:
            counts["other_posts"] += 1
        if len(questions) + len(answers) >= INSERT_BATCH:
            _insert_index_batch(db, questions, answers, posts_xml)
    _insert_index_batch(db, questions, answers, posts_xml)
    db.execute("CREATE INDEX answers_by_parent ON answers (parent, score DESC, id)")
    return counts, tag_counts


def _matches_tags(question_tags: set[str], wanted: frozenset[str]) -> int:
    if not wanted:
        return 1
    return int(not question_tags.isdisjoint(wanted))


def _insert_index_batch(db: sqlite3.Connection, questions: list[tuple], answers: list[tuple], posts_xml: Path) -> None:
    for table, rows, sql in (
        ("questions", questions, "INSERT INTO questions VALUES (?, ?, ?, ?, ?)"),
        ("answers", answers, "INSERT INTO answers VALUES (?, ?, ?, ?)"),
    ):
        try:
            db.executemany(sql, rows)
        except sqlite3.IntegrityError:
            raise _duplicate_id_error(db, table, rows, posts_xml) from None
        rows.clear()


def _duplicate_id_error(db: sqlite3.Connection, table: str, rows: list[tuple], posts_xml: Path) -> DumpError:
    """Find which row of a failed batch repeats an Id (slow path, only on corrupt dumps).

    Rows of the batch before the failing one are already in the table, so a stored row only
    counts as the earlier copy when its line differs.
    """
    for row in rows:
        post_id, line = row[0], row[-1]
        stored = db.execute(f"SELECT line FROM {table} WHERE id = ?", (post_id,)).fetchone()
        if stored is not None and stored[0] != line:
            return DumpError(
                f"{posts_xml}:{line}: post Id {post_id} appears twice (first on line "
                f"{stored[0]}); the dump is corrupt or two dumps were concatenated; {DUMP_HINT}."
            )
    return DumpError(f"{posts_xml}: duplicate post Id; {DUMP_HINT}.")


CHOOSE_ACCEPTED = """
INSERT INTO chosen (qid, aid, accepted)
SELECT q.id, a.id, 1 FROM questions q JOIN answers a ON a.id = q.accepted AND a.parent = q.id
WHERE q.matched AND q.score >= :min_question_score
"""
# Questions without a usable accepted answer: best score, ties to the lowest Id.
CHOOSE_TOP = """
INSERT INTO chosen (qid, aid, accepted)
SELECT qid, aid, 0 FROM (
  SELECT q.id AS qid, a.id AS aid,
         row_number() OVER (PARTITION BY q.id ORDER BY a.score DESC, a.id) AS answer_rank
  FROM questions q JOIN answers a ON a.parent = q.id
  WHERE q.matched AND q.score >= :min_question_score AND a.score >= :min_answer_score
    AND q.id NOT IN (SELECT qid FROM chosen)
) WHERE answer_rank = 1
"""
COUNT_SKIPS = """
SELECT
  sum(matched),
  sum(matched AND score < :min_question_score),
  sum(matched AND score >= :min_question_score
      AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.parent = q.id)),
  sum(matched AND score >= :min_question_score
      AND EXISTS (SELECT 1 FROM answers a WHERE a.parent = q.id)
      AND NOT EXISTS (SELECT 1 FROM chosen c WHERE c.qid = q.id)),
  sum(matched AND score >= :min_question_score AND accepted IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.id = q.accepted AND a.parent = q.id))
FROM questions q
"""
COUNT_ORPHANS = """
SELECT count(*) FROM answers a WHERE NOT EXISTS (SELECT 1 FROM questions q WHERE q.id = a.parent)
"""


def _choose_answers(db: sqlite3.Connection, config: CollectConfig) -> dict:
    """Pick each question's answer in SQL and count why the others were skipped."""
    params = {
        "min_question_score": config.min_question_score,
        "min_answer_score": config.min_answer_score,
    }
    db.execute(CHOOSE_ACCEPTED, params)
    db.execute(CHOOSE_TOP, params)
    matched, low_score, no_answer, low_answer_score, accepted_missing = (
        value or 0 for value in db.execute(COUNT_SKIPS, params).fetchone()
    )
    (orphans,) = db.execute(COUNT_ORPHANS).fetchone()
    return {
        "questions_matched": matched,
        "accepted_answer_missing": accepted_missing,
        "skipped": {
            "low_score": low_score,
            "no_answer": no_answer,
            "low_answer_score": low_answer_score,
            "missing_parent": orphans,
        },
    }


def _store_chosen_texts(db: sqlite3.Connection, posts_xml: Path) -> None:
    """Pass 2: convert and spill only the chosen questions and answers."""
    batch: list[tuple[str, tuple]] = []
    for row in iter_rows(posts_xml, desc="collect: convert chosen posts"):
        post_type = int(row.attrs["PostTypeId"])  # validated in pass 1
        post_id = int(row.attrs["Id"])
        if post_type == QUESTION_TYPE and _is_chosen(db, "qid", post_id):
            batch.append(("question_text", _question_record(row, post_id)))
        elif post_type == ANSWER_TYPE and _is_chosen(db, "aid", post_id):
            batch.append(("answer_text", _answer_record(row, post_id)))
        if len(batch) >= INSERT_BATCH:
            _insert_texts(db, batch)
    _insert_texts(db, batch)


def _is_chosen(db: sqlite3.Connection, column: str, post_id: int) -> bool:
    sql = f"SELECT 1 FROM chosen WHERE {column} = ?"
    return db.execute(sql, (post_id,)).fetchone() is not None


def _question_record(row: Row, qid: int) -> tuple:
    title = row.attrs.get("Title", "").strip()  # titles are plain text in dumps, not HTML
    body = html_to_markdown(row.attrs.get("Body", ""))
    content = f"{title}\n\n{body}".strip()
    tags = json.dumps(parse_tags(row.attrs.get("Tags", "")), ensure_ascii=False)
    license_name = row.attrs.get("ContentLicense")
    return (qid, content, tags, license_name, int(row.attrs.get("Score") or 0))


def _answer_record(row: Row, aid: int) -> tuple:
    content = html_to_markdown(row.attrs.get("Body", ""))
    return (aid, content, row.attrs.get("ContentLicense"), int(row.attrs.get("Score") or 0))


def _insert_texts(db: sqlite3.Connection, batch: list[tuple[str, tuple]]) -> None:
    for table, record in batch:
        placeholders = ", ".join("?" * len(record))
        db.execute(f"INSERT INTO {table} VALUES ({placeholders})", record)
    batch.clear()


WRITE_QUERY = """
SELECT c.qid, c.aid, c.accepted, q.content, q.tags, q.license, q.score,
       a.content, a.license, a.score
FROM chosen c
LEFT JOIN question_text q ON q.qid = c.qid
LEFT JOIN answer_text a ON a.aid = c.aid
ORDER BY c.qid
"""


def _write_pairs(db: sqlite3.Connection, out_path: Path, config: CollectConfig) -> dict:
    """Write pairs in question-Id order to a temp file, then rename it over `out_path`.

    Returns pairs_written, accepted_answers_used and the length-based skips.
    """
    counts = {"pairs_written": 0, "accepted_answers_used": 0, "too_short": 0, "too_long": 0, "empty_question": 0}
    # A sibling temp file (same filesystem, so the rename is atomic), opened with the normal
    # umask; mkstemp would leave the output readable by its owner only.
    temp_path = out_path.with_name(f".{out_path.name}.{secrets.token_hex(6)}.tmp")
    site_url, host = config.site_url.rstrip("/"), urlparse(config.site_url).netloc
    try:
        with open(temp_path, "x", encoding="utf-8", newline="\n") as out:
            for row in db.execute(WRITE_QUERY):
                record, problem = _pair_or_problem(row, config, site_url, host)
                if problem:
                    counts[problem] += 1
                    continue
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["pairs_written"] += 1
                counts["accepted_answers_used"] += row[2]
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_path, out_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return counts


def _pair_or_problem(row: tuple, config: CollectConfig, site_url: str, host: str) -> tuple[dict | None, str | None]:
    """The output record for one chosen pair, or the skip reason; `site_url` without its final slash, `host` its
    host name (both derived from collect.site_url once per run, not per row)."""
    qid, aid, _, question, tags, q_license, q_score, answer, a_license, a_score = row
    if question is None or answer is None:
        raise DumpError(
            f"post {qid} or its answer {aid} was in pass 1 but not in pass 2; was the dump "
            "modified while it was being read? Run the import again."
        )
    if not question:
        return None, "empty_question"
    # An empty answer is never useful, even when min_answer_chars is 0.
    if len(answer) < max(config.min_answer_chars, 1):
        return None, "too_short"
    if len(answer) > config.max_answer_chars:
        return None, "too_long"
    license_name = _license(q_license, a_license)
    return {
        "id": f"se-{host}-{qid}",
        "source": SOURCE,
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "post_id": qid,
        "answer_id": aid,
        "url": f"{site_url}/questions/{qid}",
        "answer_url": f"{site_url}/a/{aid}",
        "license": license_name,
        "attribution": (
            f"Question and answer from {site_url} (post {qid}, answer {aid}), licensed under {license_name}."
        ),
        "tags": json.loads(tags),
        "question_score": q_score,
        "answer_score": a_score,
    }, None


def _license(question_license: str | None, answer_license: str | None) -> str:
    """One license when both posts share it; otherwise name each (both must be honoured)."""
    question_license = question_license or DEFAULT_LICENSE
    answer_license = answer_license or DEFAULT_LICENSE
    if question_license == answer_license:
        return question_license
    return f"{question_license} (question); {answer_license} (answer)"
