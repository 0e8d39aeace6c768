"""End to end in real headless Chromium against the real server (uvicorn on loopback).

Needs Debian's `chromium` (/usr/bin/chromium) and Playwright's Python package
(never `playwright install`: the system browser is used through executable_path).
"""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest

from server_support import TOKEN, LiveServer, build_base_memory, copy_memory

CHROMIUM = os.environ.get("VISMEM_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (or set VISMEM_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def base_memory(tmp_path_factory, cifar_root, cifar_small, encoder):
    return build_base_memory(tmp_path_factory.mktemp("ui") / "base", cifar_root, cifar_small, encoder)


@pytest.fixture
def server(base_memory, tmp_path, encoder):
    from visual_memory.server import create_app

    mem = copy_memory(base_memory, tmp_path / "mem", encoder)
    with LiveServer(create_app(mem, token=TOKEN)) as s:
        yield s


def card(page, rank: int):
    return page.locator("[data-testid=neighbor]").nth(rank)


def preview_lines(page, rank: int) -> list[str]:
    """Wait for a card's edit preview (a dry run) and return its lines."""
    box = card(page, rank).locator("[data-testid=preview]")
    box.wait_for(state="visible")
    return box.locator("[data-testid=preview-line]").all_inner_texts()


def predicted_after(lines: list[str], before: str) -> str:
    """What the preview says the query's prediction becomes."""
    mine = [t for t in lines if t.startswith("this image")]
    assert len(mine) == 1, lines
    return before if "stays the same" in mine[0] else mine[0].rsplit(" → ", 1)[1]


def test_classify_relabel_forget_add_browse_audit(browser, server, cifar_root):
    api = httpx.Client(base_url=server.url, timeout=30)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.url}/#token={TOKEN}")
    page.wait_for_function("document.querySelector('[data-testid=stats]').textContent.includes('240 records')")

    # 1. Upload a CIFAR-10 image: prediction, vote bars and the neighbour gallery appear.
    query = cifar_root / "val" / "ship" / "4503.jpg"
    page.set_input_files("[data-testid=file]", str(query))
    page.wait_for_selector("[data-testid=neighbor]")
    assert page.locator("[data-testid=neighbor]").count() == 10
    want = api.post("/classify?k=10", files={"file": ("q.jpg", query.read_bytes(), "image/jpeg")}).json()
    assert page.text_content("[data-testid=prediction]") == want["label"]
    assert page.locator("[data-testid=bars] .bar").count() == len(want["scores"])
    assert [card(page, i).get_attribute("data-id") for i in range(10)] == [n["id"] for n in want["neighbors"]]
    assert "sim" in card(page, 0).inner_text() and "contribution" in card(page, 0).inner_text()

    # 2. Relabel the nearest neighbour: a preview first (nothing written), then the edit on confirm;
    #    the prediction is recomputed and is what the preview said it would be.
    first = card(page, 0).get_attribute("data-id")
    first_label = card(page, 0).get_attribute("data-label")
    card(page, 0).locator("[data-testid=relabel-input]").fill("zeppelin")
    card(page, 0).locator("[data-testid=relabel]").click()
    lines = preview_lines(page, 0)
    assert lines[0] == f"label {first_label} → zeppelin"
    will_be = predicted_after(lines, want["label"])
    assert api.get(f"/records/{first}").json()["label"] == first_label  # only previewed
    assert api.get("/stats").json()["version"] == want["version"]
    card(page, 0).locator("[data-testid=confirm]").click()
    page.wait_for_function("document.querySelector('[data-testid=neighbor]').dataset.label === 'zeppelin'")
    assert page.text_content("[data-testid=prediction]") == will_be
    assert page.locator("[data-testid=bars] .bar[data-label=zeppelin]").count() == 1
    shown_version = int(page.text_content("[data-testid=prediction-meta]").rsplit("version ", 1)[1])
    assert shown_version > want["version"]
    assert api.get(f"/records/{first}").json()["label"] == "zeppelin"

    # 3. Down-weight it (preview, confirm): its weight halves in the gallery.
    card(page, 0).locator("[data-testid=downweight]").click()
    assert preview_lines(page, 0)[0] == "weight 1 → 0.5"
    card(page, 0).locator("[data-testid=confirm]").click()
    page.wait_for_function("document.querySelector('[data-testid=neighbor] .nums').textContent.includes('w 0.5')")
    assert api.get(f"/records/{first}").json()["weight"] == 0.5

    # 4. Forget the second neighbour (preview, then "erase for good"): gone from the gallery and from the API.
    second = card(page, 1).get_attribute("data-id")
    card(page, 1).locator("[data-testid=forget]").click()
    assert preview_lines(page, 1)[0].startswith("erases ")
    assert page.locator(f"[data-testid=neighbor][data-id='{second}']").count() == 1  # the first click only previews
    assert api.get(f"/records/{second}").status_code == 200
    card(page, 1).locator("[data-testid=confirm]").click()
    page.wait_for_selector(f"[data-testid=neighbor][data-id='{second}']", state="detached")
    assert page.locator("[data-testid=neighbor]").count() == 10  # the next-nearest moved up
    assert api.get(f"/records/{second}").status_code == 404
    assert second not in [n["id"] for n in api.post("/classify?k=50", files={"file": ("q.jpg", query.read_bytes(), "image/jpeg")}).json()["neighbors"]]

    # 5. Add a new class by dropping a few labelled images, then it is predicted.
    page.click("nav .tab[data-tab=add]")
    frogs = [cifar_root / "val" / "frog" / f"{4500 + i}.jpg" for i in range(3)]
    page.set_input_files("[data-testid=add-files]", [str(p) for p in frogs])
    page.fill("[data-testid=add-label]", "tree-frog")
    page.click("[data-testid=add-go]")
    page.wait_for_function("document.querySelector('[data-testid=add-status]').textContent.startsWith('added 3')")
    assert api.get("/stats").json()["labels"]["tree-frog"] == 3
    page.click("nav .tab[data-tab=classify]")
    page.fill("#k", "1")  # the image itself is now its nearest memory
    page.set_input_files("[data-testid=file]", str(frogs[0]))
    page.wait_for_function("document.querySelector('[data-testid=prediction]').textContent === 'tree-frog'")

    # 6. Browse the memory by class: the new class holds its three images, thumbnails load.
    page.click("nav .tab[data-tab=browse]")
    page.click("[data-testid=classes] button[data-label=tree-frog]")
    page.wait_for_function("document.querySelectorAll('[data-testid=record]').length === 3")
    page.wait_for_function("[...document.querySelectorAll('[data-testid=record] img')].every(i => i.complete && i.naturalWidth === 32)")

    # 7. The audit trail lists every edit, newest first.
    page.click("nav .tab[data-tab=audit]")
    page.wait_for_selector("[data-testid=audit] tr")
    ops = page.eval_on_selector_all("[data-testid=audit] tr", "rows => rows.map(r => r.dataset.op)")
    assert ops[:4] == ["add", "forget", "reweight", "relabel"]
    assert errors == []
    page.close()


def test_preview_then_cancel_changes_nothing(browser, server, cifar_root):
    """A preview is a dry run: the API's answer, shown in the card; cancel leaves the memory as it was."""
    api = httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server.url}/#token={TOKEN}")
    query = cifar_root / "val" / "airplane" / "4501.jpg"
    page.set_input_files("[data-testid=file]", str(query))
    page.wait_for_selector("[data-testid=neighbor]")
    before = api.get("/history").json()["total"], api.get("/stats").json()["version"]
    shown = page.text_content("[data-testid=prediction]")
    # Relabel the nearest neighbour to a new class, previewed: the card shows what the API's dry run says.
    rid = card(page, 0).get_attribute("data-id")
    card(page, 0).locator("[data-testid=relabel-input]").fill("blimp")
    card(page, 0).locator("[data-testid=relabel]").click()
    lines = preview_lines(page, 0)
    sha = hashlib.sha256(query.read_bytes()).hexdigest()
    dry = api.post("/relabel", json={"ids": [rid], "label": "blimp", "dry_run": {"probe": [sha], "k": 10, "vote": "rank"}}).json()
    assert dry["dry_run"] is True and [c["id"] for c in dry["changes"]] == [rid]
    assert predicted_after(lines, shown) == (dry["probe"]["changes"][0]["after"] if dry["probe"]["changes"] else shown)
    card(page, 0).locator("[data-testid=cancel]").click()
    assert card(page, 0).locator("[data-testid=preview]").is_hidden()
    assert (api.get("/history").json()["total"], api.get("/stats").json()["version"]) == before
    assert api.get(f"/records/{rid}").json()["label"] != "blimp"
    page.close()


def test_edit_without_token_is_refused_in_the_ui(browser, server, cifar_root):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.evaluate("localStorage.clear()")
    page.reload()
    page.set_input_files("[data-testid=file]", str(cifar_root / "val" / "cat" / "4500.jpg"))
    page.wait_for_selector("[data-testid=neighbor]")
    rid = card(page, 0).get_attribute("data-id")
    label = card(page, 0).get_attribute("data-label")
    card(page, 0).locator("[data-testid=relabel-input]").fill("zeppelin")
    card(page, 0).locator("[data-testid=relabel]").click()
    page.wait_for_selector("[data-testid=toast].bad")
    assert "token" in page.text_content("[data-testid=toast]")
    assert httpx.get(f"{server.url}/records/{rid}").json()["label"] == label
    page.close()
