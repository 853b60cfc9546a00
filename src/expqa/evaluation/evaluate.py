"""The evaluate stage: base and fine-tuned side by side on the held-out test split and the critical questions.

- perplexity on assistant tokens of the test conversations (the same labels training uses), pooled over tokens;
- ROUGE-1/2/L F1 of greedy answers to each test conversation's last user turn against the reference answer;
- stop rate: share of those generations that end with an end-of-turn token before eval.max_new_tokens;
- critical-questions accuracy under two scorings of the same log-likelihoods (no generation, deterministic):
  * length_norm: the option with the highest mean log-probability per option token, given the question as the
    user turn (lm-evaluation-harness's acc_norm normalises by characters instead; this is per token);
  * calibrated: the option with the highest sum of log-probabilities given the question minus the sum given an
    empty user turn (same chat template, same assistant header), i.e. log p(option | question) / p(option): the
    pointwise mutual information that lm-evaluation-harness reports as acc_mutual_info (there the unconditional
    context is the empty string). It removes the preference for options that are likely whatever was asked.
  Each question also counts as taught or not taught: taught when one of its `taught_by` conversations is in the
  train split that trained the model (ids of data/processed/train.jsonl; weighted copies `id#w2` count as `id`).
`compare_models` turns both models' per-item results into the report: per metric base, tuned, difference, 95 %
intervals and a paired test (expqa.evaluation.significance). Memory stays flat: every batch is reduced to a few numbers
before the next one runs. `evaluate_base_vs_tuned` is the stage from input files to the report;
`write_eval_outputs` writes it, and `headline` the few rounded numbers DVC shows (`dvc exp show`, `dvc metrics diff`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from expqa.config import EvalConfig, GenerationConfig
from expqa.data.chatml import load_chatml_dataset
from expqa.data.dataset import IGNORE_INDEX, render, tokenize_conversation
from expqa.files import write_json
from expqa.progress import progress
from expqa.serving.inference import batches, decoding_options, generate_answers
from expqa.wording import plural


def pad_right(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences])


LOGIT_CHUNK = 4096  # label positions projected onto the vocabulary at once


@torch.no_grad()
def sequence_logprobs(model, input_ids: list[list[int]], labels: list[list[int]]) -> list[tuple[float, int]]:
    """(sum of log p(label token | prefix), number of label tokens) for each sequence of one batch.

    The vocabulary projection runs only at positions that predict a label: with a 49k-128k vocabulary, full
    logits for a batch of 512-token rows would take gigabytes and most of the time.
    """
    ids = pad_right(input_ids, 0).to(model.device)
    mask = pad_right([[1] * len(s) for s in input_ids], 0).to(model.device)
    target = pad_right(labels, IGNORE_INDEX).to(model.device)[:, 1:]
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)
    head, wanted, picked = model.get_output_embeddings(), target[rows, cols], []
    for start in range(0, len(rows), LOGIT_CHUNK):  # 4096 positions x a 128k vocabulary in float32 = 2 GB
        chunk = slice(start, start + LOGIT_CHUNK)
        logits = head(hidden[rows[chunk], cols[chunk]]).float()
        picked.append(logits.gather(-1, wanted[chunk, None])[:, 0] - torch.logsumexp(logits, dim=-1))
    picked = torch.cat(picked) if picked else torch.zeros(0, device=ids.device)
    sums = torch.zeros(len(input_ids), device=picked.device).index_add_(0, rows, picked)
    counts = torch.bincount(rows, minlength=len(input_ids))
    return list(zip(sums.tolist(), counts.tolist()))


def score_examples(
    model, examples: list[dict], batch_size: int, desc: str = "score", position: int | None = None
) -> list[tuple[float, int]]:
    """sequence_logprobs of every example, in batches of similar length (little padding), in input order.
    desc, position: the progress bar's (expqa.progress)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for batch in progress(
        batches(order, batch_size), desc=desc, total=-(-len(order) // batch_size), unit="batch", position=position
    ):
        results = sequence_logprobs(
            model, [examples[i]["input_ids"] for i in batch], [examples[i]["labels"] for i in batch]
        )
        for index, result in zip(batch, results):
            scores[index] = result
    return scores


def perplexity(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_length: int,
    batch_size: int,
    label: str = "evaluate",
    position: int | None = None,
) -> dict:
    """exp(mean negative log-likelihood per assistant token) over all conversations, and each conversation's
    (sum of log-probabilities, assistant tokens) for the bootstrap."""
    examples = [tokenize_conversation(tokenizer, messages, max_length) for messages in conversations]
    scores = score_examples(model, examples, batch_size, f"{label}: perplexity", position)
    total_logprob, total_tokens = sum(s for s, _ in scores), sum(c for _, c in scores)
    if total_tokens == 0:
        raise ValueError(
            f"no assistant tokens left within max_length={max_length} (train.max_seq_length) in the "
            "evaluated conversations; raise train.max_seq_length or eval.max_examples"
        )
    return {
        "perplexity": math.exp(-total_logprob / total_tokens),
        "assistant_tokens": total_tokens,
        "per_conversation": scores,
    }


# ---------------------------------------------------------------------------------------------------------------
# scoring many sequences that share prefixes: each shared prefix computed once


TREE_TOKENS = 256  # tokens of one packed prefix tree: attention over a row costs its square, so rows stay short


def pack_prefix_trees(examples: list[dict], max_tokens: int = TREE_TOKENS) -> list[dict]:
    """The examples (input_ids, labels) as prefix trees of at most max_tokens nodes (an example longer than that
    gets a tree of its own): a prefix that several examples share is one path of nodes, each token after it a node
    whose parent is the token before it. Examples are inserted in token order, so that the options of one question
    (one prompt), and all the prompts' common chat-template head, meet in one tree.

    Each tree: ids, positions (depth: the position the token has in its own sequence), parents (-1 for a root) and
    targets (node that predicts the label, label token, example index) for every label after the first token.
    """
    order = sorted(range(len(examples)), key=lambda i: examples[i]["input_ids"])
    trees: list[dict] = []
    tree, children = None, {}
    for index in order:
        ids, labels = examples[index]["input_ids"], examples[index]["labels"]
        node, shared = -1, 0
        while shared < len(ids) and (node, ids[shared]) in children:  # how much of it the current tree holds
            node = children[node, ids[shared]]
            shared += 1
        if tree is None or (len(tree["ids"]) + len(ids) - shared > max_tokens and tree["ids"]):
            tree = {"ids": [], "positions": [], "parents": [], "targets": []}
            trees.append(tree)
            children = {}
        nodes, node = [], -1
        for position, token in enumerate(ids):
            if (node, token) not in children:
                children[node, token] = len(tree["ids"])
                tree["ids"].append(token)
                tree["positions"].append(position)
                tree["parents"].append(node)
            node = children[node, token]
            nodes.append(node)
        tree["targets"] += [(nodes[t - 1], labels[t], index) for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    return trees


def tree_attention_mask(trees: list[dict], width: int, dtype: torch.dtype) -> torch.Tensor:
    """(trees, 1, width, width) additive mask: a node sees itself and its ancestors, nothing else (so each
    example's tokens see exactly the prefix they have in their own sequence); a padding node sees itself only."""
    allowed = np.zeros((len(trees), width, width), dtype=bool)
    for row, tree in enumerate(trees):
        for node, parent in enumerate(tree["parents"]):
            if parent >= 0:
                allowed[row, node] = allowed[row, parent]
            allowed[row, node, node] = True
        for pad in range(len(tree["parents"]), width):
            allowed[row, pad, pad] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask[~torch.from_numpy(allowed)] = torch.finfo(dtype).min
    return mask[:, None]


@torch.no_grad()
def tree_logprobs(model, trees: list[dict], results: list[tuple[float, int]]) -> None:
    """sequence_logprobs for the examples packed in one batch of trees, written into results[example index]."""
    width = max(len(tree["ids"]) for tree in trees)
    device, dtype = model.device, model.get_output_embeddings().weight.dtype
    ids = pad_right([tree["ids"] for tree in trees], 0).to(device)
    positions = pad_right([tree["positions"] for tree in trees], 0).to(device)
    mask = tree_attention_mask(trees, width, dtype).to(device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    rows = torch.tensor([row for row, tree in enumerate(trees) for _ in tree["targets"]], device=device)
    nodes = torch.tensor([node for tree in trees for node, _, _ in tree["targets"]], device=device)
    wanted = torch.tensor([token for tree in trees for _, token, _ in tree["targets"]], device=device)
    owners = [example for tree in trees for _, _, example in tree["targets"]]
    head, picked = model.get_output_embeddings(), []
    for start in range(0, len(rows), LOGIT_CHUNK):
        chunk = slice(start, start + LOGIT_CHUNK)
        logits = head(hidden[rows[chunk], nodes[chunk]]).float()
        picked.append(logits.gather(-1, wanted[chunk, None])[:, 0] - torch.logsumexp(logits, dim=-1))
    for example, logprob in zip(owners, torch.cat(picked).tolist() if picked else []):
        total, count = results[example]
        results[example] = (total + logprob, count + 1)


def score_shared_prefixes(
    model, examples: list[dict], batch_size: int, desc: str = "score", position: int | None = None
) -> list[tuple[float, int]]:
    """What score_examples gives (sum of label log-probabilities, label tokens per example, in input order),
    with every prefix that examples share computed once: the examples packed into prefix trees
    (pack_prefix_trees), batch_size trees per forward pass. For the critical questions this runs about a third
    of the tokens: a question's four options share its prompt, and all prompts share the chat template's head."""
    trees = pack_prefix_trees(examples)
    trees.sort(key=lambda tree: len(tree["ids"]))  # similar widths in one batch: little padding
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for batch in progress(
        batches(trees, batch_size), desc=desc, total=-(-len(trees) // batch_size), unit="batch", position=position
    ):
        tree_logprobs(model, batch, results)
    return results


# ---------------------------------------------------------------------------------------------------------------
# critical questions


def option_example(tokenizer, question: str, option: str) -> dict:
    """Token ids of prompt + option, with labels on the option's tokens only (no end-of-turn token)."""
    prompt = render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    encoded = tokenizer(prompt + option, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if start >= len(prompt) else IGNORE_INDEX
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return {"input_ids": encoded["input_ids"], "labels": labels}


def choose_option(scores: list[tuple[float, int]]) -> int:
    """Index of the option with the highest mean log-probability per token (length-normalised)."""
    means = [logprob / max(count, 1) for logprob, count in scores]
    return max(range(len(means)), key=lambda i: (means[i], -i))


def choose_calibrated(scores: list[tuple[float, int]], unconditional: list[float]) -> int:
    """Index of the option with the highest log p(option | question) - log p(option | empty user turn)."""
    gains = [logprob - prior for (logprob, _), prior in zip(scores, unconditional)]
    return max(range(len(gains)), key=lambda i: (gains[i], -i))


def critical_questions_accuracy(
    model, tokenizer, questions: list[dict], batch_size: int, label: str = "evaluate", position: int | None = None
) -> dict:
    """Every option of every question scored with the question as the user turn and, once per distinct option
    text, after an empty user turn (both scorings), in one pass over prefix trees (score_shared_prefixes)."""
    examples = [option_example(tokenizer, q["question"], option) for q in questions for option in q["options"]]
    distinct = sorted({option for q in questions for option in q["options"]})
    examples += [option_example(tokenizer, "", option) for option in distinct]
    scored = score_shared_prefixes(model, examples, batch_size, f"{label}: critical questions", position)
    scores = scored[: len(scored) - len(distinct)]
    prior = {option: logprob for option, (logprob, _) in zip(distinct, scored[len(scores) :])}
    per_question, start = [], 0
    for q in questions:
        own = scores[start : start + len(q["options"])]
        start += len(q["options"])
        chosen, calibrated = choose_option(own), choose_calibrated(own, [prior[o] for o in q["options"]])
        per_question.append({"id": q["id"], "chosen": chosen, "chosen_calibrated": calibrated, "answer": q["answer"]})
    n = len(questions)
    return {
        "accuracy": sum(q["chosen"] == q["answer"] for q in per_question) / n,
        "accuracy_calibrated": sum(q["chosen_calibrated"] == q["answer"] for q in per_question) / n,
        "questions": n,
        "per_question": per_question,
    }


def load_questions(path: str | Path) -> list[dict]:
    questions = []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        q = json.loads(line)
        if not (
            isinstance(q.get("options"), list)
            and len(q["options"]) >= 2
            and isinstance(q.get("answer"), int)
            and 0 <= q["answer"] < len(q["options"])
        ):
            raise ValueError(
                f"{path}:{line_number}: needs 'question', 'options' (>= 2) and 'answer' (an index into options)"
            )
        questions.append(q)
    return questions


# ---------------------------------------------------------------------------------------------------------------
# generation: ROUGE and stop rate


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return [{k: v.fmeasure for k, v in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]


def evaluate_model(
    model,
    tokenizer,
    test_rows: list[dict],
    questions: list[dict],
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    decoding: dict | None = None,
    label: str = "evaluate",
    position: int | None = None,
) -> tuple[dict, list[dict]]:
    """All metrics for one model; returns (summary, per-item rows: test conversations, then questions).

    The per-item rows carry what compare_models needs (log-probability and tokens, ROUGE, stopped, chosen options).
    Prints how long each part took. label, position: its progress bars' name and terminal line (expqa.progress).
    """
    started = time.perf_counter()
    ppl = perplexity(model, tokenizer, [r["messages"] for r in test_rows], max_length, batch_size, label, position)
    scored = time.perf_counter()
    prompts = [r["messages"][:-1] for r in test_rows]
    references = [r["messages"][-1]["content"] for r in test_rows]
    generations = generate_answers(
        model, tokenizer, prompts, max_new_tokens, batch_size, label, position, decoding=decoding
    )
    generated = time.perf_counter()
    rouge = rouge_scores([g["answer"] for g in generations], references)
    mc = critical_questions_accuracy(model, tokenizer, questions, batch_size, label, position)
    new_tokens = sum(g["new_tokens"] for g in generations)
    seconds = (scored - started, generated - scored, time.perf_counter() - generated)
    print(timing_line(label, model.device.type, batch_size, new_tokens, len(questions), seconds), flush=True)
    rows = [
        {"id": row["id"], **g, **r, "logprob": lp, "tokens": n}
        for row, g, r, (lp, n) in zip(test_rows, generations, rouge, ppl["per_conversation"])
    ]
    rows += [
        {"id": q["id"], "chosen": q["chosen"], "chosen_calibrated": q["chosen_calibrated"], "answer_index": q["answer"]}
        for q in mc["per_question"]
    ]
    return summarize(rows), rows


def summarize(rows: list[dict]) -> dict:
    """One model's summary from its per-item rows (evaluate_model's): pooled perplexity, mean ROUGE, stop rate,
    both critical-question accuracies."""
    conversations = [r for r in rows if "logprob" in r]
    questions = [r for r in rows if "answer_index" in r]
    tokens = sum(r["tokens"] for r in conversations)
    summary = {"perplexity": math.exp(-sum(r["logprob"] for r in conversations) / tokens), "assistant_tokens": tokens}
    for key in ("rouge1", "rouge2", "rougeL"):
        summary[key] = sum(r[key] for r in conversations) / len(conversations)
    summary["stop_rate"] = sum(r["stopped"] for r in conversations) / len(conversations)
    for key, field in (("", "chosen"), ("_calibrated", "chosen_calibrated")):
        right = sum(r[field] == r["answer_index"] for r in questions)
        summary["critical_questions_accuracy" + key] = right / len(questions) if questions else 0.0
    return summary


def timing_line(
    label: str, device: str, batch_size: int, new_tokens: int, questions: int, seconds: tuple[float, float, float]
) -> str:
    """evaluate_model's console line, named by its label ("evaluate base", "evaluate tuned"): with two models in
    the log, or side by side in two processes, a line that does not say which model it timed says nothing."""
    perplexity, generation, scoring = seconds
    return (
        f"{label}: {device}, batch {batch_size}: perplexity {perplexity:.1f} s; generation "
        f"{plural(new_tokens, 'token')} in {generation:.1f} s ({new_tokens / max(generation, 1e-9):.0f} tokens/s); "
        f"{plural(questions, 'question')} x options scored in {scoring:.1f} s"
    )


def _load(model: str | tuple[str, str]):
    """model: a model folder, or (base folder, adapter folder): the adapter merged in memory (the SFT model when
    the align stage tuned further, so that no second merged copy is written to disk)."""
    from expqa.model.loading import load_for_inference

    if isinstance(model, tuple):
        loaded, tokenizer = load_for_inference(model[0], adapter_dir=model[1])
        return loaded.merge_and_unload(), tokenizer
    return load_for_inference(model)


def _evaluate_share(
    models: dict[str, str | tuple[str, str]],
    test_rows: list[dict],
    questions: list[dict],
    threads: int,
    options: dict,
    share: tuple[int, int] = (0, 1),
) -> dict[str, tuple[dict, list[dict]]]:
    """evaluate_model for each model on share (k, n) of the items: test rows and questions k, k + n, k + 2n, ..."""
    if threads:
        torch.set_num_threads(threads)
    k, n = share
    part = f" (part {k + 1} of {n})" if n > 1 else ""
    results = {}
    for name, model in models.items():
        loaded, tokenizer = _load(model)
        results[name] = evaluate_model(
            loaded, tokenizer, test_rows[k::n], questions[k::n], **options, label=f"evaluate {name}{part}"
        )
        del loaded
    return results


def _interleave(parts: list[list[dict]]) -> list[dict]:
    """The inverse of taking items k::n for k in 0..n-1."""
    merged: list[dict] = [{}] * sum(len(p) for p in parts)
    for k, part in enumerate(parts):
        merged[k :: len(parts)] = part
    return merged


def evaluate_models(
    models: dict[str, str | Path | tuple[str, str]],
    test_rows: list[dict],
    questions: list[dict],
    config: EvalConfig,
    generation: GenerationConfig,
    *,
    max_length: int,
) -> dict[str, tuple[dict, list[dict]]]:
    """evaluate_model for each named model (a folder, or a (base, adapter) pair): all in this process, or with
    eval.num_processes = n > 1 in n processes (spawned) of eval.num_threads torch threads each (0 = torch's
    default), process k taking items k, k + n, ... of every model; the rows are put back in order and each model's
    summary computed from all of them. max_length: train.max_seq_length, the length the model was trained on.

    Splitting the items rather than the models keeps every process busy to the end whatever the number of models
    (three models on two processes would leave one alone for a third of the time), and single-thread processes on
    a 2-core CPU avoid the per-operation barrier between 2 threads of one process, which stalls whenever other jobs
    share the cores.
    """
    processes = min(config.num_processes, len(test_rows), max(len(questions), 1))  # no process without items
    paths = {name: tuple(str(p) for p in m) if isinstance(m, tuple) else str(m) for name, m in models.items()}
    options = dict(
        max_length=max_length,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        decoding=decoding_options(generation),
    )
    if processes <= 1:
        return _evaluate_share(paths, test_rows, questions, config.num_threads, options)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            # each process draws its bars on its own terminal line
            pool.submit(
                _evaluate_share,
                paths,
                test_rows,
                questions,
                config.num_threads,
                {**options, "position": k},
                (k, processes),
            )
            for k in range(processes)
        ]
        shares = [future.result() for future in futures]
    results = {}
    for name in paths:
        rows = [share[name][1] for share in shares]
        conversations = _interleave([[r for r in part if "logprob" in r] for part in rows])
        answered = _interleave([[r for r in part if "answer_index" in r] for part in rows])
        results[name] = (summarize(conversations + answered), conversations + answered)
    return results


# ---------------------------------------------------------------------------------------------------------------
# the report: base vs tuned with intervals and paired tests


def taught_question_ids(questions: list[dict], train_ids: list[str]) -> set[str]:
    """Questions with at least one `taught_by` conversation in the train split (weighted copies `id#w2` = `id`)."""
    trained = {row_id.split("#", 1)[0] for row_id in train_ids}
    return {q["id"] for q in questions if any(t in trained for t in q.get("taught_by", []))}


def compare_models(base: list[dict], tuned: list[dict], taught: set[str], *, samples: int, seed: int) -> dict:
    """metrics/eval.json from both models' per-item rows (evaluate_model's second value, same order).

    Per metric: base, tuned, delta (tuned - base), 95 % intervals of each and of the delta, a paired test (see
    expqa.evaluation.significance); critical questions per scoring, all / taught / not taught.
    """
    from expqa.evaluation.significance import (
        bootstrap_indices,
        compare_per_item,
        compare_proportions,
        mean_statistic,
        percentile_interval,
        pooled_perplexity,
    )

    conv_b, conv_t = [r for r in base if "logprob" in r], [r for r in tuned if "logprob" in r]
    indices = bootstrap_indices(len(conv_b), samples, seed)
    report = {"test_examples": len(conv_b)}
    lp_b = np.array([[r["logprob"], r["tokens"]] for r in conv_b])
    lp_t = np.array([[r["logprob"], r["tokens"]] for r in conv_t])
    # the sign test compares each conversation's mean log-probability per assistant token (higher = better)
    report["perplexity"] = compare_per_item(
        lp_b, lp_t, pooled_perplexity, [t[0] / max(t[1], 1) - b[0] / max(b[1], 1) for b, t in zip(lp_b, lp_t)], indices
    )
    relative = pooled_perplexity(lp_t[indices]) / pooled_perplexity(lp_b[indices]) - 1  # paired bootstrap
    lo, hi = percentile_interval(relative)
    report["perplexity"].update(
        assistant_tokens=int(lp_b[:, 1].sum()),
        relative_delta=report["perplexity"]["tuned"] / report["perplexity"]["base"] - 1,
        relative_delta_ci95_lo=lo,
        relative_delta_ci95_hi=hi,
    )
    for key in ("rouge1", "rouge2", "rougeL"):
        values_b, values_t = np.array([r[key] for r in conv_b]), np.array([r[key] for r in conv_t])
        report[key] = compare_per_item(values_b, values_t, mean_statistic, list(values_t - values_b), indices)
    report["stop_rate"] = compare_proportions([r["stopped"] for r in conv_b], [r["stopped"] for r in conv_t], indices)
    q_b, q_t = [r for r in base if "answer_index" in r], [r for r in tuned if "answer_index" in r]
    critical = {"questions": len(q_b), "taught": sum(r["id"] in taught for r in q_b)}
    subsets = {"": lambda r: True, "_taught": lambda r: r["id"] in taught, "_untaught": lambda r: r["id"] not in taught}
    for scoring, field in (("length_norm", "chosen"), ("calibrated", "chosen_calibrated")):
        for suffix, keep in subsets.items():
            pairs = [(b, t) for b, t in zip(q_b, q_t) if keep(b)]
            if not pairs:
                continue
            q_indices = bootstrap_indices(len(pairs), samples, seed)
            critical[scoring + suffix] = compare_proportions(
                [b[field] == b["answer_index"] for b, _ in pairs],
                [t[field] == t["answer_index"] for _, t in pairs],
                q_indices,
            )
    report["critical_questions"] = critical
    return report


# ---------------------------------------------------------------------------------------------------------------
# the stage function and its outputs


def evaluate_base_vs_tuned(
    base: Path,
    tuned: Path,
    test: Path,
    train: Path,
    config: EvalConfig,
    generation: GenerationConfig,
    *,
    seed: int,
    max_length: int,
    sft_adapter: Path | None = None,
) -> tuple[dict, dict]:
    """Both models (three with ``sft_adapter``: base + that adapter is the SFT model, tuned the SFT + preference
    one) on the test split (at most eval.max_examples conversations) and eval.critical_questions, each
    question marked taught when the train split holds one of its conversations; compared with eval.bootstrap_samples
    resamples seeded with base.seed; answers decoded as params.yaml's generation section says (the repetition penalty
    ask and chat use; eval.max_new_tokens long). Returns (report: metrics/eval.json, {"base": rows, "tuned": rows}
    and "sft": rows with three models). The report's top level is base vs tuned either way; with three models it
    also holds "sft_vs_base" and "tuned_vs_sft", blocks of the same form in which "base" is the first model named
    in the block's "compared" and "tuned" the second.

    Raises ValueError or OSError for a missing or malformed input file before any model is loaded.
    """
    questions = load_questions(config.critical_questions)
    test_rows = load_chatml_dataset(test)
    taught = taught_question_ids(questions, [row["id"] for row in load_chatml_dataset(train)])
    if config.max_examples:
        test_rows = test_rows[: config.max_examples]  # test.jsonl is in hash order: a fixed sample
    models = {"base": base, "tuned": tuned}
    if sft_adapter is not None:
        models = {"base": base, "sft": (base, sft_adapter), "tuned": tuned}
    results = evaluate_models(models, test_rows, questions, config, generation, max_length=max_length)
    examples = {name: rows for name, (_, rows) in results.items()}
    compare = functools.partial(compare_models, taught=taught, samples=config.bootstrap_samples, seed=seed)
    report = compare(examples["base"], examples["tuned"])
    if sft_adapter is not None:
        report["models"] = ["base", "sft", "tuned"]
        report["sft_vs_base"] = {"compared": ["base", "sft"], **compare(examples["base"], examples["sft"])}
        report["tuned_vs_sft"] = {"compared": ["sft", "tuned"], **compare(examples["sft"], examples["tuned"])}
    return report, examples


# The headline: the numbers `dvc exp show` and `dvc metrics diff` list (dvc.yaml declares only this file as metrics;
# the report stays a plain output). Short names, because each number that differs between experiments is a column
# of `dvc exp show --only-changed` as wide as its name + 3: with the Experiment (~27) and Created (~10) columns and a
# changed param, 120 columns hold six, and the base values drop out there (the base model does not change).
# cq: the critical questions under the calibrated scoring (the one that discounts options likely whatever was asked).
HEADLINE = {"ppl": ("perplexity",), "rougeL": ("rougeL",), "cq": ("critical_questions", "calibrated")}
# Rounded so that a rerun which differs only in noise shows no row in `dvc metrics diff`: values to 4 significant
# digits (perplexity 19.90, ROUGE-L 0.1087: finer than expqa verify's tolerances; an accuracy over 204 questions
# moves in steps of 0.0049), p-values to 2 (whether p is 0.04 or 0.3 is what counts, not its third digit); and
# both to DVC's 5 decimals (`--precision` of `dvc exp show` / `metrics diff`), so that no two values DVC prints
# the same differ (p 3.1e-05 and 3.0e-05 made a "0.0" row): p below 0.000005 reads 0.0
VALUE_DIGITS, P_DIGITS, DVC_DECIMALS = 4, 2, 5


def significant(value: float, digits: int) -> float:
    """value to `digits` significant digits and at most DVC_DECIMALS decimals (never -0.0, which DVC prints)."""
    return round(float(f"{value:.{digits}g}"), DVC_DECIMALS) + 0.0


def headline(report: dict) -> dict:
    """The report's key numbers: per HEADLINE metric base, tuned and the paired test's p-value, rounded."""
    numbers = {}
    for name, path in HEADLINE.items():
        block = report
        for key in path:
            block = block[key]
        numbers[name] = {
            "base": significant(block["base"], VALUE_DIGITS),
            "tuned": significant(block["tuned"], VALUE_DIGITS),
            "p": significant(block["p_value"], P_DIGITS),
        }
        if "tuned_vs_sft" in report:  # three models: the SFT model's value and tuned's test against it
            against_sft = report["tuned_vs_sft"]
            for key in path:
                against_sft = against_sft[key]
            numbers[name]["sft"] = significant(against_sft["base"], VALUE_DIGITS)
            numbers[name]["p_vs_sft"] = significant(against_sft["p_value"], P_DIGITS)
    return numbers


def write_eval_outputs(report: dict, examples: dict, *, out: Path, examples_path: Path, plot: Path) -> None:
    """metrics/eval.json (the report), metrics/eval_examples.jsonl (base and tuned side by side per item) and the
    ROUGE-L scatter plot's CSV (one row per test conversation; question rows have no ROUGE)."""
    write_json(out, report)
    for path in (examples_path, plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(examples_path, "w", encoding="utf-8") as handle:
        for rows in zip(*examples.values()):
            record = {"id": rows[0]["id"], **dict(zip(examples, rows))}
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    plot.write_text(
        "id,base,tuned\n"
        + "".join(
            f"{b['id']},{b['rougeL']:.4f},{t['rougeL']:.4f}\n"
            for b, t in zip(examples["base"], examples["tuned"])
            if "rougeL" in b
        )
    )


def eval_summary(report: dict) -> str:
    """One line per comparison: each headline metric first -> second model with its paired test's p-value."""
    blocks = [("base -> tuned", report)]
    if "tuned_vs_sft" in report:
        blocks = [("base -> sft", report["sft_vs_base"]), ("sft -> tuned", report["tuned_vs_sft"]), *blocks]
    lines = []
    for title, block in blocks:
        critical = block["critical_questions"]
        lines.append(
            f"evaluate {title}: "
            + ", ".join(
                f"{k} {v['base']:.3f} -> {v['tuned']:.3f} (p {v['p_value']:.3g})"
                for k, v in (
                    ("perplexity", block["perplexity"]),
                    ("rougeL", block["rougeL"]),
                    ("stop_rate", block["stop_rate"]),
                    ("critical questions (length_norm)", critical["length_norm"]),
                    ("critical questions (calibrated)", critical["calibrated"]),
                    ("taught (calibrated)", critical.get("calibrated_taught")),
                )
                if v is not None
            )
        )
    return "\n".join(lines)
