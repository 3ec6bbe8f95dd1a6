"""Metric functions (seqio ``metric_fns``: ``fn(targets, predictions) -> {name: value}``) and the
postprocessors that turn decoded text into what they compare.

Values are percentages (x100), as T5 reports them. numpy only (scipy's ``rankdata`` for
Spearman when it is installed; an equivalent numpy ranking otherwise).

Postprocessors take ``(output, example=None, is_target=False)`` as seqio calls them; ``example``
is the task's preprocessed example (numpy values), used where the target is not just the decoded
target text (SQuAD / ReCoRD answer lists, MultiRC question groups, WSC labels).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# Postprocessors
# ---------------------------------------------------------------------------------------------


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if isinstance(x, np.ndarray) and x.shape == ():
        return _text(x.item())
    return str(x)


def string_label_to_class_id(label_classes: Sequence[str], default: int = -1) -> Callable:
    """Decoded label name -> its index in ``label_classes`` (``default`` if none matches)."""
    index = {c: i for i, c in enumerate(label_classes)}

    def fn(output, example=None, is_target=False):
        return index.get(_text(output).strip(), default)

    return fn


def string_to_float(output, example=None, is_target=False, default: float = -1.0) -> float:
    """Decoded number -> float (``default`` when it is not a number)."""
    try:
        return float(_text(output).strip())
    except ValueError:
        return default


def qa_answers(output, example=None, is_target=False):
    """Targets: all reference answers of the example (SQuAD, ReCoRD); predictions: the text."""
    if is_target and example is not None and "answers" in example:
        answers = [_text(a) for a in np.asarray(example["answers"]).reshape(-1)]
        return answers or [_text(output)]
    return _text(output)


def multirc(output, example=None, is_target=False):
    """{"group": question id, "value": 0/1 (-1 invalid)}: MultiRC scores answers per question."""
    value = string_label_to_class_id(["False", "True"])(output)
    group = ""
    if example is not None and "idx" in example:
        idx = example["idx"]
        group = f"{int(idx['paragraph'])}-{int(idx['question'])}" if isinstance(idx, Mapping) \
            else str(int(idx))
    return {"group": group, "value": value}


def axg(output, example=None, is_target=False):
    """{"group": idx // 2, "value": class}: AX-g pairs sentences that differ only in gender."""
    value = string_label_to_class_id(["entailment", "not_entailment"])(output)
    group = int(example["idx"]) // 2 if example is not None and "idx" in example else -1
    return {"group": group, "value": value}


_ARTICLES = {"a", "an", "the"}


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in _ARTICLES]


def wsc_referent_matches(prediction: str, referent: str) -> bool:
    """Whether a predicted referent names the candidate: equal after lowercasing and dropping
    articles and punctuation, or one's words all among the other's (a simplification of T5's
    WSC check)."""
    p, r = set(_words(prediction)), set(_words(referent))
    if not p or not r:
        return False
    return p <= r or r <= p


def wsc(output, example=None, is_target=False):
    """Targets: the example's 0/1 label. Predictions: 1 if the model named the candidate."""
    if example is None:
        return -1
    if is_target:
        return int(example["label"])
    return int(wsc_referent_matches(_text(output), _text(example["span1_text"])))


# ---------------------------------------------------------------------------------------------
# Classification and regression
# ---------------------------------------------------------------------------------------------


def accuracy(targets, predictions) -> dict[str, float]:
    t, p = np.asarray(targets), np.asarray(predictions)
    return {"accuracy": 100.0 * float(np.mean(t == p)) if t.size else 0.0}


def _f1(tp: float, fp: float, fn: float) -> float:
    return 0.0 if tp == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


def f1_binary(targets, predictions) -> dict[str, float]:
    """F1 of class 1; a prediction that is neither 0 nor 1 counts as the wrong class."""
    t = np.asarray(targets).astype(int)
    p = np.asarray(predictions).astype(int)
    p = np.where(np.isin(p, (0, 1)), p, 1 - t)
    tp = float(np.sum((p == 1) & (t == 1)))
    fp = float(np.sum((p == 1) & (t == 0)))
    fn = float(np.sum((p == 0) & (t == 1)))
    return {"f1": 100.0 * _f1(tp, fp, fn)}


def mean_multiclass_f1(num_classes: int) -> Callable:
    """Unweighted mean over classes of the per-class F1 (CB's "mean 3-class F1")."""

    def fn(targets, predictions):
        t, p = np.asarray(targets).astype(int), np.asarray(predictions).astype(int)
        f1s = [_f1(float(np.sum((p == c) & (t == c))), float(np.sum((p == c) & (t != c))),
                   float(np.sum((p != c) & (t == c)))) for c in range(num_classes)]
        return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(f1s))}

    return fn


def matthews_corrcoef(targets, predictions) -> dict[str, float]:
    """Matthews correlation (Gorodkin's multiclass form; the usual one for two classes)."""
    t, p = np.asarray(targets), np.asarray(predictions)
    classes = np.unique(np.concatenate([t, p]))
    c = np.array([[np.sum((t == a) & (p == b)) for b in classes] for a in classes], float)
    s = c.sum()
    correct = np.trace(c)
    t_k, p_k = c.sum(axis=1), c.sum(axis=0)
    denom = np.sqrt((s**2 - np.dot(p_k, p_k)) * (s**2 - np.dot(t_k, t_k)))
    mcc = 0.0 if denom == 0 else (correct * s - np.dot(t_k, p_k)) / denom
    return {"matthews_corrcoef": 100.0 * float(mcc)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return 0.0 if denom == 0 else float(np.dot(x, y) / denom)


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    try:
        from scipy.stats import rankdata

        return rankdata(x)
    except ImportError:
        order = np.argsort(x, kind="mergesort")
        ranks = np.empty(len(x), float)
        sorted_x = x[order]
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
                j += 1
            ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
            i = j + 1
        return ranks


def pearson_corrcoef(targets, predictions) -> dict[str, float]:
    t, p = np.asarray(targets, float), np.asarray(predictions, float)
    return {"pearson_corrcoef": 100.0 * _pearson(t, p)}


def spearman_corrcoef(targets, predictions) -> dict[str, float]:
    t, p = np.asarray(targets, float), np.asarray(predictions, float)
    return {"spearman_corrcoef": 100.0 * _pearson(_rank(t), _rank(p))}


# ---------------------------------------------------------------------------------------------
# Grouped metrics (MultiRC, AX-g)
# ---------------------------------------------------------------------------------------------


def _groups(targets, predictions) -> dict[Any, list[tuple[int, int]]]:
    out: dict[Any, list[tuple[int, int]]] = collections.defaultdict(list)
    for t, p in zip(targets, predictions):
        out[t["group"]].append((t["value"], p["value"]))
    return out


def multirc_metrics(targets, predictions) -> dict[str, float]:
    """MultiRC: exact match per question (all its answers right) and F1 over all answers."""
    groups = _groups(targets, predictions)
    em = np.mean([all(t == p for t, p in g) for g in groups.values()]) if groups else 0.0
    f1 = f1_binary([t["value"] for t in targets], [p["value"] for p in predictions])["f1"]
    return {"exact_match": 100.0 * float(em), "f1a": f1}


def axg_metrics(targets, predictions) -> dict[str, float]:
    """AX-g: accuracy, and gender parity (pairs predicted alike, whatever the label)."""
    acc = accuracy([t["value"] for t in targets], [p["value"] for p in predictions])
    groups = _groups(targets, predictions)
    pairs = [g for g in groups.values() if len(g) == 2]
    parity = np.mean([g[0][1] == g[1][1] for g in pairs]) if pairs else 0.0
    return {**acc, "gender_parity": 100.0 * float(parity)}


# ---------------------------------------------------------------------------------------------
# Question answering (SQuAD, ReCoRD)
# ---------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, reference: str) -> float:
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = collections.Counter(p) & collections.Counter(r)
    same = sum(common.values())
    if not p or not r:
        return float(p == r)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1, each the max over the reference answers, averaged."""
    em, f1 = [], []
    for refs, pred in zip(targets, predictions):
        refs = [refs] if isinstance(refs, str) else list(refs)
        em.append(max(float(normalize_answer(pred) == normalize_answer(r)) for r in refs))
        f1.append(max(_token_f1(pred, r) for r in refs))
    return {"em": 100.0 * float(np.mean(em)) if em else 0.0,
            "f1": 100.0 * float(np.mean(f1)) if f1 else 0.0}


# ---------------------------------------------------------------------------------------------
# ROUGE (summarization)
# ---------------------------------------------------------------------------------------------


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _fmeasure(hits: float, n_pred: int, n_ref: int) -> float:
    if hits == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = hits / n_pred, hits / n_ref
    return 2 * precision * recall / (precision + recall)


def _lcs_table(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int32)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1],
                                                                    table[i + 1, j])
    return table


def _lcs_positions(a: Sequence[str], b: Sequence[str]) -> set[int]:
    """Indices into ``a`` of one longest common subsequence of ``a`` and ``b``."""
    table = _lcs_table(a, b)
    i, j, out = len(a), len(b), set()
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            out.add(i - 1)
            i, j = i - 1, j - 1
        elif table[i - 1, j] >= table[i, j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_n(prediction: str, reference: str, n: int) -> float:
    p, r = _ngrams(_rouge_tokens(prediction), n), _ngrams(_rouge_tokens(reference), n)
    return _fmeasure(sum((p & r).values()), sum(p.values()), sum(r.values()))


def rouge_l(prediction: str, reference: str) -> float:
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    return _fmeasure(len(_lcs_positions(r, p)), len(p), len(r))


def rouge_lsum(prediction: str, reference: str) -> float:
    """Summary-level ROUGE-L: sentences are the newline-separated lines; for each reference
    sentence, the union of its LCS with every predicted sentence counts as hits."""
    pred_sents = [_rouge_tokens(s) for s in prediction.split("\n")]
    ref_sents = [_rouge_tokens(s) for s in reference.split("\n")]
    pred_sents, ref_sents = [s for s in pred_sents if s], [s for s in ref_sents if s]
    n_pred, n_ref = sum(map(len, pred_sents)), sum(map(len, ref_sents))
    pred_counts = collections.Counter(t for s in pred_sents for t in s)
    ref_counts = collections.Counter(t for s in ref_sents for t in s)
    hits = 0
    for ref in ref_sents:
        union: set[int] = set()
        for pred in pred_sents:
            union |= _lcs_positions(ref, pred)
        for i in sorted(union):  # a token counts at most as often as it occurs on both sides
            tok = ref[i]
            if pred_counts[tok] > 0 and ref_counts[tok] > 0:
                hits += 1
                pred_counts[tok] -= 1
                ref_counts[tok] -= 1
    return _fmeasure(hits, n_pred, n_ref)


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (lowercased alphanumeric tokens,
    no stemming)."""
    scores = collections.defaultdict(list)
    for ref, pred in zip(targets, predictions):
        scores["rouge1"].append(rouge_n(pred, ref, 1))
        scores["rouge2"].append(rouge_n(pred, ref, 2))
        scores["rougeL"].append(rouge_l(pred, ref))
        scores["rougeLsum"].append(rouge_lsum(pred, ref))
    return {k: 100.0 * float(np.mean(v)) for k, v in scores.items()} if scores else \
        {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
