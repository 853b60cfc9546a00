"""Synthetic, grounded Q&A conversations from arXiv papers' metadata (stage `generate`).

A teacher reads each selected paper's title and abstract and writes question/answer pairs about it. The teacher is
either model weights run here (generate.model: base, a folder or a hub id; one prompt asks for all of a paper's
pairs in `Q:` / `A:` lines) or an OpenAI-compatible server (generate.model: http(s)://host:port/v1; one request per
pair, each asking for a JSON object {"question", "answer"} that the server constrains to a schema, teacher_endpoint.py).
Every answer goes to the answer cache (answer_cache.py) as it arrives; only what the cache lacks is asked.
Nothing is trusted: every pair passes these checks, in this order, before it is kept, and every drop is counted by
reason (the last three were added after the 135M teacher's repetition loops and pasted abstracts passed the others).
  parse      the teacher's text gives the pair (`Q:` / `A:` lines, or the JSON object; else `unparseable`)
  question   the question ends with a question mark (`not_a_question`)
  length     the answer has at least min_answer_words words (`answer_too_short`)
  repetition distinct content words are at least min_distinct_share of the answer's content words (`repetitive`)
  copying    the answer repeats no run of max_copied_words words from the abstract (`copies_abstract`)
  duplicate  no earlier kept question normalises to the same text (`duplicate_question`)
  grounding  at least min_grounding of the answer's content words occur in the title or abstract (`ungrounded`)
Decoding is greedy, so the same papers, teacher and params give the same rows, and dvc.lock means something (a
server's teacher with generate.concurrency 1: with more requests in flight their order varies, and with it what the
server batches or reuses from its prompt cache, which can change an answer slightly); a rerun that finds every answer
in the cache gives the same rows in any case. Each row carries its provenance: arXiv id, title, authors, the teacher
(weights hash, or the model id its server reported), the sampling settings, the prompt version and whether a schema
constrained the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expqa.config import ConfigError, GenerateConfig, is_endpoint
from expqa.data.answer_cache import AnswerCache, answer_key
from expqa.data.chatml import DataError, iter_jsonl, normalise_text
from expqa.data.teacher_endpoint import Endpoint, TeacherError, connect

SOURCE = "arxiv_synthetic"  # combine's source name: weighted and split with the hand-written arXiv rows
# Changing the prompt text below changes what the teacher writes: bump the version with it (it is in every row).
PROMPT_VERSION = "arxiv-qa-v1"
PROMPT = """You write study questions about one research paper, for practitioners of A/B testing and statistics.
Use only facts stated in the abstract below. Write exactly {pairs} question/answer pairs in this format:
Q: <a question a practitioner would ask>
A: <a clear answer of two or three sentences, using the abstract's own terms>

Title: {title}
Abstract: {abstract}"""
# A server's teacher is asked for one pair per request: the paper first, so that a server's prompt cache serves a
# paper's other pairs, then one aspect of it per pair number (greedy decoding would repeat one prompt's answer).
PAIR_PROMPT_VERSION = "arxiv-qa-pair-v1"
PAIR_PROMPT = """You write study questions about one research paper, for practitioners of A/B testing and statistics.
Use only facts stated in the abstract below.

Title: {title}
Abstract: {abstract}

Question {number}: ask about {aspect}. Reply with one JSON object:
{{"question": "<a question a practitioner would ask>", "answer": "<a clear answer of two or three sentences, using \
the abstract's own terms>"}}"""
ASPECTS = (
    "the problem the paper addresses",
    "the method the paper proposes",
    "the paper's main result",
    "when a practitioner should use this",
    "an assumption or limit the abstract states",
    "how this compares with the usual approach",
)  # pair n asks about ASPECTS[(n - 1) % 6]
# What the server constrains each answer to. The lengths bound a teacher stuck in a loop (its string is closed at
# the limit, and the repetition check drops it) and what it costs: 800 characters are about 200 tokens; the two or
# three sentences asked for are 200 to 500.
PAIR_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "minLength": 10, "maxLength": 200},
        "answer": {"type": "string", "minLength": 20, "maxLength": 600},
    },
    "required": ["question", "answer"],
    "additionalProperties": False,
}
# Greedy decoding, as sent to a server and recorded in each row (a local teacher decodes greedily too).
SAMPLING = {"temperature": 0.0}
DROP_REASONS = (
    "unparseable",
    "not_a_question",
    "answer_too_short",
    "repetitive",
    "copies_abstract",
    "duplicate_question",
    "ungrounded",
)
WORD_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
# Words that carry no content: an answer made of them is not grounded in anything.
STOPWORDS = frozenset(
    """a about above after again against all also an and any are as at be because been before being
between both but by can could did do does doing down during each few for from further had has have having he her here
hers him his how i if in into is it its itself just more most much must no nor not of off on once only or other our out
over own same she should so some such than that the their theirs them then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you your paper abstract
authors question answer""".split()
)
PAIR_RE = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:\*\*)?(Q|A|Question|Answer)\s*\d*\s*[:.](?:\*\*)?\s*(.*)$", re.IGNORECASE)
# Labels a small teacher repeats inside a field ("Q: Q: What ...", "A: Abstract: ..." is left alone: not a label).
LABEL_RE = re.compile(r"^(?:(?:\*\*)?(?:Q|A|Question|Answer)\s*\d*\s*[:.](?:\*\*)?\s*)+", re.IGNORECASE)


@dataclass(frozen=True)
class Paper:
    """One record of the arXiv metadata snapshot (JSON lines: id, title, authors, abstract, categories)."""

    arxiv_id: str
    title: str
    authors: str
    abstract: str
    categories: tuple[str, ...]
    license: str | None


# --- reading and selecting papers --------------------------------------------------------------------------------


def read_papers(path: Path) -> list[Paper]:
    """Papers of a metadata file; a missing or mistyped field is a DataError naming file, line and key."""
    papers = []
    for line, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(
                path,
                line,
                "expected a JSON object (one paper per line)",
                "write one object per line with id, title, authors, abstract, categories",
            )
        papers.append(_paper(row, path, line))
    return papers


def _paper(row: dict, path: Path, line: int) -> Paper:
    for key in ("id", "title", "authors", "abstract", "categories"):
        if not isinstance(row.get(key), (str, list)) or not row[key]:
            raise DataError(
                path,
                line,
                f"'{key}' is missing or empty",
                "use the arXiv metadata snapshot's fields: id, title, authors, abstract, categories "
                "(a space-separated string or a list)",
            )
    # The snapshot writes categories as one space-separated string and authors as one string.
    categories = row["categories"].split() if isinstance(row["categories"], str) else row["categories"]
    authors = row["authors"] if isinstance(row["authors"], str) else ", ".join(row["authors"])
    return Paper(
        arxiv_id=str(row["id"]),
        title=" ".join(row["title"].split()),
        authors=" ".join(authors.split()),
        abstract=" ".join(row["abstract"].split()),
        categories=tuple(categories),
        license=row.get("license"),
    )


def select_papers(papers: list[Paper], *, categories: list[str], keywords: list[str], max_papers: int) -> list[Paper]:
    """Papers in any of `categories` whose title or abstract mentions any of `keywords` (case-insensitive), in file
    order, at most `max_papers` (0: all). An empty list does not filter."""
    wanted = set(categories)
    lowered = [keyword.lower() for keyword in keywords]
    selected = [
        paper
        for paper in papers
        if (not wanted or wanted.intersection(paper.categories))
        and (not lowered or any(k in f"{paper.title} {paper.abstract}".lower() for k in lowered))
    ]
    return selected[:max_papers] if max_papers else selected


# --- prompts and parsing -------------------------------------------------------------------------------------------


def build_prompt(paper: Paper, pairs: int) -> list[dict[str, str]]:
    """The chat the teacher answers: one user turn with the instructions, title and abstract."""
    return [{"role": "user", "content": PROMPT.format(pairs=pairs, title=paper.title, abstract=paper.abstract)}]


def build_pair_prompt(paper: Paper, number: int) -> list[dict[str, str]]:
    """The chat a server's teacher answers for pair `number` (from 1) of a paper: one user turn."""
    aspect = ASPECTS[(number - 1) % len(ASPECTS)]
    content = PAIR_PROMPT.format(title=paper.title, abstract=paper.abstract, number=number, aspect=aspect)
    return [{"role": "user", "content": content}]


def parse_pair_reply(text: str) -> tuple[str, str] | None:
    """The (question, answer) of one server answer: a JSON object (also inside a ``` fence, as a server that
    refused the schema may write it), else the first `Q:` / `A:` pair; None when there is neither."""
    body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    if isinstance(reply, dict):
        fields = [reply.get("question"), reply.get("answer")]
        if all(isinstance(f, str) for f in fields):
            question, answer = (LABEL_RE.sub("", " ".join(f.split())) for f in fields)
            return (question, answer) if question and answer else None
        return None
    pairs = parse_pairs(text)
    return pairs[0] if pairs else None


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from `Q: ... / A: ...` text; continuation lines join the open field.

    A question without an answer, or an answer without a question, is not a pair.
    """
    pairs: list[tuple[str, str]] = []
    question: list[str] | None = None
    answer: list[str] | None = None

    def close() -> None:
        texts = [LABEL_RE.sub("", " ".join(" ".join(lines).split())) for lines in (question or [], answer or [])]
        if question and answer and all(texts):
            pairs.append((texts[0], texts[1]))

    for line in text.splitlines():
        match = PAIR_RE.match(line)
        if match and match.group(1)[0].lower() == "q":
            close()
            question, answer = [match.group(2)], None
        elif match and question is not None and answer is None:
            answer = [match.group(2)]
        elif line.strip() and answer is not None:
            answer.append(line)
        elif line.strip() and question is not None and answer is None:
            question.append(line)
    close()
    return pairs


def content_words(text: str) -> list[str]:
    return [word for word in WORD_RE.findall(text.lower()) if word not in STOPWORDS and len(word) > 2]


def distinct_share(answer: str) -> float:
    """Distinct content words over content words: low for a teacher stuck in a loop (1 for no content words)."""
    words = content_words(answer)
    return len(set(words)) / len(words) if words else 1.0


def copies_abstract(answer: str, paper: Paper, run: int) -> bool:
    """Whether the answer repeats `run` consecutive words of the abstract (a pasted abstract is not an answer)."""
    source, words = WORD_RE.findall(paper.abstract.lower()), WORD_RE.findall(answer.lower())
    runs = {tuple(source[i : i + run]) for i in range(len(source) - run + 1)}
    return any(tuple(words[i : i + run]) in runs for i in range(len(words) - run + 1))


def grounding(answer: str, paper: Paper) -> float:
    """Share of the answer's content words that occur in the paper's title or abstract (0 for no content words)."""
    words = content_words(answer)
    source = set(content_words(f"{paper.title} {paper.abstract}"))
    return sum(word in source for word in words) / len(words) if words else 0.0


# --- checks ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checks:
    """The thresholds a pair must pass (params: generate.*)."""

    pairs_per_paper: int
    min_answer_words: int
    min_distinct_share: float
    max_copied_words: int
    min_grounding: float


def check_pairs(
    paper: Paper, text: str, checks: Checks, seen_questions: set[str], drops: dict[str, int]
) -> list[tuple[str, str, float]]:
    """The pairs of one teacher output that pass every check, with their grounding; counts each drop by reason.

    Only the first `pairs_per_paper` pairs count; fewer parsed pairs are `unparseable` drops, so that
    kept + drops = papers x pairs_per_paper.
    """
    parsed = parse_pairs(text)[: checks.pairs_per_paper]
    drops["unparseable"] += checks.pairs_per_paper - len(parsed)
    return check_parsed(paper, parsed, checks, seen_questions, drops)


def check_parsed(
    paper: Paper, parsed: list[tuple[str, str]], checks: Checks, seen_questions: set[str], drops: dict[str, int]
) -> list[tuple[str, str, float]]:
    """The parsed pairs that pass every check after parsing, with their grounding; counts each drop by reason."""
    kept = []
    for question, answer in parsed:
        score = grounding(answer, paper)
        key = normalise_text(question)
        if not question.rstrip("*").endswith("?"):
            drops["not_a_question"] += 1
        elif len(answer.split()) < checks.min_answer_words:
            drops["answer_too_short"] += 1
        elif distinct_share(answer) < checks.min_distinct_share:
            drops["repetitive"] += 1
        elif copies_abstract(answer, paper, checks.max_copied_words):
            drops["copies_abstract"] += 1
        elif key in seen_questions:
            drops["duplicate_question"] += 1
        elif score < checks.min_grounding:
            drops["ungrounded"] += 1
        else:
            seen_questions.add(key)
            kept.append((question, answer, score))
    return kept


# --- the teacher -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teacher:
    """Where the teacher's weights are, what to call it in provenance, and the hash of its weights."""

    path: Path
    name: str
    weights_sha256: str


def resolve_teacher(model: str, base_dir: Path) -> Teacher:
    """`base` is the base stage's model (base_dir); a local directory is used as it is; anything else is a hub id,
    downloaded once into the Hugging Face cache. The weights hash covers every *.safetensors file, so a row names the
    exact weights that wrote it."""
    if model == "base":
        path = base_dir
    elif Path(model).is_dir():
        path = Path(model)
    else:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    if not path.is_dir():
        raise FileNotFoundError(
            f"teacher model folder {path} not found; run the base stage (`dvc repro base`) or "
            "set generate.model to a local model folder or a hub id"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(
            f"{path}: no *.safetensors weights; generate.model must be a Hugging Face model "
            "folder (config.json, tokenizer, safetensors weights) or a hub id"
        )
    digest = hashlib.sha256()
    for file in weights:
        digest.update(f"{file.name}:{_sha256(file)}\n".encode())
    name = _model_name(path) if model == "base" else model
    return Teacher(path=path, name=name, weights_sha256=digest.hexdigest())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _model_name(path: Path) -> str:
    info = path / "base_info.json"
    name = json.loads(info.read_text()).get("name") if info.is_file() else None
    return f"{name} (base stage)" if name else str(path)


# --- the stage -------------------------------------------------------------------------------------------------------


def generate_qa(papers: Path, out: Path, config: GenerateConfig, *, base_dir: Path, cache: Path) -> dict:
    """Write the kept conversations to `out` (JSON lines) and return the counts for metrics/generate.json.

    `papers` is the arXiv metadata file; `base_dir` the base stage's model, the teacher when config.model is
    'base'; `cache` the answer cache (answer_cache.py), created empty when missing. With config.enabled false the
    papers are still read and selected (bad input fails now, not on the first real run), but no teacher is asked and
    `out` is written empty, so `combine` always finds its input. counts["this_run"] (answers asked / taken from the
    cache, requests sent) describes this run only: the stage prints it and keeps it out of the tracked metrics.
    A TeacherError (a server's failure) says how many answers the cache keeps for the next run.
    """
    problems = config.validate()  # the one validator, for callers that built the config themselves
    if problems:
        raise ConfigError(problems)
    all_papers = read_papers(Path(papers))
    selected = select_papers(
        all_papers, categories=config.categories, keywords=config.keywords, max_papers=config.max_papers
    )
    counts: dict[str, Any] = {
        "enabled": config.enabled,
        "papers_read": len(all_papers),
        "papers_selected": len(selected),
        "prompt_version": PAIR_PROMPT_VERSION if is_endpoint(config.model) else PROMPT_VERSION,
    }
    rows: list[dict] = []
    with AnswerCache(Path(cache)) as answers:
        if config.enabled and selected:
            if is_endpoint(config.model):
                entries, provenance = _ask_endpoint(selected, config, answers)
            else:
                entries, provenance = _ask_model(selected, config, answers, Path(base_dir))
            checks = Checks(
                config.pairs_per_paper,
                config.min_answer_words,
                config.min_distinct_share,
                config.max_copied_words,
                config.min_grounding,
            )
            rows, drops = _check_answers(selected, entries, checks)
            counts.update(
                teacher=provenance["teacher"],
                teacher_weights_sha256=provenance["teacher_weights_sha256"],
                sampling=provenance["sampling"],
                output_format=sorted({entry["output_format"] for paper in entries for entry in paper}),
                pairs_requested=config.pairs_per_paper * len(selected),
                pairs_kept=len(rows),
                dropped=drops,
                papers_with_pairs=len({row["metadata"]["arxiv_id"] for row in rows}),
                this_run=provenance["this_run"],
            )
    _write_jsonl(Path(out), rows)
    return counts


def _ask_model(papers: list[Paper], config: GenerateConfig, cache: AnswerCache, base_dir: Path) -> tuple[list, dict]:
    """Each paper's cache entry (one text with all its pairs), asking the local teacher for those not cached, in
    batches of batch_size papers, each batch's answers cached before the next starts."""
    teacher = resolve_teacher(config.model, base_dir)
    sampling = {**SAMPLING, "max_tokens": config.max_new_tokens}
    identity = {"model": teacher.name, "weights_sha256": teacher.weights_sha256, "sampling": sampling}
    prompts = [build_prompt(paper, config.pairs_per_paper) for paper in papers]
    keys = [
        answer_key(prompt_version=PROMPT_VERSION, prompt=prompt, teacher=identity, paper=paper.arxiv_id, pair=0)
        for paper, prompt in zip(papers, prompts)
    ]
    missing = [i for i, key in enumerate(keys) if cache.get(key) is None]
    if missing:
        from expqa.model.loading import load_for_inference
        from expqa.serving.inference import generate_answers

        model, tokenizer = load_for_inference(teacher.path)
        for start in range(0, len(missing), config.batch_size):
            batch = missing[start : start + config.batch_size]
            outputs = generate_answers(
                model,
                tokenizer,
                [prompts[i] for i in batch],
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                label="generate",
            )
            for i, output in zip(batch, outputs):
                entry = _cache_entry(keys[i], papers[i], 0, PROMPT_VERSION, teacher.name, sampling, output["answer"])
                cache.add(
                    entry
                    | {
                        "teacher_weights_sha256": teacher.weights_sha256,
                        "output_format": "plain",
                        "finish_reason": "stop" if output["stopped"] else "length",
                    }
                )
    provenance = {
        "teacher": teacher.name,
        "teacher_weights_sha256": teacher.weights_sha256,
        "sampling": sampling,
        "this_run": {"answers_asked": len(missing), "answers_cached": len(keys) - len(missing), "requests": 0},
    }
    return [[cache.get(key)] for key in keys], provenance


def _ask_endpoint(papers: list[Paper], config: GenerateConfig, cache: AnswerCache) -> tuple[list, dict]:
    """Each paper's pairs_per_paper cache entries (one pair each), asking the server for those not cached,
    `concurrency` requests at a time. On a failure the requests not yet sent are cancelled, the answers of those in
    flight are still cached, and the TeacherError says how many answers the cache holds."""
    endpoint = connect(config)
    sampling = {**SAMPLING, "max_tokens": config.max_new_tokens}
    identity = {"endpoint_model": endpoint.model, "sampling": sampling}
    jobs = []  # (paper index, pair number, prompt, key)
    for index, paper in enumerate(papers):
        for number in range(1, config.pairs_per_paper + 1):
            prompt = build_pair_prompt(paper, number)
            key = answer_key(
                prompt_version=PAIR_PROMPT_VERSION,
                prompt=prompt,
                schema=PAIR_SCHEMA,
                teacher=identity,
                paper=paper.arxiv_id,
                pair=number,
            )
            jobs.append((index, number, prompt, key))
    missing = [job for job in jobs if cache.get(job[3]) is None]
    if missing:
        print(
            f"generate: asking {endpoint.url} ({endpoint.model}) for {len(missing)} of {len(jobs)} pairs, "
            f"{config.concurrency} at a time; {len(jobs) - len(missing)} are in {cache.path}"
        )
        _ask_concurrently(endpoint, missing, papers, config, cache, sampling)
    provenance = {
        "teacher": endpoint.model,
        "teacher_weights_sha256": None,  # a server does not say; its reported model id is in every row
        "sampling": sampling,
        "this_run": {
            "answers_asked": len(missing),
            "answers_cached": len(jobs) - len(missing),
            "requests": endpoint.requests,
        },
    }
    entries = [[] for _ in papers]
    for index, _, _, key in jobs:
        entries[index].append(cache.get(key))
    return entries, provenance


def _ask_concurrently(
    endpoint: Endpoint, jobs: list, papers: list[Paper], config: GenerateConfig, cache: AnswerCache, sampling: dict
) -> None:
    failed = threading.Event()  # set by the first failure: no worker sends another request

    def ask(job):
        if failed.is_set():
            raise CancelledError
        index, number, prompt, _ = job
        what = f"arXiv:{papers[index].arxiv_id} pair {number}"
        try:
            return endpoint.chat(prompt, max_tokens=config.max_new_tokens, schema=PAIR_SCHEMA, what=what)
        except TeacherError:
            failed.set()
            raise

    failure: TeacherError | None = None
    pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="teacher")
    try:
        futures = {pool.submit(ask, job): job for job in jobs}
        for future in as_completed(futures):  # cancelled ones come too, at once
            index, number, _, key = futures[future]
            try:
                reply = future.result()
            except CancelledError:
                continue
            except TeacherError as exc:
                if failure is None:  # the answers of requests in flight still come, and are kept
                    failure = exc
                    for pending in futures:
                        pending.cancel()
                continue
            entry = _cache_entry(key, papers[index], number, PAIR_PROMPT_VERSION, reply.model, sampling, reply.text)
            cache.add(
                entry
                | {
                    "output_format": reply.output_format,
                    "finish_reason": reply.finish_reason,
                    "completion_tokens": reply.completion_tokens,
                }
            )
    finally:  # Ctrl-C too: nothing more is sent
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise TeacherError(
            f"{failure}. {cache.added} new answers ({len(cache)} in all) are kept in {cache.path}; "
            "a rerun asks only for the rest"
        )


def _cache_entry(
    key: str, paper: Paper, pair: int, prompt_version: str, teacher: str, sampling: dict, text: str
) -> dict:
    """What the cache keeps of one answer: its key, what was asked and of whom, and the text (never an API key)."""
    return {
        "key": key,
        "paper": paper.arxiv_id,
        "pair": pair,  # 0: the local teacher's one answer with all of a paper's pairs
        "prompt_version": prompt_version,
        "teacher": teacher,
        "sampling": sampling,
        "text": text,
    }


def _check_answers(papers: list[Paper], entries: list[list[dict]], checks: Checks) -> tuple[list[dict], dict]:
    """The rows of the pairs that pass the checks, numbered per paper in order, and the drops by reason."""
    drops = dict.fromkeys(DROP_REASONS, 0)
    seen_questions: set[str] = set()
    rows = []
    for paper, answers in zip(papers, entries):
        kept = []  # (question, answer, grounding, the cache entry it came from)
        if answers[0]["pair"] == 0:  # the local teacher: every pair in one text
            checked = check_pairs(paper, answers[0]["text"], checks, seen_questions, drops)
            kept = [(*pair, answers[0]) for pair in checked]
        else:  # a server's: one pair per answer
            for entry in answers:
                pair = parse_pair_reply(entry["text"])
                if pair is None:
                    drops["unparseable"] += 1
                    continue
                kept += [(*checked, entry) for checked in check_parsed(paper, [pair], checks, seen_questions, drops)]
        for number, (question, answer, score, entry) in enumerate(kept, start=1):
            rows.append(_row(paper, number, question, answer, score, entry))
    return rows, drops


def _row(paper: Paper, number: int, question: str, answer: str, score: float, entry: dict) -> dict:
    return {
        "id": f"arxiv-gen-{paper.arxiv_id}-{number}",
        "source": SOURCE,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "arxiv_id": paper.arxiv_id,
        "paper_title": paper.title,
        "paper_authors": paper.authors,
        "metadata": {
            "arxiv_id": paper.arxiv_id,
            "url": f"https://arxiv.org/abs/{paper.arxiv_id}",
            "paper_license": paper.license,
            "teacher": entry["teacher"],
            "teacher_weights_sha256": entry.get("teacher_weights_sha256"),
            "prompt_version": entry["prompt_version"],
            "decoding": "greedy",
            "sampling": entry["sampling"],
            "output_format": entry["output_format"],
            "grounding": round(score, 4),
            "attribution": f"Question and answer written by {entry['teacher']} from the title and abstract of "
            f"arXiv:{paper.arxiv_id} ({paper.title}, by {paper.authors}); not reviewed by a person.",
        },
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """A temp file renamed over `path`: an interrupted run never leaves half an output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp, "x", encoding="utf-8", newline="\n") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
