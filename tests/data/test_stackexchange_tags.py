"""Tests for collect's tag handling (issue 20): the shipped tag list, per-tag counts and warnings, --list-tags."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest

from expqa.config import CollectConfig, load_params
from expqa.data.stackexchange import (
    MIN_QUESTIONS_FOR_TAG_WARNINGS,
    DumpError,
    collect_stackexchange,
    format_tag_listing,
    list_tags,
)
from expqa.pipeline.collect import main as collect_stage
from helpers import REPO, SAMPLE_POSTS, answer, make_site_7z, question, write_posts

STAGE = collect_stage


def shipped_config(**overrides) -> CollectConfig:
    """params.yaml's collect section, as the stage passes it (the shipped tags are what these tests check)."""
    return dataclasses.replace(load_params(REPO / "params.yaml").collect, **overrides)


def run_stage(argv: list[str], capsys) -> tuple[int, str, str]:
    code = STAGE([*argv, "--params", str(REPO / "params.yaml")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the shipped tag list ---------------------------------------------------------------------------------------


def test_ab_test_posts_are_collected_with_the_shipped_params(tmp_path: Path) -> None:
    """Issue 20: `ab-test` posts (the real dump's name, both tag formats) were dropped by the shipped list."""
    rows = [
        question(1, tags="<ab-test>"),
        answer(2, 1),
        question(3, tags="|ab-test|conversion|"),
        answer(4, 3),
        question(5, tags="<r><ggplot2>"),
        answer(6, 5),
    ]
    posts = write_posts(tmp_path / "Posts.xml", rows)
    stats = collect_stackexchange(posts, tmp_path / "pairs.jsonl", shipped_config())
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [pair["post_id"] for pair in pairs] == [1, 3]
    assert stats["questions_per_tag"]["ab-test"] == 2


def test_shipped_tags_keep_every_sample_question_they_kept_before(tmp_path: Path) -> None:
    """The sample's output is pinned in dvc.lock: the new list must match the same 18 of its 19 questions."""
    stats = collect_stackexchange(SAMPLE_POSTS, tmp_path / "pairs.jsonl", shipped_config())
    assert (stats["questions_seen"], stats["questions_matched"], stats["pairs_written"]) == (19, 18, 14)
    assert stats["warnings"] == []  # 19 questions are too few to call a tag missing


# --- per-tag counts and the zero-match warning ------------------------------------------------------------------


def big_dump(path: Path, tag: str) -> Path:
    """A dump just large enough for tag warnings: every question tagged `tag`, every other one answered."""
    rows: list[dict] = []
    for qid in range(1, 2 * MIN_QUESTIONS_FOR_TAG_WARNINGS, 2):
        rows.append(question(qid, tags=f"<{tag}>"))
        if qid % 4 == 1:
            rows.append(answer(qid + 1, qid))
    return write_posts(path, rows)


def test_configured_tag_without_questions_is_a_warning_in_stage_output_and_metrics(tmp_path: Path, capsys) -> None:
    posts = big_dump(tmp_path / "Posts.xml", "ab-test")
    overrides = tmp_path / "override.yaml"
    overrides.write_text("collect:\n  tags: [ab-test, ab-testing]\n")
    report = tmp_path / "collect.json"
    code, out, err = run_stage(
        [
            "--posts",
            str(posts),
            "--out",
            str(tmp_path / "pairs.jsonl"),
            "--report",
            str(report),
            "--config",
            str(overrides),
        ],
        capsys,
    )
    assert code == 0
    assert "questions per tag: ab-test 1,000, ab-testing 0" in out
    counts = json.loads(report.read_text())
    assert counts["questions_per_tag"] == {"ab-test": 1000, "ab-testing": 0}
    (warning,) = counts["warnings"]
    assert warning.startswith("collect.tags: 'ab-testing' matched none of the 1,000 questions in ")
    assert "--list-tags" in warning
    assert err.strip() == f"warning: {warning}"


def test_a_small_dump_reports_counts_but_does_not_warn(tmp_path: Path) -> None:
    posts = write_posts(tmp_path / "Posts.xml", [question(1, tags="<ab-test>"), answer(2, 1)])
    stats = collect_stackexchange(posts, tmp_path / "pairs.jsonl", shipped_config(tags=["ab-test", "x"]))
    assert stats["questions_per_tag"] == {"ab-test": 1, "x": 0}
    assert stats["warnings"] == []


# --- expqa collect --list-tags ----------------------------------------------------------------------------------

SAMPLE_LISTING = """\
questions  tag (* = in collect.tags)
        9  ab-testing
        5  experiment-design *
        5  hypothesis-testing *
        4  statistical-power *
        3  sample-size *
        2  confidence-interval *
        2  p-value *
        2  t-test *
        1  bayesian *
        1  bootstrap *
        1  causality *
        1  data-quality
        1  data-visualization
        1  ggplot2
        1  multiple-comparisons *
        1  nonparametric
        1  r
        1  sequential-analysis *
        1  variance-reduction *

{posts}: 19 questions, 23 answers, 19 tags (19 shown)
collect.tags (15 tags) match 18 questions; 15 question/answer pairs pass min_question_score 1 and min_answer_score 2
  (collect then also drops answers outside min_answer_chars .. max_answer_chars)
collect.tags with no question in this dump: ab-test, causal-inference
"""


def test_list_tags_on_the_shipped_sample(tmp_path: Path, capsys) -> None:
    code, out, err = run_stage(["--list-tags", str(SAMPLE_POSTS), "--scratch", str(tmp_path)], capsys)
    assert (code, err) == (0, "")
    assert out == SAMPLE_LISTING.format(posts=SAMPLE_POSTS)
    assert list(tmp_path.iterdir()) == []  # the scratch index is removed


def test_format_tag_listing_of_the_shipped_sample(tmp_path: Path) -> None:
    """The --list-tags text, from the library (the stage prints it as it is)."""
    report = list_tags(SAMPLE_POSTS, shipped_config(), scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the scratch index is removed
    listing = format_tag_listing(report, SAMPLE_POSTS, shipped_config())
    assert listing + "\n" == SAMPLE_LISTING.format(posts=SAMPLE_POSTS)
    filtered = format_tag_listing(report, SAMPLE_POSTS, shipped_config(), contains="TEST", top=2).splitlines()
    assert filtered[1:4] == ["        9  ab-testing", "        5  hypothesis-testing *", ""]
    assert "19 tags (2 shown, containing 'TEST')" in filtered[4]
    assert filtered[5].endswith("pass min_question_score 1 and min_answer_score 2")


def test_list_tags_pairs_agree_with_collect(tmp_path: Path) -> None:
    """15 pairs pass the score thresholds; collect writes 14 of them and drops 1 as too short."""
    report = list_tags(SAMPLE_POSTS, shipped_config(), scratch_dir=tmp_path)
    stats = collect_stackexchange(SAMPLE_POSTS, tmp_path / "pairs.jsonl", shipped_config())
    assert report["pairs_before_length_limits"] == stats["pairs_written"] + sum(
        stats["skipped"][reason] for reason in ("too_short", "too_long", "empty_question")
    )


def test_list_tags_filter_and_top(tmp_path: Path, capsys) -> None:
    code, out, _ = run_stage(
        ["--list-tags", str(SAMPLE_POSTS), "--scratch", str(tmp_path), "--contains", "TEST", "--top", "2"], capsys
    )
    assert code == 0
    assert out.splitlines()[1:4] == ["        9  ab-testing", "        5  hypothesis-testing *", ""]
    assert "19 tags (2 shown, containing 'TEST')" in out


def test_list_tags_reads_a_zip_archive(tmp_path: Path) -> None:
    archive = tmp_path / "stats.stackexchange.com.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.write(SAMPLE_POSTS, "dump/Posts.xml")
    from_zip = list_tags(archive, shipped_config(), scratch_dir=tmp_path)
    plain = list_tags(SAMPLE_POSTS, shipped_config(), scratch_dir=tmp_path)
    assert {**from_zip, "warnings": None} == {**plain, "warnings": None}


def test_list_tags_streams_a_7z_archive(tmp_path: Path) -> None:
    archive = make_site_7z(tmp_path / "stats.7z", {"Comments.xml": b"<comments />", "dump/Posts.xml": SAMPLE_POSTS})
    report = list_tags(archive, shipped_config(), scratch_dir=tmp_path)
    assert report["tag_counts"][0] == ("ab-testing", 9)


def test_list_tags_reports_a_7z_archive_without_posts(tmp_path: Path, capsys) -> None:
    archive = make_site_7z(tmp_path / "stats.7z", {"Comments.xml": b"<comments />"})
    code, out, err = run_stage(["--list-tags", str(archive), "--scratch", str(tmp_path)], capsys)
    assert (code, out) == (2, "")
    assert err == (
        f"error: {archive}: the archive has no Posts.xml (it holds Comments.xml); pass a site's dump "
        "archive (e.g. stats.stackexchange.com.7z) or the Posts.xml extracted from it.\n"
    )


def test_zip_without_posts_and_broken_zip_are_reported(tmp_path: Path) -> None:
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("Comments.xml", "<comments/>")
    with pytest.raises(DumpError, match="has no Posts.xml \\(it holds Comments.xml\\)"):
        list_tags(archive, shipped_config(), scratch_dir=tmp_path)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(DumpError, match="broken.zip: unreadable zip archive"):
        list_tags(tmp_path / "broken.zip", shipped_config(), scratch_dir=tmp_path)


@pytest.mark.parametrize(
    "argv", [["--list-tags", "x", "--out", "y"], ["--posts", "x"], ["--list-tags", "x", "--top", "-1"]]
)
def test_conflicting_arguments_are_rejected(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        STAGE(argv)
    assert exit_info.value.code == 2
    assert "expqa collect: error:" in capsys.readouterr().err
