"""JupyterLab on vmcell kernels, driven in a real browser: Debian's chromium under Playwright, a real
`jupyter lab --gateway-url=...` in front of a real vmcell server, real microVMs.

A stock notebook (kernelspec python3) opens on a vmcell kernel without a kernel picker, prints and
plots; the launcher shows the vmcell kernels with their logos. Screenshots land in the test's
tmp_path (launcher.png, notebook.png)."""

import asyncio
import json
import os

import nbformat
import pytest

from tests.test_jupyter_clients import running_jupyter

pytestmark = pytest.mark.vm

CHROMIUM = "/usr/bin/chromium"  # Debian's (interpreter/config.py DEBIAN_HOST_PACKAGES); never a downloaded one
# What Chromium needs here: root (no sandbox), no display, no GPU, and no network but loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 60_000  # a page, a dialog: JupyterLab's own work, on a loaded 2-core host
CELL_TIMEOUT_MS = 240_000  # a cell through the gateway into a TCG microVM (the plot: seconds, more under load)
NOTEBOOK = "stock.ipynb"
PRINT_CELL = 'import socket\nprint("hello from", socket.gethostname()[:7])'
PLOT_CELL = "import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.title('vmcell')\nplt.show()"


def stock_notebook(path) -> None:
    """A notebook as a local Jupyter saves it: its kernelspec says python3."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(PRINT_CELL), nbformat.v4.new_code_cell(PLOT_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, path)


async def until(done, probe, failure: str, timeout: float = CELL_TIMEOUT_MS / 1000):
    """probe() (awaited if need be) until done(value); its last value. Polls: no guessed sleep."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if done(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"{failure} (after {timeout:g}s; last: {value!r})")
        await asyncio.sleep(0.2)


async def lab_sessions(lab) -> list:
    response = await lab("GET", "/api/sessions")
    assert response.code == 200, response.body
    return json.loads(response.body)


@pytest.fixture
async def lab(api, tmp_path):
    """`jupyter lab` whose kernels are the vmcell server's (`api`), on a free loopback port."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make system` installs Debian's chromium")
    root = tmp_path / "root"
    root.mkdir()
    stock_notebook(root / NOTEBOOK)
    # The machine is offline: no news (the toast asking for them would cover the page).
    notification = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    settings = {"JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    async with running_jupyter(api, tmp_path, "jupyterlab",
                               # the machine is offline: no news feed, no update check
                               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                               root=root, env_extra=settings) as call:
        call.root = root
        yield call


@pytest.fixture
async def browser(tmp_path):
    """A page in Debian's chromium (headless, a fresh profile), closed after."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900})
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            await context.close()


async def test_jupyterlab_runs_a_stock_notebook_on_a_vmcell_kernel(api, lab, browser, tmp_path):
    from playwright.async_api import expect

    page = browser
    # 1. The launcher: a card per vmcell kernelspec (python3 too), each with its logo, fetched by
    # jupyter_server from vmcell's /kernelspecs/{name}/logo-64x64.png.
    await page.goto(f"{lab.url}/lab?reset&token={lab.token}")
    card = page.locator(".jp-LauncherCard[title='Python 3 (vmcell python microVM)']").first
    await expect(card).to_be_visible()
    alias_card = page.locator(".jp-LauncherCard[title='Python 3 (vmcell python microVM, as python3)']").first
    await expect(alias_card).to_be_visible()
    logo = card.locator("img")
    await expect(logo).to_have_attribute("src", "/kernelspecs/python/logo-64x64.png")
    await page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=await logo.element_handle())
    await page.screenshot(path=str(tmp_path / "launcher.png"))

    # 2. The stock notebook (kernelspec python3) opens on a vmcell kernel: no kernel picker.
    await page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}")
    panel = page.locator(".jp-NotebookPanel")
    await expect(panel).to_be_visible()
    # JupyterLab may create the session under a temporary (uuid) path and then rename it to the notebook's.
    sessions = await until(lambda s: s and any(x["path"] == NOTEBOOK for x in s), lambda: lab_sessions(lab),
                           "JupyterLab started no kernel for the notebook")
    assert [(s["path"], s["kernel"]["name"]) for s in sessions] == [(NOTEBOOK, "python3")]
    session = api.manager.get(sessions[0]["kernel"]["id"])  # the notebook's kernel is a vmcell session: one microVM
    assert session.alive and session.template.spec.name == "python"
    vm_pid = session.vm.pid
    await expect(panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1)
    await expect(panel.locator(".jp-Toolbar-kernelName")).to_have_text("Python 3 (vmcell python microVM, as python3)")
    await expect(page.locator(".jp-Dialog")).to_have_count(0)

    # 3. Run both cells (Shift+Enter twice): the printed line and the PNG chart show in the page.
    await panel.locator(".jp-Cell").first.locator(".jp-InputArea-editor").click()
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.press("Shift+Enter")
    outputs = panel.locator(".jp-OutputArea-output")
    await expect(outputs.filter(has_text="hello from vmcell-")).to_have_count(1, timeout=CELL_TIMEOUT_MS)
    chart = outputs.locator("img[src^='data:image/png']")
    await expect(chart).to_have_count(1, timeout=CELL_TIMEOUT_MS)
    await page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=await chart.element_handle())
    await expect(page.locator(".jp-Dialog")).to_have_count(0)
    await page.screenshot(path=str(tmp_path / "notebook.png"))

    # 4. Saved, the notebook keeps its kernelspec (python3) and has the chart.
    await page.keyboard.press("Control+s")

    def saved():
        nb = nbformat.read(lab.root / NOTEBOOK, as_version=4)
        outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
        return nb.metadata.kernelspec.name, any("image/png" in o.get("data", {}) for o in outputs)

    assert await until(lambda s: s[1], saved, "the notebook was not saved with its outputs") == ("python3", True)

    # 5. Shutting the notebook's kernel down in JupyterLab closes the VM.
    assert (await lab("DELETE", f"/api/sessions/{sessions[0]['id']}")).code == 204
    await until(lambda s: not s, api.manager.list, "the kernel's session outlived its shutdown")
    assert not os.path.exists(f"/proc/{vm_pid}") or b"qemu" not in open(f"/proc/{vm_pid}/cmdline", "rb").read()
