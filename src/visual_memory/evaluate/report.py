"""Write the evaluation results as JSON, matplotlib PNGs and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..vote import VOTES

FIGURES = ("accuracy_vs_k", "sweeps", "ith_neighbor", "calibration", "scaling", "new_classes", "label_noise", "ood")


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        from ..errors import VisualMemoryError

        raise VisualMemoryError("the report draws with matplotlib: pip install 'visual-memory[eval]'") from exc

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def _fig_accuracy_vs_k(r: dict, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    a = r["accuracy_vs_k"]
    for v in VOTES:
        ax.plot(a["ks"], np.array(a[v]) * 100, label=v)
    ax.set(xlabel="k (neighbours)", ylabel="top-1 accuracy (%)", title="Accuracy vs k", xscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _fig_sweeps(r: dict, plt):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (v, sw) in zip(axes, r["sweeps"].items()):
        p = sw["param"]
        xs = [row[p] for row in sw["rows"]]
        ax.plot(xs, [row["best_accuracy"] * 100 for row in sw["rows"]], "o-", label="best k")
        ax.plot(xs, [row["at_k_max"] * 100 for row in sw["rows"]], "s--", label=f"k={r['k_max']}")
        ax.set(xscale="log", xlabel=p, ylabel="accuracy (%)", title=f"{v} vote: {p}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def _fig_ith(r: dict, plt):
    d = r["ith_neighbor"]
    fig, ax = plt.subplots(figsize=(6, 4))
    i = np.array(d["i"])
    ax.plot(i, np.array(d["accuracy"]) * 100, ".", label="i-th neighbour alone")
    if d["fit"]:
        f = d["fit"]
        ax.plot(i, (f["a"] * np.log(i) + f["b"]) * 100, "-", label=f"{f['a']:.4f} ln(i) + {f['b']:.3f} (R²={f['r2']:.3f})")
    ax.set(xlabel="i (neighbour rank)", ylabel="accuracy (%)", title="Accuracy of the i-th neighbour")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _fig_calibration(r: dict, plt):
    c = r["calibration"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    bins = [b for b in c["bins"] if b["n"]]
    a1.plot([0, 1], [0, 1], "k:", label="perfect")
    a1.bar([(b["lo"] + b["hi"]) / 2 for b in c["bins"]], [b["accuracy"] or 0 for b in c["bins"]], width=0.09, alpha=0.6, label="accuracy")
    a1.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C3", label="accuracy at mean confidence")
    a1.set(xlabel="vote share of the winner", ylabel="accuracy", title=f"Reliability (rank, k={c['k']}), ECE={c['ece']:.3f}", xlim=(0, 1), ylim=(0, 1))
    a1.legend()
    pc = c["by_plurality_count"]
    a2.plot([x["count"] for x in pc], [x["accuracy"] * 100 for x in pc], "o-")
    a2.set(xlabel=f"count of the plurality label among {c['k']} neighbours", ylabel="accuracy (%)", title="Accuracy vs plurality count")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _fig_scaling(r: dict, plt):
    s = r["scaling"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = np.array([x["size"] for x in s["rows"]], dtype=float)
    err = np.array([x["error"] for x in s["rows"]])
    a1.plot(sizes, err * 100, "o-")
    a1.set(xscale="log", yscale="log", xlabel="memory size (records)", ylabel="error (%)", title="Error vs memory size (rank, best k)")
    a1.grid(alpha=0.3, which="both")
    ok = (sizes > 1) & (err > 0)
    x = np.log10(np.log10(sizes[ok]))
    a2.plot(x, np.log10(err[ok]), "o", label="measured")
    if s["fit"]:
        xx = np.linspace(x.min(), x.max(), 50) if len(x) else x
        a2.plot(xx, s["fit"]["slope"] * xx + s["fit"]["intercept"], "-", label=f"fit: slope {s['fit']['slope']:.2f}")
    a2.set(xlabel="log10(log10(size))", ylabel="log10(error)", title="The paper's power law")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _fig_new_classes(r: dict, plt):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "new_classes", "distinct new classes"), (axes[1], "holdout", "held-out CIFAR classes")):
        d = r.get(key) or {}
        if "old_before" not in d:
            ax.text(0.5, 0.5, d.get("skipped", "skipped"), ha="center", va="center", wrap=True)
            ax.set_axis_off()
            continue
        x = np.arange(2)
        ax.bar(x - 0.2, [d["old_before"] * 100, d["new_before"] * 100], 0.4, label="before adding")
        ax.bar(x + 0.2, [d["old_after"] * 100, d["new_after"] * 100], 0.4, label="after adding")
        ax.set_xticks(x, ["old classes", "new classes"])
        ax.set(ylabel=f"accuracy (%), rank k={d['k']}", title=f"{title}: {', '.join(d['classes'])}")
        ax.legend()
    fig.tight_layout()
    return fig


def _fig_noise(r: dict, plt):
    rows = r["label_noise"]["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    p = [x["noise"] * 100 for x in rows]
    a1.plot(p, [x["rank_at_k_ref"] * 100 for x in rows], "o-", label=f"rank, k={r['label_noise']['k_ref']}")
    a1.plot(p, [x["soft_at_k_ref"] * 100 for x in rows], "s-", label="rank + soft pruning")
    a1.plot(p, [x["rank_best"]["accuracy"] * 100 for x in rows], "o:", label="rank, best k")
    a1.plot(p, [x["soft_best"]["accuracy"] * 100 for x in rows], "s:", label="soft pruning, best k")
    a1.set(xlabel="memory labels replaced at random (%)", ylabel="accuracy (%)", title="Label-noise robustness")
    a1.legend()
    a1.grid(alpha=0.3)
    noisy = [x for x in rows if x["n_flipped"]]
    a2.plot([x["noise"] * 100 for x in noisy], [x["issue_precision"] * 100 for x in noisy], "o-", label="label-issue precision")
    a2.plot([x["noise"] * 100 for x in noisy], [x["issue_chance"] * 100 for x in noisy], "k:", label="chance")
    a2.set(xlabel="memory labels replaced at random (%)", ylabel="precision at #flips (%)", title="Finding the flipped labels", ylim=(0, 100))
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _fig_ood(r: dict, plt):
    d = r.get("holdout") or {}
    fig, ax = plt.subplots(figsize=(6, 4))
    if "ood_scores" not in d:
        ax.text(0.5, 0.5, d.get("skipped", "skipped"), ha="center", va="center")
        ax.set_axis_off()
        return fig
    k = max(int(x) for x in d["ood_auroc"])
    ax.hist(d["ood_scores"]["in"], bins=40, alpha=0.6, density=True, label="classes in memory")
    ax.hist(d["ood_scores"]["out"], bins=40, alpha=0.6, density=True, label=f"held out: {', '.join(d['classes'])}")
    ax.set(xlabel=f"mean distance to the first {k} neighbours", ylabel="density", title=f"OOD score, AUROC={d['ood_auroc'][str(k)]:.3f}")
    ax.legend()
    return fig


_MAKERS: dict[str, Callable] = {
    "accuracy_vs_k": _fig_accuracy_vs_k, "sweeps": _fig_sweeps, "ith_neighbor": _fig_ith, "calibration": _fig_calibration,
    "scaling": _fig_scaling, "new_classes": _fig_new_classes, "label_noise": _fig_noise, "ood": _fig_ood,
}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _headline_rows(r: dict) -> list[tuple[str, str]]:
    h = r["headline"]
    rows = [(f"best accuracy, {v}", f"{_pct(b['accuracy'])} at k={b['k']}") for v, b in h["best_accuracy"].items()]
    rp = h["rank_vs_plurality_at_k_max"]
    rows.append((f"rank vs plurality at k={rp['k']}", f"{_pct(rp['rank'])} vs {_pct(rp['plurality'])}"))
    for key, name in (("new_classes", "distinct new classes added"), ("holdout", "held-out classes added back")):
        if key in h:
            d = h[key]
            rows.append((f"{name} ({', '.join(d['classes'])})",
                         f"old {_pct(d['old_before'])} → {_pct(d['old_after'])} ({100 * d['old_change']:+.2f} pts); new {_pct(d['new_after'])}"))
    for p, prec in h["label_issue_precision"].items():
        rows.append((f"label-issue precision at #flips, {float(p):.0%} flipped", f"{_pct(prec)} (chance {float(p):.0%})"))
    for p, d in h["label_noise"].items():
        rows.append((f"accuracy with {float(p):.0%} noise: rank / soft-pruned (k={r['label_noise']['k_ref']}; best k)",
                     f"{_pct(d['rank'])} / {_pct(d['soft'])}; {_pct(d['rank_best'])} / {_pct(d['soft_best'])}"))
    if "ood_auroc_holdout" in h:
        rows.append(("OOD AUROC, held-out classes (k: AUROC)", ", ".join(f"{k}: {v:.3f}" for k, v in h["ood_auroc_holdout"].items())))
    if "far_ood_auroc" in h:
        rows.append(("OOD AUROC, distinct new classes", f"{h['far_ood_auroc']:.3f}"))
    rows.append(("expected calibration error", f"{h['ece']:.3f}"))
    return rows


def write_report(results: dict, out_dir, *, title: str = "visual-memory evaluation") -> dict[str, Path]:
    """Write ``results.json``, one PNG per figure and ``report.html`` into ``out_dir``.

    The HTML inlines every PNG as base64, so it is one file that opens anywhere.

    Returns
    -------
    dict name -> path of everything written.
    """
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    images = {}
    for name in FIGURES:
        fig = _MAKERS[name](results, plt)
        p = out / f"{name}.png"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[name] = p
        images[name] = base64.b64encode(p.read_bytes()).decode()
    rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in _headline_rows(results))
    figs = "".join(f'<h2>{html.escape(n.replace("_", " "))}</h2><img alt="{n}" src="data:image/png;base64,{images[n]}">' for n in FIGURES)
    meta = results.get("meta", {})
    meta_html = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in meta.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse}}td{{border-bottom:1px solid #ddd;padding:4px 12px}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{results['n_train']} records in memory, {results['n_val']} labelled queries, {results['dim']}-d embeddings.</p>
<ul>{meta_html}</ul>
<h2>Headline numbers</h2><table>{rows}</table>
{figs}
<p>Raw numbers: results.json beside this file.</p></body></html>
"""
    paths["html"] = out / "report.html"
    paths["html"].write_text(page)
    return paths


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
