"""The studio as a person uses it, in headless Chromium (Debian's chromium driven by Playwright): open it, import
examples/quickstart/config.toml, shorten the run, queue it on builtin:mini, watch the progress and a sample image
arrive, stop it, resume it, see it finish with its files listed; edit a caption; then the security cases against
the live server's HTTP API. STUDIO_SCREENSHOTS=docs/images writes the docs' screenshots."""

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_MS = 300_000  # only against a hang: each wait fails with what it waited for
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install "
                                     "playwright; the [test] extra has it)")
pytest.importorskip("uvicorn", reason="the studio's extra is not installed: pip install -e '.[studio]'")
if not CHROMIUM.is_file():
    pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium; .ci/run does it as root)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def studio(tmp_path, monkeypatch):
    """A studio on 127.0.0.1 (uvicorn in a thread of this process) over a root holding the quickstart example."""
    import uvicorn

    from lora_diffusion.studio.server import create_app

    root = tmp_path / "root"
    shutil.copytree(ROOT / "examples" / "quickstart", root / "examples" / "quickstart",
                    ignore=shutil.ignore_patterns("output"))
    (root / "fast_prompts.txt").write_text("a red star on a blue background --w 64 --h 64 --d 1 --l 5 --s 6\n")
    monkeypatch.chdir(root)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    port = free_port()
    app = create_app(root, tmp_path / "studio-data", port=port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the studio's server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "studio": app.app.state.studio}
    server.should_exit = True
    thread.join(timeout=10)
    for job in app.app.state.studio.queue.in_state("running"):  # never leave a trainer behind
        try:
            os.killpg(job["pid"], 9)
        except (ProcessLookupError, TypeError):
            pass


def shot(page, name):
    folder = os.environ.get("STUDIO_SCREENSHOTS")
    if folder:  # a palette PNG: a few dozen KiB for the docs
        from PIL import Image

        path = Path(ROOT, folder, f"studio_{name}.png")
        page.screenshot(path=str(path), full_page=False)
        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def set_field(page, group, name, value):
    page.click(f'#groups button[data-group="{group}"]')
    field = page.locator(f'#fields [name="{name}"]')
    field.fill(value)
    field.dispatch_event("change")


def wait_text(page, selector, text, what):
    try:
        page.wait_for_function("([s, t]) => (document.querySelector(s)?.textContent || '').includes(t)",
                               arg=[selector, text], timeout=HANG_GUARD_MS)
    except playwright_api.TimeoutError:
        log = page.locator("#job-log").text_content() if page.locator("#job-log").count() else ""
        raise AssertionError(f"hung waiting for {what} ({selector} to show {text!r}); log: {log[-2000:]}") from None


def test_a_run_from_the_page(studio):
    url, root = studio["url"], studio["root"]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=HANG_GUARD_MS)

            # Train: import the quickstart, shorten it (10 steps, a sample every 3), check, queue
            page.fill("#import-path", "examples/quickstart/config.toml")
            page.click("#import-go")
            wait_text(page, "#message", "imported", "the import")
            page.click('#groups button[data-group="model"]')
            assert page.locator('#fields [name="pretrained_model_name_or_path"]').input_value() == "builtin:mini"
            for group, name, value in [("training", "max_train_epochs", ""), ("training", "max_train_steps", "10"),
                                       ("output", "save_every_n_epochs", ""),
                                       ("logging and samples", "sample_every_n_epochs", ""),
                                       ("logging and samples", "sample_every_n_steps", "3"),
                                       ("logging and samples", "sample_prompts", "fast_prompts.txt"),
                                       ("validation", "validation_prompts", ""), ("model", "threads", "1")]:
                set_field(page, group, name, value)
            page.click("#check")
            wait_text(page, "#command", "--max_train_steps=10", "the checked command line")
            assert "max_train_epochs" not in page.locator("#toml").text_content()
            shot(page, "train")
            page.click("#queue")

            # Jobs: progress, a sample, stop
            wait_text(page, "#job-step", "step", "the job's progress")
            page.wait_for_selector("#job-samples img", timeout=HANG_GUARD_MS)
            wait_text(page, "#job-state", "running", "a running job")
            shot(page, "job")
            page.click("#job-stop")
            wait_text(page, "#job-state", "stopped", "the stop (SIGTERM: a LoRA and a state saved)")
            assert "-state" in page.locator("#job-files").text_content()

            # resume: a new job from the saved state, to the end
            page.click("#job-resume")
            wait_text(page, "#job-detail h2", "(resumed)", "the resumed job")
            wait_text(page, "#job-state", "finished", "the resumed job's end")
            wait_text(page, "#job-files", "quickstart.safetensors", "the final LoRA in the files")
            wait_text(page, "#job-step", "step 10 / 10, epoch 1 / 1", "the last step")
            assert page.locator("#job-samples img").count() >= 2
            assert page.locator("#job-samples img").first.evaluate("img => img.naturalWidth") == 64
            shot(page, "finished")
            assert (root / "output" / "quickstart" / "quickstart.safetensors").is_file()

            # Dataset: the concept folder, thumbnails, a caption edited and saved
            page.click('#tabs button[data-tab="dataset"]')
            page.fill("#ds-train", "examples/quickstart/data")
            page.fill("#ds-res", "64")
            page.click("#ds-load")
            wait_text(page, "#ds-concepts", "10_star", "the concept folder")
            first = page.locator("#ds-images figure").first
            image = first.get_attribute("data-image")
            first.locator("textarea").fill("a red star, edited in the studio")
            first.locator("button").click()
            wait_text(page, "#message", "saved", "the caption's save")
            caption = (root / image).with_suffix(".txt")
            assert caption.read_text() == "a red star, edited in the studio\n"
            shot(page, "dataset")
        finally:
            browser.close()
    check_the_live_api(url, root)


def request(url, method="GET", body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def check_the_live_api(url, root):
    status, answer = request(f"{url}/api/image?path=../../etc/passwd")
    assert status == 403 and "'..'" in answer["error"]
    os.symlink("/etc", root / "etc_link")
    assert request(f"{url}/api/image?path=etc_link/passwd")[0] == 403
    forged = {"Content-Type": "application/json", "X-Studio-Request": "1", "Origin": "http://evil.example"}
    assert request(f"{url}/api/jobs", "POST", {"values": {}}, forged)[0] == 403
    assert request(f"{url}/api/jobs", "POST", {"values": {}}, {"Content-Type": "text/plain"})[0] == 403
    ok = {"Content-Type": "application/json", "X-Studio-Request": "1"}
    status, answer = request(f"{url}/api/options/check", "POST", {"values": {
        "pretrained_model_name_or_path": "builtin:mini", "train_data_dir": "examples/quickstart/data",
        "output_name": "a; touch PWNED"}}, ok)
    assert status == 200 and "'--output_name=a; touch PWNED'" in answer["command"]
    assert not (root / "PWNED").exists()
