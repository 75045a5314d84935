"""Load test of the REST API: many concurrent clients against a real uvicorn server.

    .venv/bin/python benchmarks/load.py                                  # metadata/models/model.pth
    .venv/bin/python benchmarks/load.py --concurrency 32 --requests 5000 --model-path m.pth
    .venv/bin/python benchmarks/load.py --quick                          # small counts (tests)
    .venv/bin/python benchmarks/load.py --sweep --requests 2000          # docs/benchmarks/serving-sweep.md

--sweep runs the server in seven configurations at once (the checkpoint in PyTorch, its
TorchScript export and its ONNX export, each batched and with --max-batch 1, and the no-model
ceiling), measures each at 1, 4, 16 and 64 concurrent clients (--levels) in rounds that
alternate between them, and writes a table, issue 28's targets judged on it, and a plot
(throughput, p50/p99 against concurrency) with each configuration's RSS growth; the exports
are written beside the checkpoint first when they are missing.

Starts `source/serve.py` in a subprocess on 127.0.0.1 and a free port, warms it up with the
same number of concurrent clients, then sends --requests one-image POST /predict requests
from --concurrency threads, each with its own keep-alive httpx client, cycling through the
real sample digits in assets/samples/. Every answer is checked (status 200, the response
schema, no per-image error); anything else counts as an error. Reports the p50/p95/p99
latency (send to parsed JSON), the throughput, the error count and the server's resident
memory at start, after the warm-up and at the end (flat memory: no leak per request), and
writes metadata/results/load.md. The server is always stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "source"))

from cli import HelpFormatter  # noqa: E402

SAMPLES_DIR = ROOT / "assets" / "samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PREDICTION_KEYS = {"source", "predicted", "probability", "topk", "error"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(folder: Path | None = None, limit: int = 64) -> list[tuple[str, bytes]]:
    """(name, bytes) of the real test-split digits shipped in assets/samples/, or of the first
    `limit` images under `folder` (sorted paths; e.g. CIFAR-10 JPEGs for a cifar10 model)."""
    if folder is None:
        return [(p.name, p.read_bytes()) for p in sorted(SAMPLES_DIR.glob("*.png"))]
    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.name, p.read_bytes()) for p in found[:limit]]


def start_server(model_path: str, *, threads: int = 1, timeout: float = 180.0, extra=(), env=None):
    """`source/serve.py` on a free loopback port -> (process, base URL), once /health is 200;
    `extra`: more serve.py options, `env`: more environment variables (PREDICT_BACKEND,
    SERVE_NO_MODEL). The caller stops it with stop_server (in a finally)."""
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "source" / "serve.py"), "--host", "127.0.0.1",
         "--port", str(port), "--model-path", str(model_path), "--device", "cpu",
         "--threads", str(threads), "--log-level", "warning", *extra],
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return server, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {timeout:g} s")
            time.sleep(0.2)
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def server_rss_mb(server: subprocess.Popen) -> float:
    """Resident memory of the server and its child processes (the model process), MiB."""
    import psutil

    process = psutil.Process(server.pid)
    processes = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes) / 2**20


def images_used(args) -> str:
    """How the report names the images sent."""
    return f"images from {args.images}" if args.images else "PNG digits from assets/samples/"


def check_answer(response, classes: list[str] | None, topk: int) -> str | None:
    """None when the answer is a 200 with the documented schema, else what is wrong."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    body = response.json()
    if set(body) != {"classes", "threshold", "predictions"}:
        return f"unexpected keys {sorted(body)}"
    if classes is not None and body["classes"] != classes:
        return "classes differ from /metadata"
    if len(body["predictions"]) != 1:
        return f"{len(body['predictions'])} predictions for one image"
    [p] = body["predictions"]
    if set(p) != PREDICTION_KEYS or p["error"] is not None:
        return f"bad prediction {p}"
    if p["predicted"] not in body["classes"] or len(p["topk"]) != min(topk, len(body["classes"])):
        return f"bad prediction {p}"
    if not 0.0 <= p["probability"] <= 1.0:
        return f"probability {p['probability']} out of [0, 1]"
    return None


BOUNDARY = "load-py-boundary-7f3a"


def multipart_body(name: str, data: bytes) -> bytes:
    """One image as the multipart form field `files` (what a browser or curl -F sends)."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"'
            "\r\nContent-Type: image/png\r\n\r\n")  # fmt: skip
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Answer:
    """What check_answer reads of a response (httpx.Response has the same three)."""

    status_code: int
    content: bytes
    closed: bool = False  # the server closes the connection after this answer

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs prebuilt bodies and reads each answer
    by its Content-Length. The load generator shares the server's two cores, so it must
    cost as little CPU as it can: httpx spends several times more a request than this."""

    def __init__(self, url: str, timeout: float):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host, self.buffer = f"{host}:{port}", b""

    def post(self, path: str, body: bytes) -> Answer:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n")  # fmt: skip
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        header, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(fields.get("content-length", 0))
        while len(self.buffer) < length:
            self.buffer += self._recv()
        content, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(status, content, closed=fields.get("connection") == "close")

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        """Closes the socket; returns None (so `client = client.close()` forgets it)."""
        self.sock.close()


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    seconds: float  # wall time of the whole run
    latencies_ms: list[float] = field(default_factory=list)  # successful requests only
    errors: list[str] = field(default_factory=list)
    answers: list[dict | None] = field(default_factory=list)  # per request, in send order

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentiles(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
        p50, p95, p99 = np.percentile(self.latencies_ms, [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def run_load(
    url: str,
    images: list[tuple[str, bytes]],
    *,
    requests: int,
    concurrency: int,
    topk: int = 5,
    classes: list[str] | None = None,
    timeout: float = 60.0,
) -> LoadResult:
    """`requests` one-image POSTs from `concurrency` threads (request i sends image i mod
    len(images)); errors are counted, never raised."""
    answers: list[dict | None] = [None] * requests
    latencies: list[float | None] = [None] * requests
    errors: list[str] = []
    lock = threading.Lock()

    bodies = [multipart_body(name, data) for name, data in images]

    def worker(first: int) -> None:
        client = None
        with contextlib.suppress(OSError):  # not up: the first request reconnects, and counts
            client = Connection(url, timeout)
        start_line.wait()
        for i in range(first, requests, concurrency):
            name = images[i % len(images)][0]
            try:
                start = time.perf_counter()
                client = client or Connection(url, timeout)
                response = client.post(f"/predict?topk={topk}", bodies[i % len(images)])
                if response.closed:
                    client = client.close()
                problem = check_answer(response, classes, topk)
                elapsed = (time.perf_counter() - start) * 1e3
            except Exception as err:  # a load test counts every failure, never stops
                problem = f"{type(err).__name__}: {err}"
                client = client and client.close()  # a broken connection is replaced
            if problem is None:
                answers[i], latencies[i] = response.json()["predictions"][0], elapsed
            else:
                with lock:
                    errors.append(f"request {i} ({name}): {problem}")
        if client:
            client.close()

    # Every client connects first; the clock starts when all of them (and this thread) are ready.
    threads = [
        threading.Thread(target=worker, args=(w,), daemon=True)
        for w in range(min(concurrency, requests))
    ]
    start_line = threading.Barrier(len(threads) + 1)
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return LoadResult(
        requests=requests,
        concurrency=len(threads),
        seconds=seconds,
        latencies_ms=[x for x in latencies if x is not None],
        errors=errors,
        answers=answers,
    )


def report(args, argv, info: dict, result: LoadResult, rss: dict[str, float], warmup) -> str:
    command = " ".join(
        ["python", "benchmarks/load.py", *(argv if argv is not None else sys.argv[1:])]
    )
    import torch

    q = result.percentiles()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Load test of the REST API",
        "",
        f"`{command}`",
        "",
        f"Model: `{args.model_path}`, {info['num_parameters'] / 1e6:.2f} M parameters, "
        f"{info['image_size']} px input, {info['num_classes']} classes. "
        f"{result.requests} one-image POST /predict requests ({images_used(args)}) "
        f"from {result.concurrency} concurrent keep-alive clients (threads) to "
        f"`source/serve.py --threads {args.threads}` under uvicorn on the loopback, after "
        f"{warmup} warm-up requests at the same concurrency; latency from send to parsed JSON.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared by the server and "
        f"the clients, torch {torch.__version__}; load average at the end {load} (other jobs "
        "share these cores, so the numbers are noisy).",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| requests / errors | {result.requests} / {len(result.errors)} |",
        f"| latency p50 / p95 / p99 | {q['p50']:.1f} / {q['p95']:.1f} / {q['p99']:.1f} ms |",
        f"| throughput | {result.throughput:.0f} requests/s ({result.seconds:.1f} s in all) |",
        f"| server RSS at start / after warm-up / at the end | {rss['start']:.0f} / "
        f"{rss['warm']:.0f} / {rss['end']:.0f} MiB |",
        f"| RSS growth over the run (after warm-up to end) | {rss['end'] - rss['warm']:+.1f} MiB |",
        "",
    ]
    if result.errors:
        lines += ["First errors:", "", *[f"- {e}" for e in result.errors[:10]], ""]
    return "\n".join(lines)


# ---- --sweep: concurrency x backend x batching, and the no-model ceiling --------------------

LEVELS = (1, 4, 16, 64)
ROUNDS = 4  # each level's requests are sent in rounds that alternate between configurations
# (label, serve.py environment, serve.py options, the model file's suffix): the backends with
# batching (serve.py's defaults) and without (--max-batch 1), and the ceiling: the forward
# pass replaced by a constant answer (SERVE_NO_MODEL=1), so what is left is HTTP, multipart,
# decoding, preprocessing and JSON. "torchscript" serves export.py --format torchscript's
# .pt file (the same model traced: no Python between its operators).
SWEEP = {  # --configs name -> (label, serve.py environment, options, model file suffix)
    "torch": ("torch, batched", {"PREDICT_BACKEND": "torch"}, (), ".pth"),
    "torch-1": ("torch, unbatched", {"PREDICT_BACKEND": "torch"}, ("--max-batch", "1"), ".pth"),
    "torchscript": ("torchscript, batched", {}, (), ".pt"),
    "torchscript-1": ("torchscript, unbatched", {}, ("--max-batch", "1"), ".pt"),
    "onnx": ("onnx, batched", {"PREDICT_BACKEND": "onnx"}, (), ".pth"),
    "onnx-1": ("onnx, unbatched", {"PREDICT_BACKEND": "onnx"}, ("--max-batch", "1"), ".pth"),
    "ceiling": ("no-model ceiling", {"PREDICT_BACKEND": "torch", "SERVE_NO_MODEL": "1"}, (), ".pth"),
    # The same two with the forward passes in a thread of the server (--worker thread).
    "torch-thread": ("torch, batched, one process", {"PREDICT_BACKEND": "torch"},
                     ("--worker", "thread"), ".pth"),
    "ceiling-thread": ("no-model ceiling, one process",
                       {"PREDICT_BACKEND": "torch", "SERVE_NO_MODEL": "1"}, ("--worker", "thread"),
                       ".pth"),
}  # fmt: skip
EXPORTS = {".onnx": "onnx", ".pt": "torchscript"}


def ensure_exports(model_path: Path, configs: list[str]) -> None:
    """model.onnx and model.pt beside the checkpoint when `configs` need them, exported (and
    verified) by export.py when missing."""
    needed = {".onnx" if "onnx" in name else SWEEP[name][3] for name in configs}
    for suffix, fmt in EXPORTS.items():
        if suffix in needed and not model_path.with_suffix(suffix).is_file():
            command = [sys.executable, str(ROOT / "source" / "export.py"), "--model-path",
                       str(model_path), "--format", fmt]  # fmt: skip
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def merged(results: list[LoadResult]) -> LoadResult:
    """Rounds of one configuration at one level as one result."""
    return LoadResult(
        requests=sum(r.requests for r in results),
        concurrency=results[0].concurrency,
        seconds=sum(r.seconds for r in results),
        latencies_ms=[x for r in results for x in r.latencies_ms],
        errors=[e for r in results for e in r.errors],
    )


def sweep_servers(args, images) -> list[dict]:
    """Every SWEEP configuration started at once; then, level by level, the level's requests
    sent in ROUNDS rounds that take the configurations in turn, so the rows compared at one
    level are measured over the same minutes: a row per configuration and level, with the
    configuration's RSS growth from after its first warm-up to the end."""
    import httpx

    servers = {}

    def start(config) -> None:
        label, env, extra, suffix = config
        path = Path(args.model_path).with_suffix(suffix)
        process, url = start_server(path, threads=args.threads, extra=extra, env=env)
        classes = httpx.get(f"{url}/metadata", timeout=30).json()["classes"]
        servers[label] = {"process": process, "url": url, "classes": classes, "served": 0}

    try:
        configs = [SWEEP[name] for name in args.configs]
        with ThreadPoolExecutor(len(configs)) as pool:  # they start side by side
            list(pool.map(start, configs))
        servers = {label: servers[label] for label, *_ in configs}
        rows = []
        for i, level in enumerate(args.levels):
            results = {label: [] for label in servers}
            for server in servers.values():
                if args.warmup:
                    run_load(server["url"], images, requests=args.warmup, concurrency=level)
                if i == 0:
                    server["rss_warm"] = server_rss_mb(server["process"])
            for part in range(ROUNDS):
                count = args.requests // ROUNDS + (part < args.requests % ROUNDS)
                for label, server in servers.items():
                    results[label].append(run_load(
                        server["url"], images, requests=count, concurrency=min(level, count),
                        topk=args.topk, classes=server["classes"]))  # fmt: skip
            for label, server in servers.items():
                server["served"] += args.requests + (args.warmup if i else 0)
                result = merged(results[label])
                q = result.percentiles()
                rows.append({"config": label, "concurrency": level, "requests": args.requests,
                             "errors": len(result.errors), "first_error": result.errors[:1],
                             "throughput": result.throughput, "p50": q["p50"], "p99": q["p99"]})  # fmt: skip
        for label, server in servers.items():
            growth = server_rss_mb(server["process"]) - server["rss_warm"]
            for row in rows:
                if row["config"] == label:
                    row["rss_growth_mb"], row["rss_requests"] = growth, server["served"]
    finally:
        for server in servers.values():
            stop_server(server["process"])
    return rows


def sweep_targets(rows: list[dict]) -> list[str]:
    """Issue 28's targets, judged on the rows (each against rows of the same run)."""
    cell = {(r["config"], r["concurrency"]): r for r in rows}
    lines = []

    def judge(text: str, ok: bool) -> None:
        lines.append(f"- {text}: **{'met' if ok else 'missed'}**")

    ceiling = cell.get(("no-model ceiling", 16))
    for backend in ("torch", "torchscript"):
        batched = cell.get((f"{backend}, batched", 16))
        unbatched = cell.get((f"{backend}, unbatched", 16))
        if batched and unbatched and ceiling:
            ratio = batched["throughput"] / unbatched["throughput"]
            most = ceiling["throughput"] / unbatched["throughput"]
            judge(f"16 clients, batched {backend} >= 2.5x unbatched: {ratio:.2f}x (the "
                  f"no-model ceiling itself is {most:.2f}x unbatched)", ratio >= 2.5)  # fmt: skip
            share = batched["throughput"] / ceiling["throughput"]
            judge(f"16 clients, batched {backend} >= 70% of the no-model ceiling: "
                  f"{100 * share:.0f}% ({batched['throughput']:.0f} of "
                  f"{ceiling['throughput']:.0f} requests/s)", share >= 0.7)  # fmt: skip
            judge(f"16 clients, batched {backend} p99 <= 100 ms: {batched['p99']:.1f} ms",
                  batched["p99"] <= 100)  # fmt: skip
        one = cell.get((f"{backend}, batched", 1))
        one_unbatched = cell.get((f"{backend}, unbatched", 1))
        if one and one_unbatched:
            ratio = one["p50"] / one_unbatched["p50"]
            judge(f"1 client, batched {backend} p50 within 10% of unbatched: {one['p50']:.1f} "
                  f"ms against {one_unbatched['p50']:.1f} ms ({ratio:.2f}x)", ratio <= 1.1)  # fmt: skip
    alone, alone_ceiling = (cell.get((f"{name}, one process", 16))
                            for name in ("torch, batched", "no-model ceiling"))  # fmt: skip
    batched = cell.get(("torch, batched", 16))
    if alone and alone_ceiling and batched:
        lines.append(
            f"- For comparison, the forward passes in a thread of the server (`--worker "
            f"thread`), 16 clients: batched torch {alone['throughput']:.0f} requests/s against "
            f"{batched['throughput']:.0f} with the model process "
            f"({batched['throughput'] / alone['throughput']:.2f}x); "
            f"{100 * alone['throughput'] / alone_ceiling['throughput']:.0f}% of its own ceiling "
            f"({alone_ceiling['throughput']:.0f} requests/s)"
        )
    errors = sum(r["errors"] for r in rows)
    judge(f"0 errors: {errors} in {sum(r['requests'] for r in rows)} requests", errors == 0)
    return lines


def sweep_table(rows: list[dict]) -> list[str]:
    lines = ["| configuration | clients | requests/s | p50 ms | p99 ms | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['config']} | {r['concurrency']} | {r['throughput']:.0f} | "
                     f"{r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")  # fmt: skip
    return lines


def sweep_plot(rows: list[dict], path: Path) -> None:
    """Throughput, and p50 (solid) / p99 (dashed) latency, against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    levels = sorted({r["concurrency"] for r in rows})
    for label, *_ in SWEEP.values():
        mine = [r for r in rows if r["config"] == label]
        if not mine:
            continue
        x = [r["concurrency"] for r in mine]
        left.plot(x, [r["throughput"] for r in mine], marker="o", label=label)
        (line,) = right.plot(x, [r["p50"] for r in mine], marker="o", label=f"{label} p50")
        right.plot(x, [r["p99"] for r in mine], ls="--", color=line.get_color())
    for ax, ylabel in ((left, "requests / s"), (right, "latency ms (p50 solid, p99 dashed)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(args, argv) -> int:
    """--sweep: every SWEEP configuration at every --levels concurrency; the markdown table
    to --out and the plot beside it (.png); exit 1 on any error."""
    images = sample_images(args.images)
    model_path = Path(args.model_path)
    ensure_exports(model_path, args.configs)
    rows = sweep_servers(args, images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    sweep_plot(rows, plot)
    command = " ".join(
        ["python", "benchmarks/load.py", *(argv if argv is not None else sys.argv[1:])]
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    growth = {r["config"]: (r["rss_growth_mb"], r["rss_requests"]) for r in rows}
    lines = [
        "# Serving sweep: concurrency, backend, batching", "", f"`{command}`", "",
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores shared "
        f"by the server and the clients (load average at the end {load}). Model "
        f"`{args.model_path}`; {args.requests} one-image POST /predict requests per row "
        f"({images_used(args)}) after "
        f"{args.warmup} warm-up requests at the same concurrency; `serve.py --threads "
        f"{args.threads}`; batched = serve.py's defaults (forward passes in the model process), "
        "unbatched = `--max-batch 1`, one process = `--worker thread`; the "
        "ceiling replaces the forward pass by a constant answer (SERVE_NO_MODEL=1); torchscript "
        "serves `export.py --format torchscript`'s .pt file. All servers run at once; each "
        f"level's requests are sent in {ROUNDS} rounds that take the servers in turn.", "",
        *sweep_table(rows), "", "Issue 28's targets, from this table:", "",
        *sweep_targets(rows), "",
        "Server RSS growth, the server process and its model process together (after the first "
        "warm-up to the end of the configuration):", "",
        *[f"- {c}: {g:+.1f} MiB over {n} requests" for c, (g, n) in growth.items()], "",
        f"![throughput and latency against concurrency]({plot.name})", "",
    ]  # fmt: skip
    errors = [e for r in rows for e in r["first_error"]]
    if errors:
        lines += ["First errors:", "", *[f"- {e}" for e in errors[:10]], ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {out} and {plot}")
    return 1 if errors or any(r["errors"] for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model-path", default="metadata/models/model.pth", help="checkpoint")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--images", type=Path, default=None,
                        help="send the first 64 images under this folder (default: the digits "
                        "in assets/samples/)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=2000, help="timed requests in all")
    parser.add_argument(
        "--warmup", type=int, default=200, help="untimed requests first, at the same concurrency"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="the server's torch threads (serve.py --threads)"
    )
    parser.add_argument("--topk", type=int, default=5, help="classes asked for per image")
    parser.add_argument(
        "--quick", action="store_true", help="small counts: 100 requests after 32 warm-up"
    )
    parser.add_argument(
        "--sweep", action="store_true",
        help="concurrency --levels x (torch, onnx) x (batched, --max-batch 1), and the "
        "no-model ceiling; --requests per row; writes --out (default "
        "docs/benchmarks/serving-sweep.md) and the plot beside it (.png)",
    )  # fmt: skip
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS),
                        help="--sweep's concurrency levels")  # fmt: skip
    parser.add_argument("--configs", nargs="+", choices=list(SWEEP), default=list(SWEEP),
                        help="--sweep's server configurations (NAME-1: --max-batch 1)")  # fmt: skip
    parser.add_argument("--out", default=None, help="report file (default: metadata/results/"
                        "load.md; with --sweep docs/benchmarks/serving-sweep.md)")  # fmt: skip
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.requests, args.warmup = (64, 8) if args.sweep else (100, 32)  # 64: every level
    if args.out is None:
        args.out = "docs/benchmarks/serving-sweep.md" if args.sweep else "metadata/results/load.md"
    if min(args.concurrency, args.requests, args.topk, *args.levels) < 1 or args.warmup < 0:
        print(
            "error: --concurrency, --requests, --topk and --levels must be at least 1 and "
            "--warmup at least 0",
            file=sys.stderr,
        )
        return 2
    if not Path(args.model_path).is_file():
        print(f"error: no model file at {args.model_path}; run `make all` first", file=sys.stderr)
        return 2
    if not sample_images(args.images, limit=1):
        print(f"error: no PNG or JPEG images in {args.images or SAMPLES_DIR}", file=sys.stderr)
        return 2
    if args.sweep:
        return run_sweep(args, argv)
    import httpx

    images = sample_images(args.images)
    server, url = start_server(args.model_path, threads=args.threads)
    try:
        rss = {"start": server_rss_mb(server)}
        info = httpx.get(f"{url}/metadata", timeout=30).json()
        if args.warmup:
            run_load(url, images, requests=args.warmup, concurrency=args.concurrency)
        rss["warm"] = server_rss_mb(server)
        result = run_load(
            url,
            images,
            requests=args.requests,
            concurrency=args.concurrency,
            topk=args.topk,
            classes=info["classes"],
        )
        rss["end"] = server_rss_mb(server)
    finally:
        stop_server(server)
    text = report(args, argv, info, result, rss, args.warmup)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
