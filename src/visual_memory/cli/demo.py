"""`vismem demo`: the README's main job, on real images.

Builds a memory from real photos, classifies held-out ones, prints the
accuracy of every vote at several k and one decision with its neighbours, then
writes ``report.json``, ``report.md`` and, in ``report/``, the HTML report with
its plots (the paper's evaluations: the same as ``vismem eval --report``).

Data: CIFAR-10 when ``$VISMEM_DATA/cifar10`` exists, else Fashion-MNIST from
Debian's ``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import typer

from ..cache import select_per_class
from ..datasets import load_fashion_mnist, write_image_folder
from ..errors import VisualMemoryError
from ..images import scan_folder
from .app import app, console, handle_errors, new_table, print_accuracy, print_table, say, styled


# The report's held-out-class and OOD experiments remove two classes that each keep a near
# neighbour class in memory (CIFAR-10: cat/dog, truck/automobile). Fashion-MNIST's own classes
# cannot be its "new" classes, so that experiment is skipped there.
REPORT_OPTIONS = {
    "CIFAR-10": {},
    "Fashion-MNIST": {"holdout": ("shirt", "sneaker"), "new_classes": None},
}


def _dataset(out: Path, per_class: int, queries_per_class: int) -> tuple[str, Path, Path]:
    data = os.environ.get("VISMEM_DATA")
    if data:
        root = Path(data) / "cifar10"
        if not (root / "train").is_dir():
            raise VisualMemoryError(f"VISMEM_DATA={data} has no cifar10/train folder")
        return "CIFAR-10", root / "train", root / "val"
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    base = out / "fashion-mnist"
    train = write_image_folder(images, labels, base / "train", per_class=per_class)
    val = write_image_folder(test_images, test_labels, base / "val", per_class=queries_per_class, offset=60000)
    return "Fashion-MNIST", train, val


def run_demo(out: Path, *, per_class: int = 100, queries_per_class: int = 30) -> dict:
    """Run the demo; returns the report dict (also written to ``out``)."""
    import visual_memory as vm
    from ..evaluate import report_for_memory

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VisualMemoryError(f"{out}: exists and is not a folder; give --out a folder for the demo's memory and reports")
    out.mkdir(parents=True, exist_ok=True)
    name, train_dir, val_dir = _dataset(out, per_class, queries_per_class)
    console.rule(styled((f"visual-memory demo on {name}", "bold")))
    mem_dir = out / "memory"
    if mem_dir.exists():
        shutil.rmtree(mem_dir)  # the demo owns this folder; start fresh each run
    mem = vm.create(mem_dir, encoder="efficientnet-lite0")
    say(f"memory: {mem_dir}  encoder: efficientnet-lite0 ({mem.dim}-d, backend {mem.encoder.backend})")

    train_paths, train_labels = select_per_class(*scan_folder(train_dir), per_class)
    t0 = time.perf_counter()
    added = mem.add(train_paths, labels=train_labels, progress="adding memory images", skip_existing=True)
    add_s = time.perf_counter() - t0
    say(f"added {added.added} images ({len(mem.labels)} classes) in {add_s:.1f}s "
        f"({added.added / add_s:.0f} img/s, embedding included); version {mem.version}")

    query_paths, query_labels = select_per_class(*scan_folder(val_dir), queries_per_class)
    t0 = time.perf_counter()
    queries = mem.embed(query_paths, progress="embedding held-out queries")
    embed_s = time.perf_counter() - t0
    ks = [k for k in (1, 10, 20, 50, 100) if k <= len(mem)]
    result = mem.evaluate(queries, query_labels, ks=ks)
    print_accuracy(result, title=f"{name}: top-1 accuracy of held-out images")

    example = mem.classify(queries[:1], k=10)[0]
    say()
    say((f"Why is {query_paths[0].name} (true label: {query_labels[0]}) predicted {example.label!r}?", "bold"))
    table = new_table("rank", "label", "similarity", "weight", "contribution", "neighbour id",
                      keep=("label", "neighbour id"), right=("rank", "similarity", "weight", "contribution"))
    for n in example.neighbors:
        table.add_row(str(n.rank + 1), n.label, f"{n.similarity:.3f}", f"{n.weight:.2f}", f"{n.contribution:.3f}", n.id)
    print_table(table)
    say("vote totals: " + ", ".join(f"{lab} {s:.3f}" for lab, s in example.scores.items()))

    # The paper's evaluations on this memory, from the query vectors already embedded (nothing is re-embedded).
    t0 = time.perf_counter()
    paper = report_for_memory(mem, queries, out / "report", labels=query_labels, progress="report",
                              **REPORT_OPTIONS.get(name, {}))
    report_s = time.perf_counter() - t0
    html_path = Path(paper["paths"]["html"])

    best = result.best()
    report = {
        "dataset": name,
        "memory": str(mem_dir),
        "encoder": "efficientnet-lite0",
        "memory_images": len(mem),
        "queries": len(query_paths),
        "add_seconds": round(add_s, 2),
        "query_embed_seconds": round(embed_s, 2),
        "report_seconds": round(report_s, 2),
        "html_report": str(html_path),
        "accuracy": result.to_dict()["accuracy"],
        "best": {v: {"k": k, "accuracy": a} for v, (k, a) in best.items()},
        "example": {"image": str(query_paths[0]), "true_label": query_labels[0], **example.to_dict()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# visual-memory demo: {name}",
        "",
        f"Memory: {len(mem)} images ({per_class} per class), encoder efficientnet-lite0; "
        f"{len(query_paths)} held-out queries.",
        "",
        "| vote | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---" * (len(ks) + 1) + "|",
    ]
    for v, accs in result.accuracy.items():
        lines.append(f"| {v} | " + " | ".join(f"{accs[k]:.3f}" for k in ks) + " |")
    lines += ["", f"Example: {query_paths[0].name} (true {query_labels[0]}) -> **{example.label}**", "",
              "| rank | label | similarity | contribution |", "|---|---|---|---|"]
    lines += [f"| {n.rank + 1} | {n.label} | {n.similarity:.3f} | {n.contribution:.3f} |" for n in example.neighbors]
    lines += ["", f"The paper's evaluations on this memory, with plots: [{html_path.relative_to(out)}]({html_path.relative_to(out)})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    say()
    say(f"report: {out / 'report.md'} and {out / 'report.json'}")
    say(("HTML report with plots: ", "bold"), html_path, f" ({report_s:.0f} s)")
    return report


@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("vismem-demo"), "--out", help="Folder for the demo memory and reports."),
    per_class: int = typer.Option(100, "--per-class", min=1, help="Memory images per class."),
    queries: int = typer.Option(30, "--queries", min=1, help="Held-out query images per class."),
) -> None:
    """Build a memory from real images, classify held-out ones, print and write reports (Markdown and HTML with plots)."""
    run_demo(out, per_class=per_class, queries_per_class=queries)
