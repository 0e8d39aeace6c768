"""The aggregators, checked by hand against PAPER.md's table.

Fixtures are tiny enough to verify on paper; the expected numbers below are
written out, not recomputed with the code under test.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from visual_memory import vote as voting
from visual_memory.vote import VOTES, check_vote, contributions, predict_every_k, tally

SIMS = np.array([[0.9, 0.8, 0.7, 0.6]])


def test_module_doctest():
    failures, tried = doctest.testmod(voting)
    assert tried > 0 and failures == 0


def test_plurality_weights_are_one():
    assert contributions(SIMS, "plurality").tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_distance_weights_exp_minus_d_to_the_xi():
    # d = 1 - s = 0.1, 0.2, 0.3, 0.4; exp(-0.1) = 0.904837...
    w = contributions(SIMS, "distance")
    np.testing.assert_allclose(w, [[0.9048374, 0.8187308, 0.7408182, 0.6703200]], rtol=1e-6)
    w2 = contributions(SIMS, "distance", xi=2.0)  # exp(-d)^2 = exp(-2d)
    np.testing.assert_allclose(w2, [[0.8187308, 0.6703200, 0.5488116, 0.4493290]], rtol=1e-6)


def test_softmax_weights_proportional_to_exp_s_over_tau():
    # Only ratios matter for the argmax; exp((0.8 - 0.9) / 0.07) = exp(-1.428571) = 0.239651
    w = contributions(SIMS, "softmax")
    np.testing.assert_allclose(w / w[:, :1], [[1.0, 0.2396510, 0.0574326, 0.0137638]], rtol=1e-5)
    w1 = contributions(SIMS, "softmax", tau=0.1)  # exp(-1), exp(-2), exp(-3)
    np.testing.assert_allclose(w1 / w1[:, :1], [[1.0, 0.3678794, 0.1353353, 0.0497871]], rtol=1e-6)


def test_softmax_does_not_overflow_at_small_tau():
    w = contributions(np.array([[1.0, 0.99]]), "softmax", tau=1e-4)
    assert np.isfinite(w).all() and w[0, 0] == 1.0


def test_rank_weights_one_over_alpha_plus_r():
    np.testing.assert_allclose(contributions(SIMS, "rank"), [[1 / 2, 1 / 3, 1 / 4, 1 / 5]])
    np.testing.assert_allclose(contributions(SIMS, "rank", alpha=1.0), [[1.0, 1 / 2, 1 / 3, 1 / 4]])
    # Rank weights ignore the similarity values entirely.
    np.testing.assert_allclose(contributions(np.array([[0.1, 0.0, -0.5]]), "rank"), [[1 / 2, 1 / 3, 1 / 4]])


# One near neighbour of label 0 against two far ones of label 1: the votes disagree.
DISAGREE_CODES = np.array([[0, 1, 1]])
DISAGREE_SIMS = np.array([[0.9, 0.5, 0.5]])


@pytest.mark.parametrize(
    "vote, params, winner, totals",
    [
        # 1 vs 2
        ("plurality", {}, 1, [1.0, 2.0]),
        # exp(-0.1) = 0.904837 vs 2 exp(-0.5) = 1.213061
        ("distance", {}, 1, [0.9048374, 1.2130613]),
        # exp(-0.5) = 0.606531 vs 2 exp(-2.5) = 0.164170
        ("distance", {"xi": 5.0}, 0, [0.6065307, 0.1641700]),
        # 1/2 vs 1/3 + 1/4
        ("rank", {}, 1, [0.5, 7 / 12]),
        # 1/0.5 vs 1/1.5 + 1/2.5
        ("rank", {"alpha": 0.5}, 0, [2.0, 2 / 3 + 0.4]),
    ],
)
def test_tally_hand_checked(vote, params, winner, totals):
    w = contributions(DISAGREE_SIMS, vote, **params)
    won, got, _ = tally(DISAGREE_CODES, w, n_labels=2)
    assert won.tolist() == [winner]
    np.testing.assert_allclose(got[0], totals, rtol=1e-6)


def test_softmax_tally_hand_checked():
    w = contributions(DISAGREE_SIMS, "softmax")
    won, totals, _ = tally(DISAGREE_CODES, w, n_labels=2)
    # Shifted by the top similarity: 1 vs 2 exp(-0.4 / 0.07) = 2 * 0.0032985 = 0.0065970
    assert won.tolist() == [0]
    np.testing.assert_allclose(totals[0], [1.0, 0.0065970], rtol=1e-4)
    # A large temperature flattens softmax towards plurality.
    assert tally(DISAGREE_CODES, contributions(DISAGREE_SIMS, "softmax", tau=10.0), 2)[0].tolist() == [1]


def test_per_record_weights_multiply_the_vote():
    # Rank weights 1/2, 1/3, 1/4; record 0 down-weighted to 0.25 -> 0.125 vs 0.583
    w = contributions(DISAGREE_SIMS, "rank", record_weights=np.array([[0.25, 1.0, 1.0]]))
    won, totals, _ = tally(DISAGREE_CODES, w, n_labels=2)
    assert won.tolist() == [1]
    np.testing.assert_allclose(totals[0], [0.125, 7 / 12])
    # Up-weighting record 0 to 2 flips the decision: 1.0 vs 0.583
    w = contributions(DISAGREE_SIMS, "rank", record_weights=np.array([[2.0, 1.0, 1.0]]))
    assert tally(DISAGREE_CODES, w, n_labels=2)[0].tolist() == [0]


def test_weight_zero_never_votes_not_even_to_break_ties():
    codes = np.array([[0, 1, 0]])
    w = np.array([[0.0, 1.0, 1.0]])  # plurality x record weights 0, 1, 1
    won, totals, reached = tally(codes, w, n_labels=2)
    assert totals[0].tolist() == [1.0, 1.0] and reached[0].tolist() == [2, 1]
    # 1-1: label 1 reached 1 at position 1, label 0 (its zero-weight neighbour not voting) only at 2.
    assert won.tolist() == [1]
    # No contribution at all: the nearest neighbour's label (the authors' fallback); no neighbour: -1.
    won, totals, _ = tally(np.array([[0, 1], [-1, -1]]), np.zeros((2, 2)), n_labels=2)
    assert won.tolist() == [0, -1] and totals.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_ties_go_to_the_label_that_reached_the_top_total_first():
    # The authors' running rule: a label takes over only when its total is strictly greater.
    codes = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [2, 2, 1, 1]])
    won, totals, reached = tally(codes, np.ones((3, 4)), n_labels=3)
    # [B, A, A, B]: A reaches 2 at position 2, B at 3 -> A; [A, B, B, A] -> B; [2, 2, 1, 1] -> 2
    assert won.tolist() == [0, 1, 2]
    assert totals.tolist() == [[2, 2, 0], [2, 2, 0], [0, 2, 2]]
    assert reached.tolist() == [[2, 3, 4], [3, 2, 4], [4, 3, 1]]
    assert tally(np.array([[2, 3, 3, 1, 1]]), np.ones((1, 5)), n_labels=4).winners.tolist() == [3]
    # Repeatable: the same input always gives the same answer.
    for _ in range(3):
        assert tally(codes, np.ones((3, 4)), n_labels=3).winners.tolist() == [0, 1, 2]


def test_predict_every_k_hand_checked():
    # [A, B, B, A] plurality at k = 1..4: A, A (1-1, A first), B, B (2-2, B reached 2 first)
    codes = np.array([[0, 1, 1, 0], [2, 3, 3, 1]])
    assert predict_every_k(codes, np.ones((2, 4)), 4).tolist() == [[0, 0, 1, 1], [2, 2, 3, 3]]
    # rank 1/2, 1/3, 1/4, 1/5: A .5; A .5 vs B .333; B .583; A .7
    w = contributions(np.array([[0.9, 0.8, 0.7, 0.6]]), "rank")
    assert predict_every_k(codes[:1], w, 4).tolist() == [[0, 0, 1, 0]]
    assert predict_every_k(codes[:1], w, 4, ks=[4, 3, 3]).tolist() == [[0, 1, 1]]


def test_zero_weight_records_are_excluded_like_the_authors_exclude_sets():
    sims = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    # Positions 0 and 2 excluded: the voters at 1, 3, 4 take ranks 0, 1, 2.
    w = contributions(sims, "rank", record_weights=np.array([[0.0, 1.0, 0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(w, [[0.0, 1 / 2, 0.0, 1 / 3, 1 / 4]])
    # A soft weight keeps its rank position and multiplies: 0.5 * 1/2, then 1/3, 1/4.
    w = contributions(sims[:, :3], "rank", record_weights=np.array([[0.5, 1.0, 1e-9]]))
    np.testing.assert_allclose(w, [[0.25, 1 / 3, 1e-9 / 4]])
    # Every neighbour excluded: none is (they vote unweighted).
    w = contributions(sims[:, :3], "rank", record_weights=np.zeros((1, 3)))
    np.testing.assert_allclose(w, [[1 / 2, 1 / 3, 1 / 4]])
    # Distance and softmax keep each voter's own similarity; softmax is shifted to the nearest voter.
    w = contributions(sims[:, :3], "distance", record_weights=np.array([[0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(w, [[0.0, math.exp(-0.2), math.exp(-0.3)]])
    w = contributions(sims[:, :3], "softmax", record_weights=np.array([[0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(w, [[0.0, 1.0, math.exp(-0.1 / 0.07)]])
    # k counts positions: at k=1 (no voter yet) the nearest's label, then the voters decide.
    codes = np.array([[0, 1, 0, 0, 1]])
    w = contributions(sims, "rank", record_weights=np.array([[0.0, 1.0, 1.0, 1.0, 1.0]]))
    # voters 1 (B 1/2), 0 (A 1/3), 0 (A 1/4), 1 (B 1/5): A, B, B, A (.583 > .5), B (.7 > .583)
    assert predict_every_k(codes, w, 2).tolist() == [[0, 1, 1, 0, 1]]
    with pytest.raises(ValueError, match="record weights must be finite and >= 0"):
        contributions(sims, "rank", record_weights=np.array([[1.0, -1.0, 1.0, 1.0, 1.0]]))


def test_missing_neighbours_do_not_vote():
    sims = np.array([[0.9, 0.8, -np.inf, -np.inf], [-np.inf] * 4])
    codes = np.array([[1, 0, -1, -1], [-1] * 4])
    for v in VOTES:
        w = contributions(sims, v)
        assert np.isfinite(w).all(), v
        assert w[0, 2:].tolist() == [0.0, 0.0] and w[1].tolist() == [0.0] * 4, v
        won, totals, _ = tally(codes, w, n_labels=2)
        assert won.tolist() == [1, -1], v
        assert totals[1].tolist() == [0.0, 0.0], v
    # Softmax normalises over the present neighbours only.
    np.testing.assert_allclose(contributions(sims, "softmax")[0, :2], [1.0, math.exp(-0.1 / 0.07)], rtol=1e-6)


def test_predict_every_k_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="1..3"):
        predict_every_k(np.zeros((1, 3), int), np.ones((1, 3)), 1, ks=[4])
    with pytest.raises(ValueError, match="1..3"):
        predict_every_k(np.zeros((1, 3), int), np.ones((1, 3)), 1, ks=[0])


def test_check_vote_defaults_and_errors():
    assert check_vote("rank") == {"alpha": 2.0}
    assert check_vote("softmax") == {"tau": 0.07}
    assert check_vote("distance") == {"xi": 1.0}
    assert check_vote("plurality") == {}
    assert check_vote("rank", {"alpha": 3}) == {"alpha": 3.0}
    with pytest.raises(ValueError, match="unknown vote 'majority'.*plurality"):
        check_vote("majority")
    with pytest.raises(ValueError, match="takes no parameter 'tau'.*alpha"):
        check_vote("rank", {"tau": 1.0})
    with pytest.raises(ValueError, match="tau must be a positive"):
        check_vote("softmax", {"tau": 0.0})
    with pytest.raises(ValueError, match="alpha must be a positive"):
        check_vote("rank", {"alpha": -1.0})
    with pytest.raises(ValueError, match="xi must be a positive finite"):
        check_vote("distance", {"xi": float("nan")})
    for xi in (0.0, -1.0):  # the message says positive, so zero and below are refused
        with pytest.raises(ValueError, match="xi must be a positive finite"):
            check_vote("distance", {"xi": xi})
