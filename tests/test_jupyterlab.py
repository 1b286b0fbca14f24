"""JupyterLab in a real browser: the way readers actually run the tutorial.

`python -m lora_tutorial.tools.lab` starts JupyterLab on 127.0.0.1 with a token; Debian's Chromium,
driven by Playwright, opens 01_data and 06_compare, runs every cell from the Run menu, saves,
and the test checks the page and the saved notebook: no error, the expected lines, a rendered
plot, progress bars as widgets and no warnings. Screenshots go to outputs/browser/.

Skip it locally with `-m "not browser"`. Without Playwright or Chromium it is skipped, except
under CI=true, where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from lora_tutorial.data import DATA_ENV
from lora_tutorial.settings import project_root
from lora_tutorial.train import PROGRESS_ENV

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOKS = project_root() / "notebooks"
SCREENSHOTS = project_root() / "outputs" / "browser"
CHROMIUM = os.environ.get("LORA_TUTORIAL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "lora-tutorial-browser-test"
# Small and quick: the offline sample (the server's kernels see no MNIST folder, and download nothing),
# 2,000 of its training images. Evaluating full MNIST's 10,000 test images was most of a run's time.
QUICK = {"train_samples": 2000, "finetune_steps": 20, "download": False}
# The README's picture of the explorer (docs/explorer.png) is this test's screenshot of the panel,
# taken with the notebooks' own parameters (full MNIST, the network 02 saved in outputs/):
#   LORA_TUTORIAL_BROWSER_FULL=1 python -m pytest -n 0 tests/test_jupyterlab.py -k explorer
FULL_ENV = "LORA_TUTORIAL_BROWSER_FULL"
EXPLORER_PICTURE = SCREENSHOTS / "11_explorer-panel.png"
# JupyterLab settings for the test's own settings folder: no news pop-up over the page, and every
# cell kept in the page (not only those scrolled into view) so that the checks see them all.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
# In the notebook on screen: the kernel is idle, no cell is queued or running ([*]), and the first
# code cell has run. "Run All Cells" then either finished or stopped at an error.
RUN_FINISHED = """() => {
  const panel = [...document.querySelectorAll('.jp-NotebookPanel')].find(p => p.offsetParent !== null);
  if (!panel) return false;
  const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator:not(.lm-mod-hidden)');
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent);
  const busy = [...document.querySelectorAll('.jp-Notebook-ExecutionIndicator')]
    .some(e => e.offsetParent !== null && e.dataset.status !== 'idle');
  return prompts.length > 0 && !busy && !prompts.some(p => p.includes('*')) && /\\d/.test(prompts[0]);
}"""


# At least `count` tqdm bars drawn as ipywidgets (a progress widget in a row) and showing 100%.
FINISHED_BARS = """count => [...document.querySelectorAll('.jp-NotebookPanel .widget-hbox')]
  .filter(row => row.offsetParent !== null && row.querySelector('.widget-hprogress .progress-bar')
                 && row.textContent.includes('100%')).length >= count"""


def browser_or_skip():
    """Playwright's sync API, or a skip (a failure under CI) naming what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("Playwright (`python -m pip install playwright`)")
    if not Path(CHROMIUM).is_file():
        missing.append(f"Chromium at {CHROMIUM} (`apt-get install chromium`, or set LORA_TUTORIAL_CHROMIUM)")
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the browser test, but {message}.")
        pytest.skip(message)
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quick_copy(name: str, folder: Path, output_dir: Path) -> None:
    """The committed notebook without outputs, with small parameters, as a reader's copy (with
    the notebook's own parameters under FULL_ENV=1: see EXPLORER_PICTURE)."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        if "parameters" in cell.metadata.get("tags", []) and os.environ.get(FULL_ENV) != "1":
            lines = [f"{k} = {v!r}" for k, v in {**QUICK, "output_dir": str(output_dir)}.items()]
            cell.source += "\n# browser test: small and quick\n" + "\n".join(lines) + "\n"
    nbformat.write(nb, folder / f"{name}.ipynb")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab started by the tutorial's own command, on a free port; always shut down."""
    sync_playwright = browser_or_skip()
    root = tmp_path_factory.mktemp("lab")
    folder, jupyter = root / "notebooks", root / "jupyter"
    folder.mkdir()
    for name in ("01_data", "06_compare", "11_explorer"):
        quick_copy(name, folder, root / "outputs")
    for path, values in LAB_SETTINGS.items():
        (jupyter / "settings" / path).parent.mkdir(parents=True, exist_ok=True)
        (jupyter / "settings" / path).write_text(json.dumps(values))
    env = dict(os.environ, JUPYTER_DATA_DIR=str(jupyter / "data"),  # the kernel is registered here
               JUPYTER_CONFIG_DIR=str(jupyter / "config"), JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(jupyter / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(jupyter / "workspaces"))
    env.pop(PROGRESS_ENV, None)  # a headless run in this process may have asked for text bars
    if os.environ.get(FULL_ENV) != "1":
        env.pop(DATA_ENV, None)  # QUICK: the sample
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "lora_tutorial.tools.lab", "--port", str(port),
                               "--notebooks", str(folder), f"--IdentityProvider.token={TOKEN}"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            try:
                yield base, page, folder, jupyter, root
            finally:
                browser.close()
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # JupyterLab stops its kernels on the way out
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def run_all_cells(lab, name: str, timeout_s: float = 150) -> tuple[str, nbformat.NotebookNode]:
    """Open a notebook, Run > Run All Cells, File > Save Notebook; return the page text and the file."""
    base, page, folder, _, _ = lab
    for old in SCREENSHOTS.glob(f"{name}*.png"):
        old.unlink()  # this run's screenshots only
    page.goto(f"{base}/lab/tree/{name}.ipynb?token={TOKEN}")
    page.locator(".jp-NotebookPanel:visible .jp-Notebook").wait_for(timeout=60_000)
    # the kernel has started when the status bar says so; then make the notebook the active widget
    page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(timeout=90_000)
    accept_kernel_dialog(page)
    page.locator(".jp-NotebookPanel:visible .jp-CodeCell .jp-InputPrompt").first.click()
    started = ("[...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]"
               ".some(e => /[*\\d]/.test(e.textContent))")
    for _ in range(3):  # a click that lands while JupyterLab is still settling can be lost: retry
        accept_kernel_dialog(page)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
        try:
            page.wait_for_function(started, timeout=10_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        page.wait_for_function(RUN_FINISHED, timeout=timeout_s * 1000, polling=500)
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / f"{name}-unfinished.png"))
        prompts = page.locator(".jp-NotebookPanel:visible .jp-InputArea-prompt").all_inner_texts()
        raise AssertionError(f"{name} did not finish within {timeout_s:.0f} s; prompts {prompts}; "
                             f"screenshot {SCREENSHOTS / (name + '-unfinished.png')}") from None
    page.get_by_role("menuitem", name="File", exact=True).click()
    page.locator(".lm-Menu-itemLabel").get_by_text("Save Notebook", exact=True).click()
    path = folder / f"{name}.ipynb"
    deadline = time.monotonic() + 30
    while True:  # the save has landed when every code cell on disk has an execution count
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception:  # caught half-written while JupyterLab saves it: read again
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        code = [c for c in nb.cells if c.cell_type == "code"]
        if all(c.execution_count for c in code) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    images = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output img")
    if any(o.get("data", {}).get("image/png") for o in outputs_of(nb, "display_data")):
        images.last.wait_for(timeout=30_000)  # the plot the kernel sent is drawn on the page
        images.last.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    stderr = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output"
                          '[data-mime-type="application/vnd.jupyter.stderr"]')  # errors and warnings
    assert stderr.count() == 0, f"{name} shows an error or a warning: {stderr.first.inner_text()[:500]}"
    return page.locator(".jp-NotebookPanel:visible .jp-Notebook").inner_text(), nb


def accept_kernel_dialog(page, wait_s: float = 3) -> None:
    """JupyterLab sometimes asks which kernel to start for the second notebook opened (a modal
    "Select Kernel" dialog that swallows every click until answered): accept what it offers."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:
        dialog.wait_for(state="visible", timeout=wait_s * 1000)
    except Exception:
        return
    dialog.get_by_role("button", name="Select", exact=True).click()
    dialog.wait_for(state="hidden", timeout=10_000)
    page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(timeout=90_000)


def outputs_of(nb: nbformat.NotebookNode, kind: str) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == kind]


def assert_clean(nb: nbformat.NotebookNode) -> None:
    """Every code cell ran, none raised, nothing was written to stderr (warnings included)."""
    errors = outputs_of(nb, "error")
    assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']}"
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a cell did not run"
    stderr = [o["text"] for o in outputs_of(nb, "stream") if o.get("name") == "stderr"]
    assert not stderr, f"stderr in the notebook: {stderr[0][:500]}"


def test_jupyterlab_command_registers_the_projects_kernel(lab):
    _, _, _, jupyter, _ = lab
    spec = json.loads((jupyter / "data" / "kernels" / "lora-tutorial" / "kernel.json").read_text())
    assert spec["display_name"] == "Python (lora-tutorial)" and spec["argv"][0] == sys.executable


def test_01_data_runs_in_jupyterlab(lab):
    text, nb = run_all_cells(lab, "01_data")
    assert_clean(nb)
    assert "one image: (28, 28) torch.float32" in text
    assert "training images per digit:" in text
    _, page, _, _, _ = lab
    assert page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output img").count() >= 1, "no plot"
    assert any("image/png" in o.get("data", {}) for o in outputs_of(nb, "display_data"))


def test_06_compare_runs_in_jupyterlab_with_widget_progress_bars(lab):
    text, nb = run_all_cells(lab, "06_compare")
    assert_clean(nb)
    assert "Trained parameters:          6,794 of 2,807,010 (0.242 %)" in text
    assert "Accuracy:                    0." in text and "with LoRA off" in text
    assert "LoRA off is identical to the pre-trained network" in text
    _, page, _, _, _ = lab
    assert page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output img").count() >= 1, "no plot"
    widgets = [o for o in outputs_of(nb, "display_data")
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "tqdm's bars should be widgets in JupyterLab (ipywidgets installed)"
    bars = page.locator(".jp-NotebookPanel:visible .widget-hbox:has(.widget-hprogress .progress-bar)")
    try:  # widget views are drawn a moment after their models arrive
        page.wait_for_function(FINISHED_BARS, arg=1, timeout=30_000)  # pre-training's (05's loop has none)
    except Exception:
        raise AssertionError(f"expected the pre-training bar drawn as a finished widget; "
                             f"found {bars.all_inner_texts()}") from None


def test_11_explorer_retrains_in_jupyterlab_when_the_rank_changes(lab):
    """The panel as a reader uses it: change the rank, press Fine-tune, and see new numbers and a
    new figure with no error; then a rank linear3 cannot take, refused in the panel."""
    text, nb = run_all_cells(lab, "11_explorer")
    assert_clean(nb)
    assert "The first press gave 05's adapter" in text
    _, page, _, _, _ = lab
    panel = page.locator(".jp-NotebookPanel:visible .lora-explorer")
    figure = panel.locator(".lora-explorer-figure")
    figure.wait_for(timeout=30_000)  # the widget views are drawn a moment after the cell ends
    numbers, button = panel.locator(".lora-explorer-numbers"), panel.locator(".lora-explorer-button")
    message = panel.locator(".lora-explorer-message")
    first_numbers, first_figure = numbers.inner_text(), figure.get_attribute("src")
    assert first_numbers.startswith("rank 1,") and first_figure, first_numbers

    panel.locator(".lora-explorer-rank select").select_option(label="4")
    factor = panel.locator(".lora-explorer-factor")
    page.wait_for_function("el => el.textContent.includes('= 0.25')", arg=factor.element_handle(),
                           timeout=10_000)  # alpha / r with alpha 1: the kernel answered the change
    assert button.is_enabled()
    button.click()
    try:
        page.wait_for_function("([el, old]) => el.innerText.startsWith('rank 4,') && el.innerText !== old",
                               arg=[numbers.element_handle(), first_numbers], timeout=30_000)
        page.wait_for_function("([img, old]) => img.getAttribute('src') !== old",
                               arg=[figure.element_handle(), first_figure], timeout=10_000)
        # the panel writes its message last: the numbers, the figure, then the time it took
        page.wait_for_function("el => el.innerText.startsWith('Updated in ')",
                               arg=message.element_handle(), timeout=10_000)
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / "11_explorer-unchanged.png"))
        raise AssertionError(f"the panel did not redraw after the rank changed: {numbers.inner_text()!r}, "
                             f"message {message.inner_text()!r}") from None
    assert "factor 0.25" in numbers.inner_text() and "wrong answers on digit" in numbers.inner_text()
    assert message.inner_text().startswith("Updated in "), message.inner_text()
    assert button.is_enabled()
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=str(EXPLORER_PICTURE))

    panel.locator(".lora-explorer-rank select").select_option(label="16")  # linear3 is 10 x 2,000
    page.wait_for_function("el => el.textContent.includes('too large for layer linear3')",
                           arg=message.element_handle(), timeout=10_000)
    # the kernel disables the button before it writes the refusal; the page draws each a moment later
    page.wait_for_function("el => el.disabled", arg=button.element_handle(), timeout=10_000)
    assert numbers.inner_text().startswith("rank 4,")  # the last good run stays shown
    stderr = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output"
                          '[data-mime-type="application/vnd.jupyter.stderr"]')
    assert stderr.count() == 0, stderr.first.inner_text()[:500]
