"""A stand-in for the programs `etsq servers up` launches: it takes exactly SGLang's or vLLM's
documented launch flags (anything else is refused, as the real parsers do) and serves `/health`.

    python -m tests.launch_standin sglang --model-path M --host H --port P --enable-metrics [...]
    python -m tests.launch_standin vllm M --host H --port P --enable-prompt-tokens-details [...]

`etsq servers up --engine-command "python -m tests.launch_standin sglang"` runs it in place of
`python3 -m sglang.launch_server`.  What it serves depends on the model:

- a directory (sglang): the SGLang stand-in (tests/sglang_standin.py) on that model, so etsq's
  SGLang client can check the pair as a worker does;
- `exit-at-start`: prints a CUDA out-of-memory line and exits with status 1;
- `never-healthy`: answers `/health` with 503 forever;
- `ignore-sigterm`: healthy, but ignores SIGTERM (only SIGKILL ends it);
- anything else: healthy after half a second, with a child process in its session (as SGLang's
  scheduler is), and `/launch` returning its argv, pid, session, child pid and CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch_standin")
    engines = parser.add_subparsers(dest="engine", required=True)
    sglang = engines.add_parser("sglang")
    sglang.add_argument("--model-path", required=True)
    sglang.add_argument("--host", default="127.0.0.1")
    sglang.add_argument("--port", type=int, default=30000)
    sglang.add_argument("--enable-metrics", action="store_true")
    sglang.add_argument("--mem-fraction-static", type=float)
    vllm = engines.add_parser("vllm")
    vllm.add_argument("model_path")
    vllm.add_argument("--host", default="127.0.0.1")
    vllm.add_argument("--port", type=int, default=8000)
    vllm.add_argument("--enable-prompt-tokens-details", action="store_true")
    vllm.add_argument("--gpu-memory-utilization", type=float)
    return parser.parse_args(argv)


class Handler(BaseHTTPRequestHandler):
    status = 200
    launch: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(self.status, b"")
        elif self.path == "/launch":
            self._send(200, json.dumps(self.launch).encode())
        elif self.path == "/metrics":
            self._send(200, b"sglang:num_used_tokens 0\n")
        else:
            self._send(404, b"")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def serve(args: argparse.Namespace, argv: list[str]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    Handler.status = 503 if args.model_path == "never-healthy" else 200
    Handler.launch = {
        "argv": argv, "pid": os.getpid(), "sid": os.getsid(0), "child": child.pid,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }  # fmt: skip
    if args.model_path == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:  # as SGLang does: end its children, then itself
        signal.signal(signal.SIGTERM, lambda *_: (child.kill(), sys.exit(0)))
    time.sleep(0.5)  # not listening at once, like a server loading its model
    print(
        f"serving {args.model_path} on {args.host}:{args.port} pid {os.getpid()} child {child.pid}",
        flush=True,
    )
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


def main(argv: list[str]) -> None:
    args = parse(argv)
    print(f"launch_standin {' '.join(argv)}", flush=True)
    if args.model_path == "exit-at-start":
        print("RuntimeError: CUDA error: out of memory", file=sys.stderr, flush=True)
        sys.exit(1)
    if args.engine == "sglang" and Path(args.model_path).is_dir():
        standin = [sys.executable, "-m", "tests.sglang_standin", "--model", args.model_path]
        os.execv(sys.executable, [*standin, "--port", str(args.port)])
    serve(args, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
