"""The paper's evaluations on a memory, and the report that shows them.

`report_for_memory` is what ``vismem eval MEMORY FOLDER --report DIR`` runs:
it reads the memory's vectors and weights, embeds the query folder through the
embedding cache (nothing is embedded twice), optionally embeds a few
Fashion-MNIST classes as distinct new classes, runs `run_experiments` and
writes JSON, PNGs and one self-contained HTML page.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .experiments import HOLDOUT, NOISE_LEVELS, SIZES, EvalData, knn, run_experiments
from .report import write_report

if TYPE_CHECKING:  # pragma: no cover
    from ..memory import Memory

log = logging.getLogger(__name__)

NEW_CLASSES = ("trouser", "bag")  # Fashion-MNIST classes with no CIFAR-10 look-alike

__all__ = ["EvalData", "HOLDOUT", "NEW_CLASSES", "NOISE_LEVELS", "SIZES", "knn", "memory_arrays", "report_for_memory",
           "run_experiments", "write_report"]


def memory_arrays(mem: "Memory") -> tuple[np.ndarray, list[str], np.ndarray]:
    """The alive records' vectors (n, dim), labels and weights, in store order."""
    table = mem.rows
    rows = table.alive_rows()
    return mem.vectors(rows), table.labels.decode(table.codes[rows]).tolist(), table.weights[rows].astype(np.float64)


def report_for_memory(
    mem: "Memory",
    queries,
    out_dir,
    *,
    labels: Optional[Sequence[str]] = None,
    per_class: Optional[int] = None,
    new_classes: Optional[Sequence[str]] = NEW_CLASSES,
    new_per_class: int = 100,
    new_queries_per_class: int = 50,
    holdout: Sequence[str] = HOLDOUT,
    progress: bool | str = False,
    **kwargs,
) -> dict:
    """Run every evaluation on ``mem`` and write the report.

    Parameters
    ----------
    mem : Memory
    queries : folder path (ImageFolder) or float array of shape (n, dim)
        Labelled queries; a folder is embedded through the embedding cache.
    out_dir : path
        Receives results.json, one PNG per figure and report.html.
    labels : sequence of str, optional
        Query labels (taken from the folder when ``queries`` is one).
    per_class : int, optional
        Use only the first N queries of each class.
    new_classes : sequence of str or None, default ("trouser", "bag")
        Fashion-MNIST classes added as distinct new classes (skipped if None,
        if Fashion-MNIST is not installed, or if the memory has no encoder).
    new_per_class, new_queries_per_class : int
        Fashion-MNIST train images added per class, test images queried per class.
    **kwargs
        Passed to `run_experiments` (k_max, k_ref, sizes, noise_levels, seed...).

    Returns
    -------
    dict: the results (also in ``out_dir/results.json``), with ``paths``.
    """
    from ..prune import ISSUE_K, SOFT_K, self_neighbors

    t0 = time.perf_counter()
    if isinstance(queries, (str, os.PathLike)):
        from ..cache import embed_folder

        if not Path(queries).is_dir():
            raise FileNotFoundError(f"{queries}: query folder not found (expected an ImageFolder: one sub-folder per class)")
        qx, qy, _ = embed_folder(mem.encoder, queries, per_class=per_class, progress=progress and "embedding queries")
    else:
        if labels is None:
            raise ValueError("labels are required when queries are vectors")
        qx, qy = np.asarray(queries, dtype=np.float32), list(labels)
    if len(mem) < 2:
        raise ValueError(f"{mem.path}: the evaluations need at least 2 records; the memory has {len(mem)}")
    tx, ty, tw = memory_arrays(mem)
    data = EvalData(tx, ty, qx, qy, weights=tw)
    note = None
    if new_classes:
        note = _add_new_classes(mem, data, new_classes, new_per_class, new_queries_per_class, progress)
    t_sn = time.perf_counter()
    # soft pruning counts over the top 10, label issues vote with the top 100; cached in the memory after the first run
    sn = self_neighbors(mem, k=max(SOFT_K, ISSUE_K), progress=progress and "self-neighbours")
    t1 = time.perf_counter()
    results = run_experiments(data, holdout=holdout, self_neighbors=(sn.sims, sn.nbrs), progress=progress, **kwargs)
    results["meta"] = {
        "memory": str(mem.path), "memory_version": mem.version, "encoder": mem.info()["encoder"],
        "queries": str(queries) if isinstance(queries, (str, os.PathLike)) else "vectors",
        "embedding_s": round(t_sn - t0, 2), "self_neighbors_s": round(t1 - t_sn, 2), "evaluation_s": round(time.perf_counter() - t1, 2),
        **({"new_classes": note} if note else {}),
    }
    paths = write_report(results, out_dir)
    results["meta"]["total_s"] = round(time.perf_counter() - t0, 2)
    results["paths"] = {k: str(v) for k, v in paths.items()}
    return results


def _add_new_classes(mem, data: EvalData, classes, per_class, per_class_q, progress) -> Optional[str]:
    from ..datasets import embed_arrays, fashion_mnist_dir, fashion_mnist_subset

    if fashion_mnist_dir() is None:
        return "skipped: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
    if mem.encoder_spec is None:
        return "skipped: the memory stores vectors without an encoder, so new images cannot be embedded"
    clash = sorted(set(classes) & set(data.train_y))
    if clash:
        raise ValueError(f"new classes {clash} are already labels in the memory; choose classes it has not seen")
    xi, yi = fashion_mnist_subset(classes, split="train", per_class=per_class)
    xq, yq = fashion_mnist_subset(classes, split="test", per_class=per_class_q)
    enc = mem.encoder
    data.new_x = embed_arrays(enc, xi, progress=progress and "embedding Fashion-MNIST")
    data.new_y = yi
    data.new_val_x = embed_arrays(enc, xq, progress=progress and "embedding Fashion-MNIST queries")
    data.new_val_y = yq
    data.new_name = "Fashion-MNIST"
    return f"Fashion-MNIST {', '.join(classes)}: {len(xi)} records added, {len(xq)} queries"
