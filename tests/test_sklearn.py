"""visual_memory.sklearn: scikit-learn's own estimator checks, and the estimator on real CIFAR-10 embeddings."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import sklearn
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import visual_memory as vm
from visual_memory.errors import MemoryExistsError, VectorError
from visual_memory.sklearn import VisualMemoryClassifier, as_copies, unit_rows

ESTIMATORS = [
    VisualMemoryClassifier(),  # the defaults: k=50, rank vote, exact index
    VisualMemoryClassifier(vote="softmax", tau=0.1),
    VisualMemoryClassifier(n_neighbors=5, vote="plurality"),
    VisualMemoryClassifier(n_neighbors=1, vote="distance"),
    VisualMemoryClassifier(n_neighbors=7, index="HNSW32"),
]


def test_sklearn_version_runs_the_checks_this_suite_expects():
    # parametrize_with_checks below runs every check of the installed scikit-learn (legacy ones
    # included, none expected to fail); 1.6 introduced validate_data and the sample-weight checks.
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    assert (major, minor) >= (1, 6)


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# -- the pure parts -----------------------------------------------------------------------


def test_as_copies_turns_integer_weights_into_repeated_neighbours():
    sims = np.array([[0.9, 0.8, 0.7]], np.float32)
    codes = np.array([[2, 0, 1]])
    s, c, w = as_copies(sims, codes, np.array([[3.0, 1.0, 2.0]]), 5)
    assert c.tolist() == [[2, 2, 2, 0, 1]]  # cut at k=5 entries
    assert w.tolist() == [[1, 1, 1, 1, 1]]
    np.testing.assert_allclose(s, [[0.9, 0.9, 0.9, 0.8, 0.7]])
    # Weights in (0, 1] (what pruning gives) stay single, multiplying entries.
    s, c, w = as_copies(sims, codes, np.array([[0.5, 1.0, 0.25]]), 3)
    assert c.tolist() == [[2, 0, 1]] and w.tolist() == [[0.5, 1.0, 0.25]]
    # Padding (-1) is never copied; a fractional remainder is the last copy.
    s, c, w = as_copies(np.array([[0.9, -np.inf]]), np.array([[1, -1]]), np.array([[1.5, 0.0]]), 4)
    assert c.tolist() == [[1, 1, -1, -1]] and w.tolist() == [[1.0, 0.5, 0.0, 0.0]]


def test_zero_rows_have_cosine_zero_with_everything():
    X = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    clf = VisualMemoryClassifier(n_neighbors=3).fit(X, ["a", "z", "b"])
    dist, ind = clf.kneighbors([[1.0, 0.1]])
    assert ind[0, 0] == 0 and dist[0, 0] < 0.01
    # The zero sample is exactly as far as an orthogonal one would be: cosine 0, distance 1.
    assert dist[0, ind[0].tolist().index(1)] == pytest.approx(1.0)
    dist, ind = clf.kneighbors([[0.0, 0.0]])
    np.testing.assert_allclose(dist, [[1.0, 1.0, 1.0]])
    assert sorted(ind[0].tolist()) == [0, 1, 2]
    assert unit_rows(np.zeros((1, 3))).tolist() == [[0.0, 0.0, 0.0]]


def test_bad_input_is_refused_with_clear_errors():
    X = np.eye(3)
    with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
        VisualMemoryClassifier().fit(X, [0, 1, 2], sample_weight=[1, -1, 1])
    with pytest.raises(ValueError, match="zero for every sample"):
        VisualMemoryClassifier().fit(X, [0, 1, 2], sample_weight=[0, 0, 0])
    with pytest.raises(ValueError, match="vote"):
        VisualMemoryClassifier(vote="median").fit(X, [0, 1, 2])
    with pytest.raises(ValueError, match="n_neighbors"):
        VisualMemoryClassifier(n_neighbors=0).fit(X, [0, 1, 2])
    with pytest.raises(ValueError, match="invalid FAISS index factory string"):
        VisualMemoryClassifier(index="NotAnIndex").fit(X, [0, 1, 2])
    clf = VisualMemoryClassifier().fit(X, [0, 1, 2])
    with pytest.raises(ValueError, match="3 features"):
        clf.predict(np.ones((1, 4)))


def test_zero_weight_is_leaving_the_sample_out():
    X = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]])
    w = VisualMemoryClassifier(n_neighbors=1).fit(X, ["a", "b", "c"], sample_weight=[0, 1, 1])
    assert w.predict([[1.0, 0.0]]).tolist() == ["b"]  # the nearest sample has weight 0: it is not there
    assert w.kneighbors([[1.0, 0.0]], return_distance=False).tolist() == [[1]]
    assert w.classes_.tolist() == ["a", "b", "c"]  # classes come from y, weighted or not
    assert w.predict_proba([[1.0, 0.0]]).tolist() == [[0.0, 1.0, 0.0]]


def test_kneighbors_without_X_leaves_each_sample_out():
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ind = VisualMemoryClassifier(n_neighbors=1).fit(X, [0, 0, 1]).kneighbors(return_distance=False)
    assert ind.tolist() == [[1], [0], [1]]


def test_predict_proba_agrees_with_predict_on_an_exact_tie():
    # Plurality over [A, B, B, A] is a 2-2 tie; the vote's tie rule decides and predict_proba agrees.
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    clf = VisualMemoryClassifier(n_neighbors=4, vote="plurality").fit(X, ["A", "B", "B", "A"])
    proba = clf.predict_proba([[1.0, 0.0]])
    pred = clf.predict([[1.0, 0.0]])
    assert clf.classes_[proba.argmax(axis=1)].tolist() == pred.tolist()
    np.testing.assert_allclose(proba, [[0.5, 0.5]])


# -- real CIFAR-10 embeddings -------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar(cifar_small):
    return (cifar_small["train_x"], np.array(cifar_small["train_y"]), cifar_small["val_x"], np.array(cifar_small["val_y"]))


def _memory(path, x, y, weights=None):
    mem = vm.create(path, encoder=None, dim=x.shape[1])
    ids = [f"r{i}" for i in range(len(x))]
    mem.add_embeddings(x, labels=list(y), ids=ids)
    if weights is not None:
        mem.reweight(ids, weights)
    return mem


@pytest.mark.parametrize("vote", vm.VOTES)
def test_predictions_equal_memory_classify(tmp_path, cifar, vote):
    tx, ty, vx, _ = cifar
    w = np.random.default_rng(0).choice([0.25, 0.5, 1.0], size=len(tx)).astype(np.float32)  # soft-pruning-like
    mem = _memory(tmp_path / "m", tx, ty, w)
    want = [p.label for p in mem.classify(vx, k=20, vote=vote)]
    clf = VisualMemoryClassifier(n_neighbors=20, vote=vote).fit(tx, ty, sample_weight=w)
    assert clf.predict(vx).tolist() == want
    assert mem.as_estimator(n_neighbors=20, vote=vote).predict(vx).tolist() == want
    # predict_proba is each label's share of the same scores.
    p = mem.classify(vx[:5], k=20, vote=vote)
    proba = clf.predict_proba(vx[:5])
    for i, pred in enumerate(p):
        total = sum(pred.scores.values())
        for lab, s in pred.scores.items():
            assert proba[i, list(clf.classes_).index(lab)] == pytest.approx(s / total, rel=1e-6)


def test_as_estimator_sees_later_edits_and_pickles_as_a_path(tmp_path, cifar):
    tx, ty, vx, _ = cifar
    mem = _memory(tmp_path / "m", tx, ty)
    est = mem.as_estimator(n_neighbors=1)
    nearest = mem.classify(vx[:1], k=1)[0].neighbors[0]
    mem.relabel([nearest.id], "airplane" if nearest.label != "airplane" else "ship")
    assert est.predict(vx[:1]).tolist() == [mem.classify(vx[:1], k=1)[0].label]
    again = pickle.loads(pickle.dumps(est))
    assert again.memory_.path == mem.path and again.predict(vx).tolist() == est.predict(vx).tolist()
    assert est.kneighbors(vx[:1], return_distance=False)[0, 0] == mem.rows.row(nearest.id)
    # k larger than the memory was: after the memory grows, still exactly classify's vote.
    wide = mem.as_estimator(n_neighbors=250)
    mem.add_embeddings(vx, labels=list(cifar[3]), ids=[f"v{i}" for i in range(len(vx))])
    assert wide.predict(tx[:50]).tolist() == [p.label for p in mem.classify(tx[:50], k=250)]


def test_fit_into_a_durable_memory(tmp_path, cifar):
    tx, ty, vx, vy = cifar
    path = tmp_path / "fitted.vm"
    w = np.where(np.arange(len(tx)) % 10 == 0, 0.5, 1.0)
    clf = VisualMemoryClassifier(n_neighbors=10, memory=path).fit(tx, ty, sample_weight=w)
    mem = vm.open(path)
    assert len(mem) == len(tx) and mem.labels == {lab: 20 for lab in sorted(set(ty))}
    assert [e["op"] for e in mem.history()] == ["create", "add_embeddings", "reweight"]
    assert mem.get(["0"])[0]["weight"] == 0.5 and mem.get(["1"])[0]["weight"] == 1.0
    standalone = VisualMemoryClassifier(n_neighbors=10).fit(tx, ty, sample_weight=w)
    assert clf.predict(vx).tolist() == standalone.predict(vx).tolist()
    loaded = VisualMemoryClassifier.from_memory(path, n_neighbors=10)
    assert loaded.predict(vx).tolist() == clf.predict(vx).tolist()
    assert loaded.score(vx, vy) == pytest.approx(standalone.score(vx, vy))
    with pytest.raises(MemoryExistsError):  # fit never overwrites a memory
        VisualMemoryClassifier(memory=path).fit(tx, ty)
    with pytest.raises(VectorError, match="all-zero"):  # a memory refuses vectors with no direction
        VisualMemoryClassifier(memory=tmp_path / "z.vm").fit(np.vstack([tx[:3], np.zeros((1, tx.shape[1]))]), ty[:4])


def test_pipeline_grid_search_and_cross_val_score(cifar):
    tx, ty, vx, vy = cifar
    X, y = np.vstack([tx, vx]), np.concatenate([ty, vy])  # 300 real embeddings, 30 per class
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    scores = cross_val_score(VisualMemoryClassifier(n_neighbors=10), X, y, cv=cv)
    assert scores.shape == (3,) and scores.mean() > 0.5  # chance is 0.1
    pipe = make_pipeline(StandardScaler(), VisualMemoryClassifier())  # centred embeddings, then cosine
    grid = GridSearchCV(pipe, {"visualmemoryclassifier__n_neighbors": [1, 10, 30],
                               "visualmemoryclassifier__vote": ["rank", "plurality"]}, cv=cv)
    grid.fit(X, y)
    assert len(grid.cv_results_["params"]) == 6
    assert grid.best_score_ > 0.5
    assert grid.best_estimator_.predict(vx).shape == (len(vx),)
