"""The audit report opened in a real browser (Debian's headless Chromium, driven by Playwright)."""

import json
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# flags for a closed network and a root user (see docs/report.md, "Testing the report")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (the CI script installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


def test_report_renders_every_plot_and_table_without_console_errors(browser, audit_run, tmp_path):
    doc = json.loads((audit_run / "results.json").read_text())
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto((audit_run / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")

    plots = doc["files"]["plots"]
    expected = {plots["risk"], *plots["importance"].values(), *plots["retention"].values(),
                *plots["learning"].values()} | ({plots["collateral"]} if plots["collateral"] else set())
    shown = page.eval_on_selector_all(
        "img[data-plot]", "imgs => imgs.map(i => [i.dataset.plot, i.complete && i.naturalWidth > 0])")
    assert {name for name, _ in shown} == expected
    assert all(ok for _, ok in shown), f"plots that did not decode: {[n for n, ok in shown if not ok]}"

    # the headline table: one row per task with its level; each task's method and recovery tables
    levels = page.eval_on_selector_all("table.risk tbody tr", "rows => rows.map(r => r.cells[1].innerText.trim())")
    assert levels == [doc["tasks"][t]["risk"]["level"].upper() for t in doc["tasks"]]
    assert page.locator("table.methods").count() == len(doc["tasks"])
    assert page.locator("table.recovery").count() == len(doc["tasks"])
    assert page.locator("table.card").count() == 1 and page.locator("table.repro").count() == 1
    for t in doc["tasks"]:
        assert page.locator(f"#task-{t}").is_visible()

    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # works offline
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    page.close()
