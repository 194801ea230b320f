"""Serve samples/web with a bundle and the npm packages it needs, on localhost only.

    npm install @huggingface/transformers      # brings onnxruntime-web (ONNXRUNTIME_NODE_INSTALL=skip is fine)
    python samples/web/serve.py --bundle out/multi --node-modules node_modules
    # open http://127.0.0.1:8000/

URL paths: ``/`` this folder, ``/bundle/`` the bundle, ``/node_modules/`` the packages. The page POSTs its
probe results to ``/result``; with ``--result FILE`` the server writes them there and exits (the tests drive
headless Chromium that way). Only the standard library: the page needs no build step.
"""

from __future__ import annotations

import argparse
import http.server
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_RESULT = 16 * 1024 * 1024


class Handler(http.server.SimpleHTTPRequestHandler):
    roots: dict[str, Path] = {}
    result: Path | None = None
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".json": "application/json", ".onnx": "application/octet-stream"}

    def translate_path(self, path: str) -> str:
        # The base class resolves the URL against `directory` and drops '..' segments; pick the root by prefix.
        for prefix, root in self.roots.items():
            if path == prefix.rstrip("/") or path.startswith(prefix):
                self.directory = str(root)
                return super().translate_path("/" + path[len(prefix):])
        self.directory = str(HERE)
        return super().translate_path(path)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        if self.path != "/result" or not 0 < length <= MAX_RESULT:
            self.send_error(400, "POST /result with a JSON body")
            return
        body = self.rfile.read(length)
        self.send_response(204)
        self.end_headers()
        if self.result is None:
            sys.stdout.write(body.decode("utf-8", "replace") + "\n")
            return
        tmp = self.result.with_name(self.result.name + ".part")
        tmp.write_bytes(body)
        tmp.replace(self.result)
        self.server.shutdown_requested = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


def make_server(bundle: Path, node_modules: Path, port: int = 0, result: Path | None = None,
                verbose: bool = False) -> http.server.ThreadingHTTPServer:
    for what, path in (("--bundle", bundle / "manifest.json"), ("--node-modules", node_modules / "onnxruntime-web")):
        if not path.exists():
            raise SystemExit(f"error: {what}: {path} does not exist")
    handler = type("BundleHandler", (Handler,), {"roots": {"/bundle/": bundle.resolve(),
                                                           "/node_modules/": node_modules.resolve()},
                                                 "result": result})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), partial(handler, directory=str(HERE)))
    server.verbose = verbose
    server.timeout = 0.5  # handle_request returns now and then, to see the flag a request thread set
    server.shutdown_requested = False
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle exported with --keep-adapters")
    parser.add_argument("--node-modules", type=Path, required=True,
                        help="a node_modules folder holding @huggingface/transformers and onnxruntime-web")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--result", type=Path, help="write the page's probe results here, then exit")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)
    server = make_server(args.bundle, args.node_modules, args.port, args.result, args.verbose)
    print(f"serving http://127.0.0.1:{server.server_address[1]}/", file=sys.stderr, flush=True)
    try:
        while not server.shutdown_requested:
            server.handle_request()
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
