"""`vlmtune serve` throughput and latency: batched (--max-batch-size N) against one-at-a-time (1), one invocation.

Each variant is a fresh server process on a free loopback port; CLIENTS threads each send REQUESTS greedy
chat completions (one image + a question, max_tokens fixed) back to back. Prints p50/p95 latency per request
and completed requests per second, and the throughput ratio batched / one-at-a-time.

    python scripts/bench/bench_serve.py [--clients 32 --requests 4 --batch 8 --max-tokens 16] -- MODEL FLAGS
e.g. -- work_dirs/tiny/llm --llava DIR --torch-dtype float32 --device cpu
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import footer, header  # noqa: E402

IMAGE = Path(__file__).resolve().parents[2] / "vlmtune" / "assets" / "example" / "images" / "chelsea.jpg"


def start(model: list[str], batch: int) -> tuple[subprocess.Popen, str]:
    """A serve process and its base URL, once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from vlmtune.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", *model, "--port", str(port), "--max-batch-size",
                             str(batch)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def post(url: str, body: bytes) -> float:
    """Seconds for one completed request."""
    started = time.monotonic()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        assert r.status == 200
    return time.monotonic() - started


def run(model: list[str], batch: int, args) -> dict:
    """p50, p95 and requests/s for one server setting."""
    proc, url = start(model, batch)
    image = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                                  {"type": "text", "text": "What is in the image?"}]}],
                       "max_tokens": args.max_tokens, "temperature": 0}).encode()
    post(url, body)  # warm-up
    started = time.monotonic()
    with ThreadPoolExecutor(args.clients) as pool:
        times = sorted(t for ts in pool.map(lambda _: [post(url, body) for _ in range(args.requests)],
                                            range(args.clients)) for t in ts)
    wall = time.monotonic() - started
    proc.terminate()
    proc.wait(timeout=120)
    return {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))], "rps": len(times) / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("model", nargs=argparse.REMAINDER, help="-- then the serve model flags")
    args = parser.parse_args()
    model = args.model[1:] if args.model[:1] == ["--"] else args.model
    header(("torch", "transformers", "fastapi", "uvicorn"), f"OMP threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    results = {batch: run(model, batch, args) for batch in (args.batch, 1)}
    for batch, r in results.items():
        print(f"--max-batch-size {batch}: p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s, {r['rps']:.2f} requests/s "
              f"({args.clients} clients x {args.requests} requests)")
    print(f"throughput batched / one-at-a-time: {results[args.batch]['rps'] / results[1]['rps']:.2f}x")
    footer()


if __name__ == "__main__":
    main()
