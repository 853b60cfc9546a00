"""Tests for the synthetic Q&A stage (expqa.data.generate): parsing, the four checks and their counts, provenance,
determinism, the shipped papers sample, and the stage script on a tiny random teacher."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from expqa.config import ConfigError, DataConfig, GenerateConfig, load_params
from expqa.data.chatml import DataError, validate_conversation
from expqa.data.combine import combine_datasets
from expqa.data.generate import (
    DROP_REASONS,
    PROMPT_VERSION,
    Checks,
    Paper,
    check_pairs,
    generate_qa,
    grounding,
    parse_pairs,
    read_papers,
    select_papers,
)
from expqa.pipeline.generate import main as generate_stage
from expqa.serving import inference
from helpers import REPO

SAMPLE_PAPERS = REPO / "data" / "raw" / "arxiv_papers_sample.jsonl"
STAGE = generate_stage
PAPER = Paper(
    arxiv_id="1512.04922",
    title="Always Valid Inference: Bringing Sequential Analysis to A/B Testing",
    authors="Ramesh Johari, Leo Pekelis, David J. Walsh",
    abstract="Fixed-sample p-values mislead experimenters who monitor an A/B test continuously and stop "
    "early. Always valid p-values and confidence intervals remain valid at any stopping time, "
    "built from sequential tests such as a mixture likelihood ratio test.",
    categories=("stat.ME",),
    license=None,
)
GROUNDED = (
    "Fixed-sample p-values mislead experimenters who stop an A/B test early, but always valid confidence "
    "intervals remain valid at any stopping time of the test."
)  # the abstract's words, not its sentences


def shipped_generate_config(**overrides) -> GenerateConfig:
    """params.yaml's generate section (its filter and checks), some fields replaced."""
    return dataclasses.replace(load_params(REPO / "params.yaml").generate, **overrides)


# --- parsing and checks --------------------------------------------------------------------------------------------


def test_parse_pairs_reads_common_teacher_formats() -> None:
    text = (
        "Here are the pairs:\n1. Q: What is an always valid p-value?\nA: One that stays valid\nat any stopping "
        "time.\n\n**Question 2:** Why not peek?\n**Answer 2:** Peeking inflates errors.\nQ: A question without "
        "an answer?\n"
    )
    assert parse_pairs(text) == [
        ("What is an always valid p-value?", "One that stays valid at any stopping time."),
        ("Why not peek?", "Peeking inflates errors."),
    ]
    assert parse_pairs("just prose, no pairs") == []


def test_grounding_is_the_share_of_content_words_found_in_the_abstract() -> None:
    assert grounding(GROUNDED, PAPER) == 1.0
    assert grounding("Bananas ripen faster next to apples because ethylene gas accumulates.", PAPER) == 0.0
    assert grounding("the and of", PAPER) == 0.0  # no content words: nothing grounds it


def test_every_pair_is_kept_or_dropped_for_one_counted_reason() -> None:
    """One pair per reason, from what the embedded 135M teacher really wrote (loops, pasted abstracts)."""
    checks = Checks(
        pairs_per_paper=9, min_answer_words=10, min_distinct_share=0.5, max_copied_words=12, min_grounding=0.6
    )
    loop = " ".join(["Always valid inference, always valid p-values."] * 6)
    text = (
        f"Q: Q: What are always valid p-values?\nA: {GROUNDED}\n"  # a repeated label is stripped
        f"Q: what are ALWAYS valid p-values\nA: {GROUNDED}\n"  # no question mark
        f"Q: What are ALWAYS valid p-values?\nA: {GROUNDED}\n"  # same question once normalised
        "Q: Is it short?\nA: Yes, valid.\n"
        f"Q: Loop?\nA: {loop}\n"
        f"Q: Abstract?\nA: Abstract: {PAPER.abstract}\n"
        "Q: Unrelated?\nA: Bananas ripen faster next to apples because ethylene gas accumulates in closed bags.\n"
    )
    drops = dict.fromkeys(DROP_REASONS, 0)
    kept = check_pairs(PAPER, text, checks, set(), drops)
    assert [question for question, _, _ in kept] == ["What are always valid p-values?"]
    assert drops == {
        "unparseable": 2,
        "not_a_question": 1,
        "answer_too_short": 1,
        "repetitive": 1,
        "copies_abstract": 1,
        "duplicate_question": 1,
        "ungrounded": 1,
    }
    assert len(kept) + sum(drops.values()) == checks.pairs_per_paper


def test_questions_are_deduplicated_across_papers() -> None:
    checks, seen, drops = Checks(1, 5, 0.5, 12, 0.5), set(), dict.fromkeys(DROP_REASONS, 0)
    text = f"Q: What are always valid p-values?\nA: {GROUNDED}"
    assert len(check_pairs(PAPER, text, checks, seen, drops)) == 1
    assert check_pairs(PAPER, text, checks, seen, drops) == [] and drops["duplicate_question"] == 1


# --- papers --------------------------------------------------------------------------------------------------------


def test_shipped_sample_has_thirty_distinct_papers_and_the_filter_keeps_some() -> None:
    papers = read_papers(SAMPLE_PAPERS)
    assert len(papers) >= 30 and len({paper.arxiv_id for paper in papers}) == len(papers)
    g = load_params(REPO / "params.yaml").generate
    selected = select_papers(papers, categories=g.categories, keywords=g.keywords, max_papers=0)
    assert 10 <= len(selected) < len(papers)  # the filter selects, and drops some
    assert all(set(paper.categories) & set(g.categories) for paper in selected)
    assert select_papers(papers, categories=[], keywords=[], max_papers=3) == papers[:3]


def test_paper_without_an_abstract_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "papers.jsonl"
    path.write_text(
        json.dumps({"id": "1", "title": "T", "authors": "A", "abstract": "x", "categories": "stat.ME"})
        + "\n"
        + json.dumps({"id": "2", "title": "T", "authors": "A", "categories": ["stat.ME"]})
        + "\n"
    )
    with pytest.raises(DataError, match=rf"^{path}:2: 'abstract' is missing or empty"):
        read_papers(path)


# --- the stage -----------------------------------------------------------------------------------------------------


def test_disabled_stage_writes_an_empty_output_and_loads_no_model(tmp_path: Path, capsys) -> None:
    out, report, cache = tmp_path / "generated.jsonl", tmp_path / "generate.json", tmp_path / "cache.jsonl"
    code = STAGE(
        [
            "--papers",
            str(SAMPLE_PAPERS),
            "--base",
            str(tmp_path / "no-model"),
            "--cache",
            str(cache),
            "--out",
            str(out),
            "--report",
            str(report),
            "--params",
            str(REPO / "params.yaml"),
        ]
    )
    assert code == 0 and out.read_text() == "" and cache.read_text() == ""  # DVC needs every output, empty or not
    counts = json.loads(report.read_text())
    assert counts["enabled"] is False and counts["papers_read"] >= 30 and counts["papers_selected"] >= 10
    assert "make generate-qa" in capsys.readouterr().out


def test_missing_teacher_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the base stage"):
        generate_qa(
            SAMPLE_PAPERS,
            tmp_path / "out.jsonl",
            shipped_generate_config(enabled=True, max_papers=1),
            base_dir=tmp_path / "no-model",
            cache=tmp_path / "cache.jsonl",
        )


def test_invalid_config_is_rejected_before_reading_papers(tmp_path: Path) -> None:
    """GenerateConfig.validate's message, also for a config built in Python rather than loaded from params.yaml."""
    with pytest.raises(ConfigError, match=r"^generate.min_grounding is 1.5; use a share from 0 to 1"):
        generate_qa(
            tmp_path / "no-papers.jsonl",
            tmp_path / "out.jsonl",
            shipped_generate_config(min_grounding=1.5),
            base_dir=tmp_path / "no-model",
            cache=tmp_path / "cache.jsonl",
        )
    assert list(tmp_path.iterdir()) == []


def test_random_teacher_output_is_dropped_counted_and_deterministic(
    tiny_base: Path, tmp_path: Path, monkeypatch
) -> None:
    config = shipped_generate_config(enabled=True, max_papers=2, max_new_tokens=24)
    first = generate_qa(SAMPLE_PAPERS, tmp_path / "a.jsonl", config, base_dir=tiny_base, cache=tmp_path / "a-cache")
    second = generate_qa(SAMPLE_PAPERS, tmp_path / "b.jsonl", config, base_dir=tiny_base, cache=tmp_path / "b-cache")
    # exact on any CPU: the same greedy generation twice in one process (same kernels, shapes and thread count)
    assert first.pop("this_run") == second.pop("this_run") == {"answers_asked": 2, "answers_cached": 0, "requests": 0}
    assert first == second and (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a-cache").read_bytes() == (tmp_path / "b-cache").read_bytes()
    assert first["pairs_requested"] == 2 * config.pairs_per_paper
    assert first["pairs_kept"] + sum(first["dropped"].values()) == first["pairs_requested"]
    assert first["teacher"] == "tiny-random-llama (base stage)" and len(first["teacher_weights_sha256"]) == 64
    # a rerun answers from the cache: the model is not even loaded, and the output is the same
    from expqa.model import loading

    monkeypatch.setattr(loading, "load_for_inference", lambda *a, **kw: pytest.fail("the teacher was loaded"))
    third = generate_qa(SAMPLE_PAPERS, tmp_path / "c.jsonl", config, base_dir=tiny_base, cache=tmp_path / "a-cache")
    assert third.pop("this_run") == {"answers_asked": 0, "answers_cached": 2, "requests": 0} and third == first
    assert (tmp_path / "c.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()


def test_kept_rows_carry_provenance_and_feed_combine(tiny_base: Path, tmp_path: Path, monkeypatch) -> None:
    """A teacher that writes good pairs (its generation replaced): rows are valid ChatML with provenance, and
    combine takes them next to the hand-written arXiv rows."""
    answer = {"answer": f"Q: What are always valid p-values?\nA: {GROUNDED}", "stopped": True, "new_tokens": 40}
    monkeypatch.setattr(inference, "generate_answers", lambda model, tokenizer, prompts, **kw: [answer] * len(prompts))
    papers = tmp_path / "papers.jsonl"
    papers.write_text(
        json.dumps(
            {
                "id": PAPER.arxiv_id,
                "title": PAPER.title,
                "authors": PAPER.authors,
                "abstract": PAPER.abstract,
                "categories": "stat.ME",
                "license": None,
            }
        )
        + "\n"
    )
    out = tmp_path / "generated.jsonl"
    counts = generate_qa(
        papers, out, shipped_generate_config(enabled=True), base_dir=tiny_base, cache=tmp_path / "cache.jsonl"
    )
    assert counts["pairs_kept"] == 1 and counts["dropped"]["unparseable"] == counts["pairs_requested"] - 1
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    validate_conversation(row)
    assert row["source"] == "arxiv_synthetic" and row["id"] == "arxiv-gen-1512.04922-1"
    metadata = row["metadata"]
    assert metadata["arxiv_id"] == "1512.04922" and metadata["prompt_version"] == PROMPT_VERSION
    assert metadata["teacher_weights_sha256"] == counts["teacher_weights_sha256"]
    assert "arXiv:1512.04922" in metadata["attribution"] and metadata["grounding"] == 1.0
    assert metadata["sampling"] == {"temperature": 0.0, "max_tokens": 384} and metadata["output_format"] == "plain"
    data = dataclasses.replace(DataConfig(), weights={"cross_validated": 2.0, "arxiv_synthetic": 1.0})
    manifest = combine_datasets(
        [REPO / "data" / "raw" / "arxiv_synthetic.jsonl", out], tmp_path / "processed", data, seed=42
    )
    assert manifest["sources"]["arxiv_synthetic"]["read"] == 111
