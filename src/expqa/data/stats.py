"""The stats stage (`write_dataset_stats`, seed: `get_dataset_stats`): what the model will actually see, in tokens.

Lengths are measured with the base model's tokenizer and chat template through the same function the trainer
uses (`tokenize_conversation`), so "truncated" here means truncated in training.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from expqa.data.chatml import SPLITS, content_id, load_chatml_dataset
from expqa.data.dataset import IGNORE_INDEX, tokenize_conversation
from expqa.files import write_json
from expqa.progress import progress
from expqa.wording import plural


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an observed length, no interpolation)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def get_dataset_stats(data_dir: str | Path, tokenizer, max_seq_lengths: list[int], bin_width: int = 128) -> dict:
    """Counts per source and split, token-length percentiles, assistant-token share, truncation counts and rates,
    and a histogram of conversation lengths (returned under "histogram", written as a plot by the stage).

    A conversation is counted once: the weighted copies combine writes into train (same messages, '#wN' ids) count
    as its "rows", and its tokens as often as it is trained on, but its length enters the percentiles, truncation
    and histogram once (combine removed exact duplicates, so equal messages in a split are copies)."""
    data_dir = Path(data_dir)
    stats: dict = {"splits": {}, "sources": {}}
    all_lengths: list[int] = []
    assistant_tokens = total_tokens = 0
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        rows = load_chatml_dataset(path) if path.exists() else []
        measured: dict[str, tuple[int, int]] = {}  # content id -> (tokens, assistant tokens), once per conversation
        per_source: Counter[str] = Counter()
        tokens = 0
        for row in progress(rows, desc=f"stats: tokenize {split}", unit="row"):
            key = content_id(row["messages"])
            if key not in measured:
                example = tokenize_conversation(tokenizer, row["messages"])
                measured[key] = example["length"], sum(label != IGNORE_INDEX for label in example["labels"])
                per_source[row["source"]] += 1
            length, assistant = measured[key]
            tokens += length  # tokens and the assistant share count every row: what training sees
            assistant_tokens += assistant
        total_tokens += tokens
        stats["splits"][split] = {
            "conversations": len(measured),
            "rows": len(rows),
            "tokens": tokens,
            "by_source": dict(sorted(per_source.items())),
        }
        for source, count in per_source.items():
            stats["sources"].setdefault(source, {s: 0 for s in SPLITS})[split] = count
        all_lengths.extend(length for length, _ in measured.values())
    all_lengths.sort()
    stats["token_length"] = {
        name: percentile(all_lengths, q) for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }
    stats["assistant_token_share"] = round(assistant_tokens / total_tokens, 4) if total_tokens else 0.0
    truncated = {str(n): sum(x > n for x in all_lengths) for n in sorted(set(max_seq_lengths))}
    stats["truncated"] = truncated  # conversations longer than max_seq_length, per length
    stats["truncated_share"] = {
        n: round(count / len(all_lengths), 4) if all_lengths else 0.0 for n, count in truncated.items()
    }
    bins = Counter(length // bin_width * bin_width for length in all_lengths)
    stats["histogram"] = [{"tokens": start, "conversations": bins[start]} for start in sorted(bins)]
    return stats


def write_dataset_stats(
    data_dir: Path, tokenizer_dir: Path, max_seq_lengths: list[int], out: Path, histogram: Path
) -> dict:
    """The stage: `get_dataset_stats` with the tokenizer and chat template in `tokenizer_dir` (the base model),
    written to `out` (JSON) and the histogram to `histogram` (CSV: tokens,conversations, one row per bin).

    Returns the stats without the histogram, as written to `out` (for `summary_line`)."""
    from transformers import AutoTokenizer  # slow to import: only when a tokenizer is needed

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stats = get_dataset_stats(data_dir, tokenizer, max_seq_lengths)
    bins = stats.pop("histogram")
    write_json(Path(out), stats)
    histogram = Path(histogram)
    histogram.parent.mkdir(parents=True, exist_ok=True)
    histogram.write_text(
        "tokens,conversations\n" + "".join(f"{row['tokens']},{row['conversations']}\n" for row in bins)
    )
    return stats


def summary_line(stats: dict) -> str:
    """The stage's console line: conversations (and rows, when weighting copied some), truncation counts, median."""
    splits = stats["splits"].values()
    conversations, rows = sum(s["conversations"] for s in splits), sum(s["rows"] for s in splits)
    copies = f" ({plural(rows, 'row')} with the weighted train copies)" if rows != conversations else ""
    truncated = ", ".join(f"{count} longer than {n} tokens" for n, count in stats["truncated"].items())
    p50 = plural(stats["token_length"]["p50"], "token")
    return f"stats: {plural(conversations, 'conversation')}{copies}; {truncated}; p50 {p50}"
