"""``fgcmr serve``: a local search page over an ``fgcmr index`` (stdlib ``http.server``, no framework).

    GET  /                      the page: a search box (text → image grid) and an image upload (image → captions)
    GET  /api/search?text=…&k=  {"results": [{"key", "score", "caption", …}]}, as ``fgcmr search --json``
    POST /api/image?k=          the body is an image file → {"results": [...]} of captions
    GET  /thumb/<key>           a JPEG thumbnail of the image, read from its shard

Binds 127.0.0.1 by default: the page is for the user of this machine, not the network.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from fgcmr.config import Validated
from fgcmr.dataset import IMAGE_EXTS
from fgcmr.retrieval.search import Searcher

log = logging.getLogger("fgcmr.serve")
MAX_UPLOAD = 32 << 20


@dataclasses.dataclass
class ServeConfig(Validated):
    index: str  # fgcmr index output dir
    host: str = "127.0.0.1"  # address served on (0.0.0.0: every interface)
    port: int = 8765  # 0: any free port (printed)
    k: int = 12  # results per query (the page can ask for others)
    thumb_size: int = 192  # px, longest side
    export: str | None = None  # default: the index's export
    device: str | None = None  # default: cuda if available


class Thumbnails:
    """Image bytes by key from the dataset's shards: each shard's member offsets are read once, on first use."""

    def __init__(self, dataset_root: Path, shard_of: dict[str, str], size: int):
        self.root, self.shard_of, self.size = dataset_root, shard_of, size
        self.offsets: dict[str, dict[str, tuple[int, int]]] = {}
        self.lock = threading.Lock()

    def image(self, key: str) -> bytes | None:
        shard = self.shard_of.get(key)
        if shard is None:
            return None
        with self.lock:
            if shard not in self.offsets:
                with tarfile.open(self.root / shard) as tar:
                    self.offsets[shard] = {
                        m.name.partition(".")[0]: (m.offset_data, m.size)
                        for m in tar
                        if m.isfile() and m.name.partition(".")[2] in IMAGE_EXTS
                    }
        where = self.offsets[shard].get(key)
        if where is None:
            return None
        with open(self.root / shard, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def thumbnail(self, key: str) -> bytes | None:
        from PIL import Image

        data = self.image(key)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((self.size, self.size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
            return buf.getvalue()


def make_handler(searcher: Searcher, thumbs: Thumbnails, default_k: int) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()  # one query at a time through the model

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/":
                self._send(200, PAGE.replace("{{K}}", str(default_k)).encode(), "text/html; charset=utf-8")
            elif url.path == "/api/search":
                text = (query.get("text") or [""])[0]
                if not text.strip():
                    return self._json(400, {"error": "empty query: pass ?text=…"})
                with lock:
                    results = searcher.text_to_images(text, self._k(query))
                self._json(200, {"query": {"text": text}, "results": results})
            elif url.path.startswith("/thumb/"):
                data = thumbs.thumbnail(unquote(url.path[len("/thumb/") :]))
                if data is None:
                    return self._json(404, {"error": "no such image"})
                self._send(200, data, "image/jpeg")
            else:
                self._json(404, {"error": f"no page {url.path}"})

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            if url.path != "/api/image":
                return self._json(404, {"error": f"no endpoint {url.path}"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_UPLOAD:
                return self._json(400, {"error": f"send an image file of at most {MAX_UPLOAD >> 20} MiB as the body"})
            body = self.rfile.read(length)
            try:
                with lock:
                    results = searcher.image_to_texts(body, self._k(parse_qs(url.query)))
            except Exception as e:  # not an image: tell the page, keep serving
                return self._json(400, {"error": f"cannot read that image: {e}"})
            self._json(200, {"results": results})

        def _k(self, query: dict) -> int:
            try:
                return max(1, min(100, int((query.get("k") or [default_k])[0])))
            except ValueError:
                return default_k

        def _json(self, code: int, obj: dict) -> None:
            self._send(code, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

    return Handler


def make_server(cfg: ServeConfig) -> ThreadingHTTPServer:
    searcher = Searcher(cfg.index, cfg.export, cfg.device)
    shard_of = {row["key"]: row["shard"] for row in searcher.rows["images"]}
    thumbs = Thumbnails(Path(searcher.info["dataset"]["root"]), shard_of, cfg.thumb_size)
    return ThreadingHTTPServer((cfg.host, cfg.port), make_handler(searcher, thumbs, cfg.k))


def run(cfg: ServeConfig) -> None:
    server = make_server(cfg)
    host, port = server.server_address[:2]
    print(f"fgcmr serve: http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fgcmr search</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; }
 form { margin-bottom: 1rem; } input[type=text] { width: 28rem; padding: .3rem; }
 #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .8rem; }
 figure { margin: 0; border: 1px solid #ddd; padding: .4rem; } figure img { width: 100%; image-rendering: auto; }
 figcaption { font-size: .8rem; } .score { color: #666; } #error { color: #b00; }
</style></head><body>
<h1>fgcmr search</h1>
<form id="text-form"><input type="text" id="q" placeholder="describe an image…" autofocus>
 k <input type="number" id="k" value="{{K}}" min="1" max="100" style="width:4rem"> \
<button id="go" type="submit">Search</button></form>
<form id="image-form">Image → captions: <input type="file" id="upload" accept="image/*"></form>
<p id="error"></p><p id="status"></p>
<div id="grid"></div><ol id="texts"></ol>
<script>
const $ = (id) => document.getElementById(id);
function show(err) { $("error").textContent = err || ""; }
function esc(s) { const d = document.createElement("div"); \
d.textContent = s == null ? "" : String(s); return d.innerHTML; }
$("text-form").addEventListener("submit", async (ev) => {
  ev.preventDefault(); show(""); $("texts").innerHTML = "";
  const r = await fetch(`/api/search?k=${$("k").value}&text=${encodeURIComponent($("q").value)}`);
  const data = await r.json(); if (!r.ok) { show(data.error); return; }
  $("grid").innerHTML = data.results.map((h) => `<figure class="hit" data-key="${esc(h.key)}">
    <img src="/thumb/${encodeURIComponent(h.key)}" alt="${esc(h.key)}"><figcaption>\
<span class="score">${h.score.toFixed(3)}</span>
    ${esc(h.key)}<br>${esc(h.caption)}</figcaption></figure>`).join("");
  $("status").textContent = `${data.results.length} images for "${$("q").value}"`;
});
$("upload").addEventListener("change", async () => {
  const file = $("upload").files[0]; if (!file) return; show(""); $("grid").innerHTML = "";
  const r = await fetch(`/api/image?k=${$("k").value}`, { method: "POST", body: file });
  const data = await r.json(); if (!r.ok) { show(data.error); return; }
  $("texts").innerHTML = data.results.map((h) => `<li class="text" data-key="${esc(h.key)}">
    <span class="score">${h.score.toFixed(3)}</span> ${esc(h.caption)} <small>(${esc(h.key)})</small></li>`).join("");
  $("status").textContent = `${data.results.length} captions for ${file.name}`;
});
</script></body></html>
"""
