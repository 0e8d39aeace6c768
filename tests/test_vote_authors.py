"""Our votes against the paper authors' own aggregator code.

The reference (`tests/authors_reference.py`) is the authors' aggregator code
from google-deepmind/visual-memory, ``code/main_analysis_plots.ipynb``,
transcribed verbatim: plain Python loops over one neighbour list, independent
of `visual_memory.vote`. Labels in the random lists are non-empty strings,
because the authors' ``if not highest_weight_class`` would treat a falsy label
(class 0) as "no prediction yet".

Two kinds of check:

- a small neighbour file in the authors' interchange format
  (``tests/data/authors_neighbors.jsonl``), replayed through
  `visual_memory.interchange.predict_neighbors` with hand-worked expectations
  for the tie and exclusion cases (and through the reference, which must agree);
- random neighbour lists, for every vote and every k: `predict_every_k` on the
  full list against the reference's ``prediction_at_k``, and `tally` on each
  k-prefix (what `Memory.classify(k=...)` votes on) against the reference's
  last prediction on that prefix; with exclude sets and with soft weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from authors_reference import FEAT, DistanceWeightedVoting, authors_prediction_at_k
from visual_memory.interchange import import_neighbors, predict_neighbors
from visual_memory.vote import VOTES, contributions, predict_every_k, tally

DATA = Path(__file__).parent / "data" / "authors_neighbors.jsonl"


# ---- the interchange file, by hand ----------------------------------------------------------------

KS = [1, 2, 3, 4, 5]
WEIGHTS = {"x1": 0.0, "x2": 0.0, "x3": 0.0, "x4": 0.0, "x5": 0.0, "s1": 0.25, "s3": 0.5}

# Worked on paper (see the comments in the file's records): predictions at k = 1..5.
PLAIN = {
    # [A, B, B, A]: plurality A, A (1-1, A first), B, B (2-2: B reached 2 first); rank .5 | .5>.333 | B .583 | A .7
    "q-abba": {"plurality": "AABBB", "rank": "AABAA",
               # exp(-d): A .905 | B .819 | B 1.560 > .905 | A 1.575 > 1.560
               "distance": "AABAA",
               # exp(s / .07) relative to A's: B reaches only .297 of A's first vote
               "softmax": "AAAAA"},
    # [2, 3, 3, 1, 1] -> 3 (the authors' docstring); rank: 2 .5 | 3 .583 | 1 never above
    "q-23311": {"plurality": ["2", "2", "3", "3", "3"], "rank": ["2", "2", "3", "3", "3"]},
    # unweighted, D holds the nearest neighbour and the plurality
    "q-excl": {"plurality": "DDDDD", "rank": "DDDDD"},
}
WEIGHTED = {
    # x1 (D) excluded: k=1 has no voter (the nearest's label); voters C 1/2, D 1/3, D 1/4, C 1/5
    "q-excl": {"plurality": "DCCDD", "rank": "DCCDC"},
    # every neighbour excluded, so none is: E 1/2, F 1/3 + 1/4
    "q-all-excl": {"plurality": "EEFFF", "rank": "EEFFF"},
    # s1 (G) weighs 0.25 and keeps rank 0: G .125 | H .333 | G .125 + .25 = .375
    "q-soft": {"plurality": "GHGGG", "rank": "GHGGG"},
    # x5 excluded, s3 (J) weighs .5 at voter rank 0: J .25 | K 1/3 | K 7/12
    "q-soft-excl": {"plurality": "IJKKK", "rank": "IJKKK"},
}


def _by_query(records, preds):
    return {r["image_id"]: {v: list(p[q]) for v, p in preds.items()} for q, r in enumerate(records)}


def test_replay_authors_file_ties_by_hand():
    records = import_neighbors(DATA)
    got = _by_query(records, predict_neighbors(records, ks=KS))
    for qid, want in PLAIN.items():
        for vote, labels in want.items():
            assert got[qid][vote] == list(labels), (qid, vote)


def test_replay_authors_file_exclusions_and_soft_weights_by_hand():
    records = import_neighbors(DATA)
    got = _by_query(records, predict_neighbors(records, ks=KS, votes=("plurality", "rank"), weights=WEIGHTS))
    for qid, want in WEIGHTED.items():
        for vote, labels in want.items():
            assert got[qid][vote] == list(labels), (qid, vote)
    # Records without a weight vote as before.
    assert got["q-abba"] == {"plurality": list("AABBB"), "rank": list("AABAA")}


def test_replay_authors_file_through_the_authors_code():
    """The hand-worked expectations are what the authors' code says too (exclude sets, or soft weights)."""
    records = {r["image_id"]: r for r in import_neighbors(DATA)}
    exclude = {i for i, w in WEIGHTS.items() if w == 0}
    soft = {i: w for i, w in WEIGHTS.items() if w > 0}
    for table, kwargs in ((PLAIN, {}), ({q: WEIGHTED[q] for q in ("q-excl", "q-all-excl")}, {"exclude": exclude}),
                          ({"q-soft": WEIGHTED["q-soft"]}, {"soft": soft})):
        for qid, want in table.items():
            r = records[qid]
            for vote, labels in want.items():
                theirs = authors_prediction_at_k(vote, r["neighbor_classes"], r["neighbor_distances"], r["neighbor_image_ids"], **kwargs)
                theirs = [str(x) for x in theirs] + [str(theirs[-1])] * (len(KS) - len(theirs))
                assert theirs == list(labels), (qid, vote, kwargs)


# ---- random lists, every vote, every k ------------------------------------------------------------


def _random_lists(seed, n=120, K=16, n_ids=40, labels=("ant", "bee", "cat", "dog")):
    rng = np.random.default_rng(seed)
    pool_labels = rng.choice(labels, n_ids)
    ids = np.array([f"id{i}" for i in range(n_ids)])
    rows = np.array([rng.choice(n_ids, K, replace=False) for _ in range(n)])
    # Plurality and rank ties need repeated weights; distance ties come from repeated distances.
    d = np.sort(rng.choice(np.linspace(0.05, 0.95, 25), (n, K)), axis=1)
    d[: n // 2] = np.sort(rng.uniform(0.0, 1.0, (n // 2, K)), axis=1)
    return ids[rows], pool_labels[rows], d, labels


def _ours(vote, classes, d, rec_w, labels):
    code = {c: i for i, c in enumerate(labels)}
    codes = np.vectorize(code.get)(classes)
    return codes, contributions(1.0 - d, vote, record_weights=rec_w)


CASES = [(v, "plain") for v in VOTES] + [(v, "exclude") for v in VOTES] + [("plurality", "soft"), ("rank", "soft")]


@pytest.mark.parametrize("vote, case", CASES)  # the authors have soft weights for plurality and rank only
def test_random_lists_equal_the_authors_code_at_every_k(vote, case):
    ids, classes, d, labels = _random_lists(seed=CASES.index((vote, case)))
    rng = np.random.default_rng(1)
    exclude, soft, rec_w = None, None, np.ones(d.shape)
    if case == "exclude":
        exclude = {f"id{i}" for i in rng.choice(40, 18, replace=False)}
        ids[:4] = sorted(exclude)[: ids.shape[1]]  # lists whose every neighbour is excluded
        rec_w = np.where(np.isin(ids, list(exclude)), 0.0, 1.0)
        assert (rec_w[:, 0] == 0).sum() > 20 and (rec_w[4:] == 0).all(axis=1).sum() == 0
    elif case == "soft":
        soft = {f"id{i}": float(w) for i, w in zip(rng.choice(40, 20, replace=False), rng.choice([0.25, 0.5, 0.875, 1.75 / 3], 20))}
        rec_w = np.vectorize(lambda i: soft.get(i, 1.0))(ids)
    codes, w = _ours(vote, classes, d, rec_w, labels)
    K = codes.shape[1]
    every = predict_every_k(codes, w, len(labels))
    names = np.array(labels, dtype=object)
    for q in range(len(ids)):
        theirs = authors_prediction_at_k(vote, classes[q], d[q], ids[q], exclude=exclude, soft=soft)
        assert names[every[q]].tolist() == theirs, (vote, case, q)
    # tally on every prefix = the authors' last prediction on that prefix (what classify(k) votes on).
    for k in range(1, K + 1):
        codes_k, w_k = _ours(vote, classes[:, :k], d[:, :k], rec_w[:, :k], labels)
        t = tally(codes_k, w_k, len(labels))
        for q in range(len(ids)):
            theirs = authors_prediction_at_k(vote, classes[q, :k], d[q, :k], ids[q, :k], exclude=exclude, soft=soft)
            assert names[t.winners[q]] == theirs[-1], (vote, case, k, q)
        # The vote's order (highest total, then the label that reached it first) starts with the winner.
        voted = t.totals > 0
        key = np.where(voted, t.reached, K + 1)
        best = np.where(voted, t.totals, -1.0)
        first = np.lexsort((key, -best), axis=1)[:, 0]
        np.testing.assert_array_equal(first, t.winners)


def test_the_one_deliberate_departure_is_real():
    """With an exclude set, the authors' distance vote weighs a voter by another neighbour's distance.

    List: x (excluded, d=0), A (d=.5), B (d=.52), B (d=.9); xi = 4. Theirs reads distances[i_count]:
    A exp(-0)^4 = 1 vs B exp(-.5)^4 + exp(-.52)^4 = .260 -> A. Ours, each voter's own distance:
    A exp(-2) = .135 vs B exp(-2.08) + exp(-3.6) = .125 + .027 = .152 -> B.
    """
    classes, d, ids = ["Z", "A", "B", "B"], [0.0, 0.5, 0.52, 0.9], ["x", "a", "b1", "b2"]
    agg = DistanceWeightedVoting(exponent=4.0)
    agg.add_exclude_sets({FEAT: {"x"}})
    assert agg.predict(predictions=classes, distances=d, neighbor_image_ids=ids, featurizer=FEAT)[-1] == "A"
    w = contributions(1.0 - np.array([d]), "distance", record_weights=np.array([[0.0, 1, 1, 1]]), xi=4.0)
    assert tally(np.array([[3, 0, 1, 1]]), w, 4).winners.tolist() == [1]  # B
