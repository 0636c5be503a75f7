"""The demo path from a wheel install, then the search page in a real headless browser.

A wheel built from this checkout is installed (``pip install --no-deps --target``) into a directory
put first on ``PYTHONPATH``, so its ``fgcmr`` shadows the editable checkout while torch & co. still
come from the environment; every command runs from a directory outside the repository. On it:
``fgcmr --help``, the ``tiny`` model config and sbatch templates from the package, then
train (single process, CLIP loss, a short run) → export, then the README's "Use a trained model"
commands as written (2-rank embed, index, search, serve, eval on the embeddings) → ``fgcmr.load``.
The browser test serves that index and drives Chromium through Selenium.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from fgcmr.dataset import iter_samples, open_dataset
from fgcmr.launch import local_rank_envs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> dict:
    """The package built as a wheel from a copy of the checkout and installed alone into ``site/``."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "labelers", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "shards"
        ),
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = (root / "dist").glob("fgcmr-*.whl")
    site = root / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.rmtree(src)  # nothing of the checkout may be needed from here on
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # one thread: two per process on a shared 2-core machine made training steps ~10× slower
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return {"site": site, "work": work, "env": env, "bin": site / "bin" / "fgcmr", "wheel": wheel}


def fgcmr_cli(w: dict, *args: str, extra_env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, str(w["bin"]), *args],
        capture_output=True,
        text=True,
        cwd=w["work"],
        env={**w["env"], **(extra_env or {})},
        timeout=timeout,
    )
    assert res.returncode == 0, f"fgcmr {' '.join(args)}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def demo(wheel_install: dict, synthetic_dataset: Path) -> dict:
    """train → export → embed → index with the wheel's commands, outside the repository."""
    w, run = wheel_install, wheel_install["work"] / "run"
    single = local_rank_envs(1)[0]
    fgcmr_cli(
        w,
        "train",
        f"--shards={synthetic_dataset}",
        f"--out={run}",
        "--model=tiny",
        "--loss.name=clip",
        "--max_steps=150",
        "--data.micro_batch=32",
        "--data.workers=1",
        "--data.augment=false",
        "--optim.lr=0.002",
        "--optim.warmup_steps=10",
        "--log_every=50",
        "--checkpoint_every=150",
        "--hist_every=1000",
        extra_env=single,
    )
    fgcmr_cli(w, "export", f"--run={run}")
    # the README's "Use a trained model" commands, as written, on this run laid out as runs/demo
    (w["work"] / "runs" / "demo" / "data").mkdir(parents=True)
    (w["work"] / "runs" / "demo" / "run").symlink_to(run)
    (w["work"] / "runs" / "demo" / "data" / "shards").symlink_to(synthetic_dataset)
    sample = next(iter_samples(open_dataset(synthetic_dataset).shards("test")[0]))
    (w["work"] / "photo.jpg").write_bytes(sample.image)
    shown = {}
    for argv in readme_commands():
        if argv[:2] == ["fgcmr", "serve"]:
            shown["serve"] = serve_once(w, argv)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", *argv[1:]] if argv[0] == "torchrun" else argv
        res = subprocess.run(
            [sys.executable, str(w["bin"]), *cmd[1:]] if cmd[0] == "fgcmr" else cmd,
            capture_output=True,
            text=True,
            cwd=w["work"],
            env=w["env"],
            timeout=1800,
        )
        assert res.returncode == 0, f"README: {' '.join(argv)}:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        shown[" ".join(argv[:2]) + (" image" if "--image=photo.jpg" in argv else "")] = res.stdout + res.stderr
    demo_dir = w["work"] / "runs" / "demo"
    return {
        **w,
        "run": run,
        "export": run / "export",
        "index": demo_dir / "index",
        "emb": demo_dir / "emb",
        "dataset": synthetic_dataset,
        "readme": shown,
    }


def readme_commands() -> list[list[str]]:
    """The shell commands of the README's "Use a trained model" block: comments dropped, ``[--opt]`` taken."""
    section = (REPO / "README.md").read_text().split("## Use a trained model", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines() if not line.lstrip().startswith("#")]
    return [shlex.split(re.sub(r"\[(--[^\]]+)\]", r"\1", line)) for line in lines if line]


def serve_once(w: dict, argv: list[str]) -> str:
    """Start the README's ``fgcmr serve`` line, fetch its page from the address it prints, stop it."""
    proc = subprocess.Popen(
        [sys.executable, str(w["bin"]), *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=w["work"],
        env=w["env"],
    )
    try:
        for line in proc.stdout:  # hang guard: the test's own timeout
            if line.startswith("fgcmr serve: http://"):
                url = line.split()[2]
                break
        else:
            raise AssertionError(f"fgcmr serve ended (code {proc.wait()}) without printing its address")
        assert url.startswith("http://127.0.0.1:")
        return urllib.request.urlopen(url, timeout=120).read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_wheel_install_runs_the_demo_path(demo: dict):
    code = (
        "import fgcmr, fgcmr.config as fc, fgcmr.slurm.chain as chain, fgcmr.train.config as tc, json; "
        "cfg = tc.load_model_config('tiny'); m = fgcmr.load('run/export', device='cpu'); "
        "print(json.dumps({'pkg': fgcmr.__file__, 'configs': str(fc.CONFIGS), 'templates': str(chain.TEMPLATES), "
        "'templates_n': len(list(chain.TEMPLATES.iterdir())), 'embed_dim': cfg.embed_dim, "
        "'shape': list(m.encode_text(['a red circle']).shape), 'step': m.info['provenance']['step']}))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=demo["work"], env=demo["env"], timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    site = str(demo["site"])
    assert got["pkg"].startswith(site) and got["configs"].startswith(site) and got["templates"].startswith(site), got
    assert got["templates_n"] > 0 and got["embed_dim"] == 64 and got["shape"] == [1, 64] and got["step"] == 150
    shown = fgcmr_cli(demo, "--help")
    assert all(c in shown.stdout for c in ("Commands:", "embed", "index", "search", "serve"))
    manifest = json.loads((demo["export"] / "model_config.json").read_text())["fgcmr"]["provenance"]
    assert manifest["data_manifest_sha256"] and manifest["tag"] == "step_00000150"

    # what the README's commands printed and wrote
    manifest = json.loads((demo["emb"] / "embeddings.json").read_text())
    dataset = open_dataset(demo["dataset"])
    assert manifest["world_size"] == 2 and manifest["splits"] == dataset.split_names
    assert manifest["images"] == sum(dataset.items(s) for s in dataset.split_names) and manifest["dtype"] == "float16"
    readme = demo["readme"]
    hits = json.loads(next(x for x in readme["fgcmr search"].splitlines() if x.startswith('{"query"')))["results"]
    assert len(hits) == 10 and all(set(r) >= {"key", "score", "caption", "url"} for r in hits)
    assert [r["score"] for r in hits] == sorted((r["score"] for r in hits), reverse=True)
    rows = [line for line in readme["fgcmr search image"].splitlines() if re.match(r"\s*\d+\s+-?\d\.\d{4}\s", line)]
    assert len(rows) == 5
    assert "<title>fgcmr search</title>" in readme["serve"]
    metrics = json.loads((demo["run"] / "eval" / "metrics.json").read_text())
    assert metrics["map_avg"] > 0 and "MAP" in readme["fgcmr eval"]


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        why = (
            "chromium and chromium-driver are not installed "
            "(apt-get install chromium chromium-driver; .ci/browser-up.sh)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1024",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_search_page_in_headless_chromium(demo: dict, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from fgcmr.retrieval.search import Searcher
    from fgcmr.retrieval.serve import ServeConfig, make_server

    k = 6
    browser = _browser()
    server = make_server(ServeConfig(index=str(demo["index"]), port=0, k=k))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d/" % server.server_address[1]
    searcher = Searcher(demo["index"])
    dataset = open_dataset(demo["dataset"])
    samples = [s for split in dataset.split_names for p in dataset.shards(split) for s in iter_samples(p)]
    # the known queries: captions of the embedded set whose top result (by the CLI's search) is their own image
    known = [(s.texts[0], s.key) for s in samples if searcher.text_to_images(s.texts[0], 1)[0]["key"] == s.key]
    assert len(known) >= 3, (
        f"only {len(known)} of {len(samples)} captions find their own image: the model did not train"
    )
    try:
        browser.get(url)
        assert browser.title == "fgcmr search"
        for caption, key in known[:3]:
            box = browser.find_element(By.ID, "q")
            box.clear()
            box.send_keys(caption)
            browser.find_element(By.ID, "go").click()
            WebDriverWait(browser, 120).until(
                lambda b, caption=caption: b.find_element(By.ID, "status").text.endswith(f'"{caption}"')
            )
            hits = browser.find_elements(By.CSS_SELECTOR, "#grid figure.hit")
            assert len(hits) == k and hits[0].get_attribute("data-key") == key
            WebDriverWait(browser, 120).until(
                lambda b: all(
                    b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
                    for img in b.find_elements(By.CSS_SELECTOR, "#grid img")
                )
            )  # every thumbnail decoded from its shard
        # image → captions: upload the first known image; the top captions are the CLI's
        sample = next(s for s in samples if s.key == known[0][1])
        path = tmp_path / "upload.jpg"
        path.write_bytes(sample.image)
        browser.find_element(By.ID, "upload").send_keys(str(path))
        WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#texts li.text")) == k)
        shown = [li.get_attribute("data-key") for li in browser.find_elements(By.CSS_SELECTOR, "#texts li.text")]
        assert shown == [r["key"] for r in searcher.image_to_texts(sample.image, k)]
    finally:
        browser.quit()
        server.shutdown()
        server.server_close()
