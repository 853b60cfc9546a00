"""Tests for the Stack Exchange import (expqa.data.stackexchange): answer choice, errors (HTML:
test_html_markdown.py)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest

from expqa.config import ConfigError
from expqa.data.html_markdown import html_to_markdown
from expqa.data.stackexchange import DumpError, _ChunkPipe, _ReaderGone, collect_stackexchange, parse_tags
from helpers import COLLECT_CONFIG, LONG, REPO, SAMPLE_POSTS, SITE, answer, make_site_7z, question, write_posts


def test_parse_tags_both_formats() -> None:
    assert parse_tags("<ab-testing><p-value>") == ["ab-testing", "p-value"]
    assert parse_tags("|ab-testing|p-value|") == ["ab-testing", "p-value"]
    assert parse_tags("") == []


# --- selection rules -------------------------------------------------------------------------


def run(tmp_path: Path, rows: list[dict], **overrides: object) -> tuple[dict, list[dict]]:
    posts = write_posts(tmp_path / "Posts.xml", rows)
    out = tmp_path / "out" / "pairs.jsonl"
    stats = collect_stackexchange(posts, out, dataclasses.replace(COLLECT_CONFIG, **overrides))
    return stats, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def chosen(pairs: list[dict]) -> dict[int, int]:
    return {pair["post_id"]: pair["answer_id"] for pair in pairs}


def test_accepted_answer_wins_over_higher_score(tmp_path: Path) -> None:
    rows = [question(1, accepted=3), answer(2, 1, score=50), answer(3, 1, score=1)]
    stats, pairs = run(tmp_path, rows)
    assert chosen(pairs) == {1: 3}
    assert stats["accepted_answers_used"] == 1


def test_top_answer_without_accepted_ties_to_lowest_id(tmp_path: Path) -> None:
    rows = [question(1), answer(4, 1, score=7), answer(3, 1, score=7), answer(2, 1, score=6)]
    _, pairs = run(tmp_path, rows)
    assert chosen(pairs) == {1: 3}


def test_missing_accepted_answer_falls_back_to_top_answer(tmp_path: Path) -> None:
    rows = [question(1, accepted=99), answer(2, 1, score=3), answer(5, 1, score=9)]
    stats, pairs = run(tmp_path, rows)
    assert chosen(pairs) == {1: 5}
    assert stats["accepted_answer_missing"] == 1


def test_accepted_answer_of_another_question_is_not_used(tmp_path: Path) -> None:
    rows = [question(1, accepted=4), answer(2, 1, score=3), question(3), answer(4, 3, score=9)]
    _, pairs = run(tmp_path, rows)
    assert chosen(pairs) == {1: 2, 3: 4}


def test_score_thresholds(tmp_path: Path) -> None:
    rows = [
        question(1, score=0),
        answer(2, 1, score=10),  # question below min_question_score
        question(3),
        answer(4, 3, score=1),
        answer(5, 3, score=0),  # answers below threshold
        question(6),  # no answers at all
        question(7, score=1),
        answer(8, 7, score=2),  # both exactly at the thresholds
    ]
    stats, pairs = run(tmp_path, rows)
    assert chosen(pairs) == {7: 8}
    assert stats["skipped"]["low_score"] == 1
    assert stats["skipped"]["low_answer_score"] == 1
    assert stats["skipped"]["no_answer"] == 1


def test_answer_length_limits(tmp_path: Path) -> None:
    rows = [
        question(1),
        answer(2, 1, body="<p>" + "x" * 10 + "</p>"),
        question(3),
        answer(4, 3, body="<p>" + "y" * 50 + "</p>"),
        question(5),
        answer(6, 5, body="<p>" + "z" * 51 + "</p>"),
    ]
    stats, pairs = run(tmp_path, rows, min_answer_chars=11, max_answer_chars=50)
    assert chosen(pairs) == {3: 4}
    assert stats["skipped"]["too_short"] == 1
    assert stats["skipped"]["too_long"] == 1


def test_answer_with_deleted_parent_is_counted(tmp_path: Path) -> None:
    rows = [question(1), answer(2, 1), answer(3, 77)]
    stats, pairs = run(tmp_path, rows)
    assert chosen(pairs) == {1: 2}
    assert stats["skipped"]["missing_parent"] == 1


def test_tag_filter_reads_both_formats_and_ignores_other_post_types(tmp_path: Path) -> None:
    rows = [
        question(1, tags="<r><ggplot2>"),
        answer(2, 1),
        question(3, tags="|r|p-value|"),
        answer(4, 3),
        question(5, tags="<Bayesian>"),
        answer(6, 5),
        {"Id": 7, "PostTypeId": 4, "Body": "<p>tag wiki excerpt</p>"},
        {"Id": 8, "PostTypeId": 5, "Body": "<p>tag wiki</p>"},
    ]
    stats, pairs = run(tmp_path, rows)
    assert chosen(pairs) == {3: 4, 5: 6}
    assert pairs[0]["tags"] == ["r", "p-value"]
    assert stats["questions_matched"] == 2
    assert stats["other_posts"] == 2


def test_empty_tag_list_takes_every_question(tmp_path: Path) -> None:
    rows = [question(1, tags="<r>"), answer(2, 1), question(3, tags=""), answer(4, 3)]
    _, pairs = run(tmp_path, rows, tags=[])
    assert chosen(pairs) == {1: 2, 3: 4}


def test_output_row_schema(tmp_path: Path) -> None:
    rows = [question(12, body="<p>Why &amp; how?</p>", ContentLicense="CC BY-SA 3.0"), answer(15, 12, score=4)]
    _, (pair,) = run(tmp_path, rows)
    assert pair == {
        "id": "se-stats.stackexchange.com-12",
        "source": "cross_validated",
        "messages": [
            {"role": "user", "content": "Question 12\n\nWhy & how?"},
            {"role": "assistant", "content": html_to_markdown(LONG)},
        ],
        "post_id": 12,
        "answer_id": 15,
        "url": f"{SITE}/questions/12",
        "answer_url": f"{SITE}/a/15",
        "license": "CC BY-SA 3.0 (question); CC BY-SA 4.0 (answer)",
        "attribution": f"Question and answer from {SITE} (post 12, answer 15), licensed under "
        "CC BY-SA 3.0 (question); CC BY-SA 4.0 (answer).",
        "tags": ["ab-testing"],
        "question_score": 5,
        "answer_score": 4,
    }


def test_output_is_ordered_by_question_and_byte_identical(tmp_path: Path) -> None:
    rows = [question(30), answer(31, 30), question(10), answer(32, 10), question(20), answer(33, 20)]
    posts = write_posts(tmp_path / "Posts.xml", rows)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    collect_stackexchange(posts, first, COLLECT_CONFIG)
    collect_stackexchange(posts, second, COLLECT_CONFIG)
    assert first.read_bytes() == second.read_bytes()
    assert [json.loads(line)["post_id"] for line in first.read_text().splitlines()] == [10, 20, 30]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Posts.xml", "a.jsonl", "b.jsonl"]


# --- errors ----------------------------------------------------------------------------------


def test_malformed_xml_names_path_and_line(tmp_path: Path) -> None:
    posts = write_posts(tmp_path / "Posts.xml", [question(1), answer(2, 1)])
    lines = posts.read_text().splitlines()
    lines[3] = lines[3].replace('ParentId="1"', 'ParentId="1')  # unterminated attribute
    posts.write_text("\n".join(lines[:5]))  # and truncated, as an interrupted extraction
    out = tmp_path / "pairs.jsonl"
    out.write_text("previous output\n")
    with pytest.raises(DumpError, match=rf"{posts}:4:\d+: malformed XML .*fully downloaded"):
        collect_stackexchange(posts, out, COLLECT_CONFIG)
    assert out.read_text() == "previous output\n"  # never half-written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["Posts.xml", "pairs.jsonl"]


def test_truncated_dump_is_reported(tmp_path: Path) -> None:
    posts = write_posts(tmp_path / "Posts.xml", [question(1), answer(2, 1)])
    posts.write_text(posts.read_text().replace("</posts>\n", ""))
    with pytest.raises(DumpError, match="malformed XML"):
        collect_stackexchange(posts, tmp_path / "pairs.jsonl", COLLECT_CONFIG)


def test_row_without_post_type_names_its_line(tmp_path: Path) -> None:
    rows = [question(1), {"Id": 2, "Score": 1}]
    with pytest.raises(DumpError, match=r"Posts.xml:4: <row> has no PostTypeId attribute"):
        run(tmp_path, rows)


def test_non_integer_score_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DumpError, match=r"Posts.xml:3: Score='high' is not an integer"):
        run(tmp_path, [question(1, score="high")])


def test_duplicate_post_id_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DumpError, match=r"Posts.xml:4: post Id 1 appears twice"):
        run(tmp_path, [question(1), question(1)])


def test_wrong_dump_file_is_reported(tmp_path: Path) -> None:
    comments = tmp_path / "Comments.xml"
    comments.write_text('<?xml version="1.0"?>\n<comments>\n  <row Id="1" />\n</comments>\n')
    with pytest.raises(DumpError, match="root element is <comments>, expected <posts>"):
        collect_stackexchange(comments, tmp_path / "pairs.jsonl", COLLECT_CONFIG)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file.*Posts.xml"):
        collect_stackexchange(tmp_path / "Posts.xml", tmp_path / "pairs.jsonl", COLLECT_CONFIG)


def test_output_that_is_a_directory_is_named_before_importing(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=f"^output {tmp_path} is a directory; give a file path"):
        collect_stackexchange(SAMPLE_POSTS, tmp_path, COLLECT_CONFIG)
    assert list(tmp_path.iterdir()) == []  # no scratch or temp file left behind


def test_stage_checks_every_output_path_before_writing_any(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--report naming a folder used to fail only after --out had been replaced by the new import."""
    from expqa.pipeline.collect import main as collect_stage

    out = tmp_path / "pairs.jsonl"
    out.write_text("the previous import\n")
    report = tmp_path / "reports"
    report.mkdir()
    argv = ["--posts", str(SAMPLE_POSTS), "--out", str(out), "--report", str(report)]
    assert collect_stage([*argv, "--params", str(REPO / "params.yaml")]) == 2
    assert capsys.readouterr().err == (
        f"error: --report {report} is a directory; give the path of a file to write (nothing was written)\n"
    )
    assert out.read_text() == "the previous import\n" and sorted(tmp_path.iterdir()) == [out, report]


def test_inconsistent_length_limits_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"collect.min_answer_chars \(100\) > collect.max_answer_chars \(10\)"):
        run(tmp_path, [], min_answer_chars=100, max_answer_chars=10)


# --- the shipped sample ----------------------------------------------------------------------


def test_shipped_sample_imports_with_default_params(tmp_path: Path) -> None:
    out = tmp_path / "se.jsonl"
    stats = collect_stackexchange(SAMPLE_POSTS, out, COLLECT_CONFIG)
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert stats["pairs_written"] == len(pairs) >= 12
    for reason in ("low_score", "no_answer", "low_answer_score", "too_short", "missing_parent"):
        assert stats["skipped"][reason] >= 1, reason
    assert stats["accepted_answer_missing"] >= 1
    assert stats["other_posts"] >= 2
    for pair in pairs:
        roles = [message["role"] for message in pair["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(message["content"].strip() for message in pair["messages"])
    assert [pair["post_id"] for pair in pairs] == sorted(pair["post_id"] for pair in pairs)


# --- the site's .7z archive, as distributed ------------------------------------------------------------------


def test_7z_archive_gives_the_same_pairs_as_its_posts_xml(tmp_path: Path) -> None:
    archive = make_site_7z(
        tmp_path / "stats.stackexchange.com.7z",
        {"Badges.xml": b"<badges />\n" * 500, "Posts.xml": SAMPLE_POSTS, "Users.xml": b"<users />"},
    )
    from_archive = collect_stackexchange(archive, tmp_path / "a.jsonl", COLLECT_CONFIG)
    from_xml = collect_stackexchange(SAMPLE_POSTS, tmp_path / "x.jsonl", COLLECT_CONFIG)
    assert from_archive == from_xml and from_archive["pairs_written"] >= 12
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "x.jsonl").read_bytes()


def test_truncated_7z_archive_is_reported_and_output_kept(tmp_path: Path) -> None:
    archive = make_site_7z(tmp_path / "site.7z", {"Posts.xml": SAMPLE_POSTS})
    whole = archive.read_bytes()
    out = tmp_path / "pairs.jsonl"
    out.write_text("previous output\n")
    for cut in (10, 40, len(whole) // 2, len(whole) - 1):  # inside the start header, the data, the end header
        archive.write_bytes(whole[:cut])
        with pytest.raises(DumpError, match=rf"^{archive}: truncated 7z archive \({cut:,} bytes.*download it again"):
            collect_stackexchange(archive, out, COLLECT_CONFIG)
    assert out.read_text() == "previous output\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pairs.jsonl", "site.7z"]


def test_7z_archive_without_posts_xml_names_what_it_holds(tmp_path: Path) -> None:
    archive = make_site_7z(tmp_path / "site.7z", {"Comments.xml": b"<comments />", "Users.xml": b"<users />"})
    with pytest.raises(
        DumpError,
        match=rf"^{archive}: the archive has no Posts.xml \(it holds Comments.xml, "
        r"Users.xml\); pass a site's dump archive",
    ):
        collect_stackexchange(archive, tmp_path / "pairs.jsonl", COLLECT_CONFIG)


def test_file_that_is_not_a_7z_archive_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "stats.stackexchange.com.7z"
    fake.write_bytes(SAMPLE_POSTS.read_bytes())  # e.g. an extracted Posts.xml renamed
    with pytest.raises(DumpError, match=rf"^{fake}: not a 7z archive \(no 7z signature\)"):
        collect_stackexchange(fake, tmp_path / "pairs.jsonl", COLLECT_CONFIG)


def test_damaged_7z_data_is_reported(tmp_path: Path) -> None:
    archive = make_site_7z(tmp_path / "site.7z", {"Posts.xml": SAMPLE_POSTS})
    damaged = bytearray(archive.read_bytes())
    damaged[200] ^= 0xFF  # a byte of the compressed stream: full length, so only decompression can tell
    archive.write_bytes(bytes(damaged))
    with pytest.raises(DumpError, match=rf"^{archive}: (damaged 7z archive|.*malformed XML)"):
        collect_stackexchange(archive, tmp_path / "pairs.jsonl", COLLECT_CONFIG)


def test_bad_xml_inside_a_7z_archive_names_the_archive_and_line(tmp_path: Path) -> None:
    posts = write_posts(tmp_path / "Posts.xml", [question(1), {"Id": 2, "PostTypeId": "oops"}])
    archive = make_site_7z(tmp_path / "site.7z", {"Posts.xml": posts})
    with pytest.raises(DumpError, match=rf"^{archive}:4: PostTypeId='oops' is not an integer"):
        collect_stackexchange(archive, tmp_path / "pairs.jsonl", COLLECT_CONFIG)


def test_reader_stopping_early_unblocks_the_decompressing_thread() -> None:
    """After bad XML the reader closes the pipe; a producer blocked on the full queue must end, not hang."""
    pipe, outcome = _ChunkPipe(), []

    def produce() -> None:
        try:
            for _ in range(100):  # far more than the queue holds
                pipe.put(b"x" * 1000)
        except _ReaderGone:
            outcome.append("stopped")

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert pipe.read(10) == b"x" * 10
    pipe.close()
    producer.join(timeout=5)
    assert not producer.is_alive() and outcome == ["stopped"]
