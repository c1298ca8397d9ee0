"""05_study in a real browser: JupyterLab on 127.0.0.1, Debian's Chromium driven by Playwright.

A small outputs folder is built first (a tiny random Llama teacher with the embedded tokenizer,
GLA and DeltaNet through all three stages at a few hundred tokens, and an in-process benchmark
at two lengths). JupyterLab then opens a copy of notebooks/05_study.ipynb whose only change is
that the results page and its figures go to the temporary folder (its defaults write into
docs/); the outputs folder reaches it through LINEARIZE_OUTPUTS, i.e. the notebook runs with its
default ``outputs``. The browser runs all cells, then turns each explorer control and checks
that both images change and are not blank.

Run it with ``make test-browser``, which installs Chromium (apt-get) and Playwright when
missing; Playwright cannot download its own browser builds here, so it launches
/usr/bin/chromium.
"""
import hashlib
import io
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from linearize.paths import ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
         "Tonight I report to the Congress on the state of our Union."]


def _require_browser():
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[browser]')")
    if missing:
        message = "the browser test needs " + " and ".join(missing) + "; `make test-browser` installs both"
        if os.environ.get("LINEARIZE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def small_outputs(tmp_path_factory):
    """Two students through stages 1-3 on a tiny teacher, and a two-length benchmark."""
    _require_browser()
    from test_study import _corpus, _tiny_teacher

    from linearize import bench
    from linearize import params as P
    from linearize import stages as S
    from linearize.runner import VARIANTS as GRID

    root = tmp_path_factory.mktemp("browser")
    teacher_dir = root / "tiny-teacher"
    _tiny_teacher(teacher_dir, layers=3)
    corpus = _corpus(root / "corpus")
    outputs = root / "outputs"
    for arch in ("gla", "deltanet"):
        params = P.resolve(arch, "cpu-quick", dict(
            teacher=str(teacher_dir), corpus=str(corpus), seq_len=32, batch_size=2, stage1_tokens=128,
            stage2_tokens=128, stage3_tokens=128, val_blocks=2, val_batch_size=2, val_fraction=0.25,
            run_name="cpu-quick-qkv-mm-h2h", measure_teacher_throughput=False, log_every=1,
            **GRID["qkv-mm-h2h"]))
        S.run_pipeline(params, root=outputs, progress=False)
    bench.run(["teacher", "gla"], [16, 32], out=outputs / "bench" / "bench.csv", teacher=str(teacher_dir),
              steps=2, isolate=False, bandwidth_mib=16, log=lambda *_: None)
    return root, outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(small_outputs):
    """JupyterLab on 127.0.0.1 serving a folder with a copy of 05_study; yields (url, token, site)."""
    root, outputs = small_outputs
    served = root / "lab"
    (served / "notebooks").mkdir(parents=True)
    site = root / "site"
    nb = nbformat.read(ROOT / "notebooks" / "05_study.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = re.sub(r"(?m)^figures_dir = .*$", f"figures_dir = {str(site / 'figures')!r}", params.source)
    params.source = re.sub(r"(?m)^results_page = .*$", f"results_page = {str(site / 'results.md')!r}", params.source)
    params.source = re.sub(r"(?ms)^explorer_texts = \[.*?\n\]", f"explorer_texts = {TEXTS!r}", params.source)
    nbformat.write(nb, served / "notebooks" / "05_study.ipynb")

    port, token = _free_port(), secrets.token_hex(16)
    # every cell in the DOM (JupyterLab 4 otherwise leaves cells out of view unrendered), no news prompt
    settings = root / "lab-settings"
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}')
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, LINEARIZE_OUTPUTS=str(outputs), JUPYTER_CONFIG_DIR=str(root / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(root / "jupyter-runtime"), JUPYTERLAB_WORKSPACES_DIR=str(root / "ws"),
               JUPYTERLAB_SETTINGS_DIR=str(settings),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "lib"), os.environ.get("PYTHONPATH")) if p))
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}", "--ServerApp.open_browser=False",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=served / "notebooks", env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError("JupyterLab did not start:\n" + (root / "jupyterlab.log").read_text()[-3000:])
                time.sleep(1)
        yield url, token, site
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _image_stats(png: bytes) -> tuple[str, float, tuple[int, int]]:
    """(digest, fraction of pixels that are not near-white, size) of a screenshot."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return hashlib.sha1(img.tobytes()).hexdigest(), float((img < 235).mean()), img.shape[::-1]


def test_study_notebook_runs_in_jupyterlab_and_every_explorer_control_redraws(lab):
    from playwright.sync_api import sync_playwright

    url, token, site = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(120_000)
            page.goto(f"{url}/lab/tree/notebooks/05_study.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=180_000)
            # the kernel is up when the status bar says so, and every cell is on the page
            page.get_by_text(re.compile(r"\(ipykernel\) \| Idle")).first.wait_for(timeout=240_000)
            cells = len([c for c in nb_cells() if c.cell_type == "code"])
            page.wait_for_function(f"document.querySelectorAll('.jp-Notebook .jp-CodeCell').length >= {cells}")
            page.locator("#jp-MainMenu").get_by_text("Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            try:
                _wait_and_check(page, site)
            except BaseException:
                page.screenshot(path=str(site.parent / "browser-failure.png"), full_page=True)
                raise
        finally:
            browser.close()


def nb_cells():
    return nbformat.read(ROOT / "notebooks" / "05_study.ipynb", as_version=4).cells


def _wait_and_check(page, site):
    """Wait for the run to finish, then turn each explorer control and check both images."""

    images = page.locator(".jp-OutputArea-output img.widget-image")
    page.locator(".jp-Notebook .jp-Cell").last.scroll_into_view_if_needed()
    deadline = time.monotonic() + 600
    while images.count() < 2 or page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() == 0:
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
        assert not tracebacks, tracebacks[0][-2000:]
        assert time.monotonic() < deadline, "the notebook did not finish within 10 minutes"
        time.sleep(2)
    tracebacks = page.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']")
    assert not [t for t in tracebacks.all_inner_texts() if "Traceback" in t]
    assert (site / "results.md").exists()  # the page went where the parameters say, not docs/

    box = page.locator(".widget-vbox").filter(has=images.first).last
    maps, distance = images.nth(0), images.nth(1)

    def shots():
        for img in (maps, distance):
            img.scroll_into_view_if_needed()
            page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle())
        return [_image_stats(img.screenshot()) for img in (maps, distance)]

    def settle(before, which):
        """Wait until the image(s) in ``which`` differ from ``before``; return the new stats."""
        deadline = time.monotonic() + 120
        while True:
            now = shots()
            if all(now[i][0] != before[i][0] for i in which):
                return now
            assert time.monotonic() < deadline, f"images {which} did not change"
            time.sleep(0.5)

    def assert_drawn(stats, what):
        for (digest, ink, size), name in zip(stats, ("maps", "distance")):
            assert size[0] > 400 and size[1] > 100, (what, name, size)
            assert ink > 0.03, f"{name} image nearly blank after {what}: {ink:.3f} of pixels drawn"

    start = shots()
    assert_drawn(start, "opening")

    # the controls in the order the explorer lays them out: (student, example), (layer, head);
    # noUiSlider handles carry role="slider"
    def slider(name):
        return box.get_by_role("slider").nth(("layer", "head").index(name))

    def dropdown(name):
        return box.locator("select").nth(("student", "example").index(name))

    # layer: the maps and the highlighted bar change
    slider("layer").focus()
    page.keyboard.press("ArrowRight")
    after_layer = settle(start, (0, 1))
    assert_drawn(after_layer, "layer")
    # head: the maps change (the per-layer bars are the same for every head)
    slider("head").focus()
    page.keyboard.press("ArrowRight")
    after_head = settle(after_layer, (0,))
    assert_drawn(after_head, "head")
    # example and student: both images change
    dropdown("example").select_option(index=1)
    after_example = settle(after_head, (0, 1))
    assert_drawn(after_example, "example")
    dropdown("student").select_option(index=1)
    after_student = settle(after_example, (0, 1))
    assert_drawn(after_student, "student")
    # no progress bar inside the explorer when a student loads
    assert "Loading weights" not in box.inner_text()
