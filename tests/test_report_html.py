"""The Snakemake report as a user sees it (used by tests/test_workflow.py on its finished run):
`snakemake --report report.html` opened in headless Chromium and clicked through like a person
would (the report is a single-page React app with no URLs per view: a result opens by clicking its
category in the menu and then the eye button of its row). Its tables must be on screen as table cells, not offered as downloads.

Chromium is Debian's `chromium` (`sudo scripts/install_chromium.sh`); it is driven over the DevTools
protocol on a pipe (`--remote-debugging-pipe`), so no port, websocket library or driver is needed.
Set PTM_REPORT_SCREENSHOTS=<folder> to keep a screenshot of every view the tests open.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ptm_mamba.layout import CONFIG_FILE, report_files

VIEWPORT = (1366, 720)  # a laptop screen: what a report has to fit
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-debugging-pipe")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def words(name: str) -> str:
    """A column name as the report's tables show it (to wrap): ``max_length`` -> ``max length``."""
    return name.replace("_", " ")


def read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh, delimiter="\t"))


# ----------------------------------------------------------------------------- the browser

class Chromium:
    """A headless Chromium page driven over the DevTools protocol (JSON messages ending in a NUL
    byte, read from fd 4 and written to fd 3 of the browser)."""

    def __init__(self, executable: str, viewport: tuple[int, int] = VIEWPORT, timeout: float = 30.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="ptm-chromium-")  # a new empty profile each time
        to_browser, from_us = os.pipe()
        to_us, from_browser = os.pipe()
        # copies above fd 9, so that the child's dup2 onto 3 and 4 never overwrites one of them
        child_in = fcntl.fcntl(to_browser, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser, fcntl.F_DUPFD_CLOEXEC, 10)

        def onto_3_and_4():  # dup2 clears close-on-exec: the browser gets exactly fds 3 and 4
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             f"--window-size={viewport[0]},{viewport[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=onto_3_and_4)
        for fd in (to_browser, from_browser, child_in, child_out):
            os.close(fd)
        self.out, self.inp = from_us, to_us
        self.buffer, self.last_id, self.session = b"", 0, None
        try:
            page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
            # a fixed viewport: mouse events land where getBoundingClientRect says (not so without it)
            self.send("Emulation.setDeviceMetricsOverride", width=viewport[0], height=viewport[1],
                      deviceScaleFactor=1, mobile=False)
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    # -- protocol

    def send(self, method: str, **params):
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit status {self.proc.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close")
                    self.proc.wait(timeout=10)
                except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self.out, self.inp):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- what a user does

    def evaluate(self, expression: str, context: int | None = None):
        """The value of a JavaScript expression in the page (or in an execution ``context``)."""
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context is not None:
            params["contextId"] = context
        result = self.send("Runtime.evaluate", **params)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails'].get('exception', result)}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, context: int | None = None, timeout: float = 20.0):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, context)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", f"{url} to load")

    def click(self, element: str, what: str) -> None:
        """A left click, by mouse events, at the centre of the element a JavaScript expression finds,
        once it stands still (the report's styles are generated as it renders, which can move it)."""
        where = f"""(() => {{
            const el = {element};
            if (!el) return null;
            el.scrollIntoView({{block: "center", inline: "center"}});
            const r = el.getBoundingClientRect();
            return r.width > 0 && r.height > 0 ? [r.x + r.width / 2, r.y + r.height / 2] : null;
        }})()"""
        centre, previous = self.wait_for(where, what), None
        while centre != previous:
            time.sleep(0.05)
            centre, previous = self.wait_for(where, what), centre
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=centre[0], y=centre[1], button="left", clickCount=1)

    def click_until(self, element: str, done: str, what: str, tries: int = 3):
        """Click until the JavaScript ``done`` is truthy (a click can land while the page still moves);
        returns its value."""
        for attempt in range(tries):
            self.click(element, what)
            try:
                return self.wait_for(done, f"the effect of clicking {what}", timeout=5 if attempt < tries - 1 else 20)
            except AssertionError:
                if attempt == tries - 1:
                    raise

    def frame_context(self, url_part: str) -> int:
        """An execution context in the (first) frame whose URL contains ``url_part``, once it has loaded."""
        deadline = time.monotonic() + 20
        while True:
            frames = self.send("Page.getFrameTree")["frameTree"].get("childFrames", [])
            frame = next((f["frame"] for f in frames if url_part in f["frame"]["url"]), None)
            if frame is not None:
                context = self.send("Page.createIsolatedWorld", frameId=frame["id"])["executionContextId"]
                if self.evaluate("document.readyState === 'complete' && !!document.body", context):
                    return context
            if time.monotonic() > deadline:
                raise AssertionError(f"no loaded frame showing {url_part}")
            time.sleep(0.05)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path


# ----------------------------------------------------------------------------- the report, clicked through

# JavaScript: the text of every table row, as lists of cell texts (in the document it runs in)
TABLE_ROWS = "[...document.querySelectorAll('tr')].map(tr => [...tr.cells].map(c => c.textContent.trim()))"


def menu_item(text: str) -> str:
    """JavaScript: the link of the menu entry (a category) called ``text``."""
    return f"[...document.querySelectorAll('nav li a')].find(a => a.innerText.trim() == {json.dumps(text)})"


def result_row(name: str) -> str:
    """JavaScript: the row of the result file ``name`` in the list of a category."""
    return (f"[...document.querySelectorAll('nav tr')].find(tr => tr.cells.length > 1"
            f" && tr.cells[0].innerText.trim().split('/').pop() == {json.dumps(name)})")


class ReportView:
    """The report open in Chromium, with the moves of a user: the menu, a category, an item's eye."""

    def __init__(self, browser: Chromium, report: Path, shots: Path | None = None):
        self.browser, self.shots = browser, shots
        browser.open(report.resolve().as_uri())
        browser.wait_for("!!document.querySelector('.prose h1')"
                         " && document.querySelector('nav').innerText.includes('RESULTS')",
                         "the report's menu and front page")

    def shot(self, name: str) -> None:
        if self.shots:
            time.sleep(0.3)  # let the frame paint
            self.browser.screenshot(self.shots / f"{name}.png")

    def list_category(self, category: str, name: str) -> str:
        """Home (the house in the breadcrumbs), then ``category`` in the menu, until ``name`` is
        listed; returns the JavaScript that finds its row."""
        self.browser.click_until("document.querySelector('nav ol a')",
                                 "document.querySelector('nav').innerText.includes('RESULTS')", "the home button")
        self.browser.click_until(menu_item(category), f"!!{result_row(name)}", f"category {category!r} in the menu")
        return result_row(name)

    def open_item(self, category: str, name: str) -> int:
        """Click the eye button of the item ``name`` of ``category``; returns the execution context of
        the frame it opens in (HTML items open in a frame)."""
        row = self.list_category(category, name)
        shown = (f"(() => {{ const f = document.querySelector('iframe');"
                 f" return !!f && f.src.includes('filename={name};'); }})()")
        self.browser.click_until(f"{row}.querySelector('a')", shown, f"the eye button of {name}")
        context = self.browser.frame_context(f"filename={name};")
        self.shot(name.replace(".", "_"))
        return context

    def rows(self, context: int | None = None) -> list[list[str]]:
        """The cell texts of every table row of the page (or of a frame's ``context``)."""
        return self.browser.evaluate(TABLE_ROWS, context)

    def download_link(self, category: str, name: str) -> dict:
        """The href (its start) and download attributes of the eye button of a download item."""
        row = self.list_category(category, name)
        return self.browser.evaluate(f"(() => {{ const a = {row}.querySelector('a');"
                                     " return {href: a.getAttribute('href').slice(0, 60),"
                                     " download: a.getAttribute('download')}; })()")


def assert_rows_shown(shown: list[list[str]], expected: list[list[str]], what: str) -> None:
    """Every expected row is a row of table cells on screen, cell for cell."""
    missing = [row for row in expected if row not in shown]
    assert not missing, f"{what}: rows not shown as table cells: {missing[:5]} (shown: {shown[:8]})"


def assert_report_shows_tables(report: Path, tables: Path, run_dir: Path, shots: Path | None = None) -> None:
    """Open ``report`` (snakemake --report of a finished run) in headless Chromium, click through it
    as a user, and check that every table of ``tables`` (the plots rule's folder) is on screen as
    table cells: the front page's summary, test results, splits, embeddings, provenance and the
    run's config. Usable from any test that has a finished project; skips without Chromium."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium is not installed: run `sudo scripts/install_chromium.sh` (Debian's chromium)")
    shots = shots or (Path(os.environ["PTM_REPORT_SCREENSHOTS"]) if os.environ.get("PTM_REPORT_SCREENSHOTS") else None)
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    browser = Chromium(executable)
    try:
        view = ReportView(browser, report, shots)
        files = report_files(tables)
        name = {key: path.name for key, path in files.items()}
        summary = read_tsv(files["run_summary"])[1:]

        # The front page: title, then what the run was and how it did, all within a laptop's screen
        # (Snakemake centres it vertically: whatever does not fit above is cut off, unscrollable).
        view.shot("front_page")
        title = browser.evaluate("(() => { const h = document.querySelector('.prose h1');"
                                 " return [h.textContent, h.getBoundingClientRect().top]; })()")
        assert title[0].startswith("PTM-Mamba training run: ") and title[1] >= 0, title
        front = view.rows()
        assert_rows_shown(front, summary, "front page")
        assert browser.evaluate("(() => { const t = document.querySelector('.prose table');"
                                " return t.getBoundingClientRect().bottom <= innerHeight; })()"), \
            "the front page's table runs off the screen"

        # At a glance: the same rows, in the category listed first.
        menu = browser.evaluate("[...document.querySelectorAll('nav li a')].map(a => a.innerText.trim())")
        categories = menu[menu.index("About") + 1:]
        assert categories[0] == "At a glance" and {"Test", "Data", "Configuration", "Training"} <= set(categories)
        shown = view.rows(view.open_item("At a glance", name["run_summary_html"]))
        assert_rows_shown(shown, summary, name["run_summary_html"])

        # Test results: every row of test_results.tsv (PTM type names and numbers) as cells.
        results = read_tsv(files["test_results"])
        col = {name: i for i, name in enumerate(results[0])}
        overall = [[r[col[c]] for c in ("metric", "sites", "value")] for r in results[1:] if r[col["scope"]] == "all"]
        per_type = [[r[col[c]] for c in ("scope", "sites", "value")] for r in results[1:] if r[col["scope"]] != "all"]
        assert overall and per_type, "the tiny run has test results with PTM sites"
        shown = view.rows(view.open_item("Test", name["test_results_html"]))
        assert_rows_shown(shown, overall, "test_results.html (all masked tokens)")
        assert_rows_shown([row[:3] for row in shown], per_type, "test_results.html (per PTM type)")
        assert ["PTM type", "sites", "accuracy", ""] in shown  # its header row
        # the TSV is still there, as the download
        link = view.download_link("Test", name["test_results"])
        assert link["download"] == name["test_results"] and link["href"].startswith("data:text/tab-separated-values")

        # Data: split sizes row by row; embeddings with a column per file.
        splits = read_tsv(files["splits"])
        splits[0] = [words(name) for name in splits[0]]
        assert_rows_shown(view.rows(view.open_item("Data", name["splits_html"])), splits, name["splits_html"])
        embeddings = read_tsv(files["embeddings"])
        columns = [[words(col[0]), *col[1:]] for col in zip(*embeddings)]  # field name, then a value per file
        columns[0][0] = ""
        assert_rows_shown(view.rows(view.open_item("Data", name["embeddings_html"])), columns, name["embeddings_html"])

        # Configuration: the run's config.yaml as text, provenance values as cells.
        context = view.open_item("Configuration", name["config_html"])
        text = browser.evaluate("document.querySelector('pre').innerText", context)
        assert text.strip() == (run_dir / CONFIG_FILE).read_text(encoding="utf-8").strip()
        provenance = read_tsv(files["provenance"])[1:]
        shown = view.rows(view.open_item("Configuration", name["provenance_html"]))
        values = {row[1] for row in shown if len(row) == 2}
        assert {row[1] for row in provenance} <= values, "provenance.html lacks values of provenance.tsv"
        assert ["sha256", next(r[1] for r in provenance if r[0] == "dataset.sha256")] in shown
    finally:
        browser.close()
