"""The stats stage (seed: `get_dataset_stats`): what the model will actually see, in tokens.

Lengths are measured with the base model's tokenizer and chat template through the same function the trainer
uses (`tokenize_conversation`), so "truncated" here means truncated in training.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from expqa.chatml import load_chatml_dataset
from expqa.dataset import IGNORE_INDEX, tokenize_conversation

SPLITS = ("train", "val", "test")


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an observed length, no interpolation)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def get_dataset_stats(data_dir: str | Path, tokenizer, max_seq_lengths: list[int], bin_width: int = 128) -> dict:
    """Counts per source and split, token-length percentiles, assistant-token share, truncation rates,
    and a histogram of conversation lengths (returned under "histogram", written as a plot by the stage)."""
    data_dir = Path(data_dir)
    stats: dict = {"splits": {}, "sources": {}}
    all_lengths: list[int] = []
    assistant_tokens = total_tokens = 0
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        rows = load_chatml_dataset(path) if path.exists() else []
        lengths = []
        per_source = Counter(row["source"] for row in rows)
        for row in rows:
            example = tokenize_conversation(tokenizer, row["messages"])
            lengths.append(example["length"])
            assistant_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
            total_tokens += example["length"]
        stats["splits"][split] = {"conversations": len(rows), "tokens": sum(lengths),
                                  "by_source": dict(sorted(per_source.items()))}
        for source, count in per_source.items():
            stats["sources"].setdefault(source, {s: 0 for s in SPLITS})[split] = count
        all_lengths.extend(lengths)
    all_lengths.sort()
    stats["token_length"] = {name: percentile(all_lengths, q) for name, q in
                             (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}
    stats["assistant_token_share"] = round(assistant_tokens / total_tokens, 4) if total_tokens else 0.0
    stats["truncated_share"] = {str(n): round(sum(x > n for x in all_lengths) / len(all_lengths), 4)
                                if all_lengths else 0.0 for n in sorted(set(max_seq_lengths))}
    bins = Counter(length // bin_width * bin_width for length in all_lengths)
    stats["histogram"] = [{"tokens": start, "conversations": bins[start]} for start in sorted(bins)]
    return stats
