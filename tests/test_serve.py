"""The REST API through FastAPI's TestClient: predict, health, metadata, 400s and 413s; the CLI's
errors; and the serving benchmark in --quick mode against a real uvicorn server."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import serve
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from predict import Predictor
from serve import create_app

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "samples" / "digit-3.png"


@pytest.fixture(scope="module")
def client(smoke_model):
    with TestClient(create_app(smoke_model, device="cpu")) as c:  # runs the lifespan
        yield c


@pytest.fixture(scope="module")
def predictor(smoke_model) -> Predictor:
    return Predictor(smoke_model, device="cpu")


def png(colour=(200, 30, 90), size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_one_image(client, predictor):
    data = SAMPLE.read_bytes()
    response = client.post("/predict?topk=3", files={"files": ("digit-3.png", data, "image/png")})
    assert response.status_code == 200
    body = response.json()
    [expected] = predictor.predict(data, topk=3)
    assert body["classes"] == predictor.classes
    [p] = body["predictions"]
    assert p["source"] == "digit-3.png" and p["error"] is None
    assert p["predicted"] == expected.predicted
    assert p["probability"] == pytest.approx(expected.probability)
    assert [t["class"] for t in p["topk"]] == [c for c, _ in expected.topk]
    assert [t["probability"] for t in p["topk"]] == pytest.approx([q for _, q in expected.topk])


def test_predict_several_images_with_one_bad(client, predictor):
    files = [
        ("files", ("red.png", png(), "image/png")),
        ("files", ("notes.png", b"plain text", "image/png")),
        ("files", ("blue.png", png((10, 20, 250)), "image/png")),
    ]
    response = client.post("/predict", files=files)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["source"] for p in predictions] == ["red.png", "notes.png", "blue.png"]
    assert predictions[1]["error"] == "not an image file (or an unsupported format)"
    assert predictions[1]["topk"] == [] and predictions[1]["predicted"] is None
    expected = predictor.predict([png(), png((10, 20, 250))])
    assert [predictions[0]["predicted"], predictions[2]["predicted"]] == [
        e.predicted for e in expected
    ]
    assert all(len(p["topk"]) == 5 for p in (predictions[0], predictions[2]))


def test_health(client, smoke_model):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model_path": str(smoke_model)}


def test_metadata_comes_from_the_checkpoint(client, smoke_model):
    ckpt = load_checkpoint(smoke_model)
    body = client.get("/metadata").json()
    assert body["api_version"] == serve.API_VERSION
    assert body["classes"] == ckpt["classes"] and body["num_classes"] == 10
    assert body["image_size"] == ckpt["preprocessing"]["image_size"]
    assert body["metrics"] == json.loads(json.dumps(ckpt["metrics"]))
    assert body["provenance"]["git_commit"] == ckpt["provenance"]["git_commit"]
    assert body["provenance"]["created"] == ckpt["provenance"]["created"]
    assert body["threshold"] is None and body["num_parameters"] > 0


@pytest.mark.parametrize(
    ("files", "query", "message"),
    [
        ([("files", ("notes.txt", b"hello", "text/plain"))], "",
         "notes.txt: not an image file (or an unsupported format)"),
        ([("files", ("empty.png", b"", "image/png"))], "", "empty.png: the file is empty (0 bytes)"),
        ([("image", ("a.png", png(), "image/png"))], "",
         "no image uploaded; send images as multipart form field 'files'"),
        ([("files", ("a.png", png(), "image/png"))], "?topk=0",
         "query.topk: Input should be greater than or equal to 1"),
        ([("files", ("a.png", png(), "image/png"))], "?topk=many",
         "query.topk: Input should be a valid integer"),
    ],
)  # fmt: skip
def test_bad_requests_get_400_naming_the_problem(client, files, query, message):
    response = client.post(f"/predict{query}", files=files)
    assert response.status_code == 400
    assert message in response.json()["detail"]


def test_a_body_over_the_limit_gets_413(smoke_model):
    app = create_app(smoke_model, max_upload_bytes=20_000, device="cpu")
    with TestClient(app) as c:
        small = c.post("/predict", files={"files": ("a.png", png(), "image/png")})
        assert small.status_code == 200
        big = c.post("/predict", files={"files": ("big.png", b"\0" * 30_000, "image/png")})
        assert big.status_code == 413
        assert big.json()["detail"].startswith("request body over the 0.02 MB limit")

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(10):
                yield b"x" * 5_000

        streamed = c.post(
            "/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert streamed.status_code == 413


def test_the_limit_comes_from_the_environment(monkeypatch, smoke_model):
    monkeypatch.setenv("MAX_UPLOAD_MB", "0.01")
    with TestClient(create_app(smoke_model, device="cpu")) as c:
        response = c.post("/predict", files={"files": ("a.png", b"\0" * 20_000, "image/png")})
        assert response.status_code == 413


def test_model_path_from_the_environment(monkeypatch, smoke_model):
    monkeypatch.setenv("MODEL_PATH", str(smoke_model))
    with TestClient(create_app(device="cpu")) as c:
        assert c.get("/health").json()["model_path"] == str(smoke_model)


def test_a_bad_model_fails_at_start_up(tmp_path):
    broken = tmp_path / "model.pth"
    broken.write_bytes(b"not a checkpoint")
    app = create_app(broken, device="cpu")  # nothing is loaded before start-up
    with (
        pytest.raises(CheckpointError, match=r"model\.pth is not a .*checkpoint"),
        TestClient(app),
    ):
        pass


def test_cli_refuses_a_missing_model(tmp_path, capsys):
    assert serve.main(["--model-path", str(tmp_path / "none.pth")]) == 2
    assert "no model file at" in capsys.readouterr().err


def test_model_uri_is_resolved_through_the_registry(tmp_path, monkeypatch, capsys):
    """MODEL_URI=models:/NAME@alias is fetched from MLflow; a registry without that model is
    one line naming the URI and the fix, exit 2."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.setenv("MODEL_URI", "models:/no-such-model@candidate")
    assert serve.main([]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1  # (MLflow itself logs INFO lines as it creates the empty store)
    assert errors[0].startswith("error: cannot download models:/no-such-model@candidate from")
    assert errors[0].endswith(
        "check the model name and alias (or version), and MLFLOW_TRACKING_URI"
    )


def test_model_uri_wins_over_model_path(monkeypatch):
    import cli

    monkeypatch.setenv("MODEL_PATH", "a.pth")
    assert cli.default_model_path() == "a.pth"
    monkeypatch.setenv("MODEL_URI", "models:/vit@candidate")
    assert cli.default_model_path() == "models:/vit@candidate"


@pytest.mark.slow
def test_serving_benchmark_quick(smoke_model, tmp_path):
    import serving

    out = tmp_path / "serving.md"
    assert serving.main(["--quick", "--model-path", str(smoke_model), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Serving benchmark")
    assert "| API one image, p50 (target < 20 ms) |" in text
    assert "| Predictor, batches of 32 |" in text
    assert "images/s" in text and "x (" in text


# ---- the documentation pages and the OpenAPI schema ---------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_this_server(client, page):
    """Offline and air-gapped: every script, stylesheet and image the page names is local and
    answers; no CDN (jsdelivr), no Google Fonts."""
    import re

    response = client.get(page)
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    html = response.text
    urls = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
    urls += re.findall(r"""url\s*:\s*["']([^"']+)["']""", html)  # Swagger UI's openapi url
    assert urls, html
    assert not [u for u in urls if "//" in u], urls  # no absolute URL to another host
    assert "cdn.jsdelivr" not in html and "fonts.googleapis" not in html
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"] and len(asset.content) > 100_000
        if url.endswith(".css"):
            assert "text/css" in asset.headers["content-type"]


def test_openapi_schema_shows_the_response_fields(client):
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]

    def response_schema(path, method, code="200"):
        content = schema["paths"][path][method]["responses"][code]["content"]
        ref = content["application/json"]["schema"]["$ref"]
        return components[ref.rsplit("/", 1)[-1]]

    predict = response_schema("/predict", "post")
    assert set(predict["properties"]) == {"classes", "threshold", "predictions"}
    item = components["ImagePrediction"]
    assert set(item["properties"]) == {"source", "predicted", "probability", "topk", "error"}
    assert set(components["ClassProbability"]["properties"]) == {"class", "probability"}
    assert set(response_schema("/health", "get")["properties"]) == {"status", "model_path"}
    meta = response_schema("/metadata", "get")["properties"]
    assert {"api_version", "classes", "image_size", "num_parameters", "metrics"} <= set(meta)
    assert meta["image_size"]["type"] == "integer"


def test_documented_error_codes_are_the_ones_the_api_answers(client):
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/predict"]["post"]["responses"]
    assert set(responses) == {"200", "400", "413", "500", "503"}  # 503: the queue bound, below
    assert "422" not in json.dumps(schema) and "HTTPValidationError" not in json.dumps(schema)
    problem = responses["400"]["content"]["application/json"]["schema"]["$ref"]
    assert problem.endswith("/Problem")
    # what the schema promises is what comes back
    bad = client.post("/predict?topk=0", files={"files": ("a.png", png(), "image/png")})
    assert bad.status_code == 400 and set(bad.json()) == {"detail"}
    for path in ("/health", "/metadata"):
        assert set(schema["paths"][path]["get"]["responses"]) == {"200"}


# ---- batching (batching.py), the queue bound and /metrics -------------------------------------


def metric_samples(text: str) -> dict:
    """Prometheus text -> {(sample name, sorted label items): value}, via prometheus-client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def batch_requests() -> list[list[tuple[str, bytes]]]:
    """Requests of one image, several, a mix of readable and unreadable, and none readable."""
    samples = sorted((SAMPLE.parent).glob("*.png"))
    requests = [[(p.name, p.read_bytes())] for p in samples]
    requests += [[(f"c{i}.png", png((40 * i, 90, 255 - 30 * i), (12 + i, 20)))] for i in range(6)]
    requests += [
        [
            ("a.png", png()),
            ("bad.png", b"not an image"),
            (samples[0].name, samples[0].read_bytes()),
        ],
        [(p.name, p.read_bytes()) for p in samples[:4]],
        [("empty.png", b""), ("text.png", b"hello")],
    ]
    return requests * 2


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_batched_answers_equal_unbatched_through_a_real_server(smoke_model, predictor, worker):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from load import start_server, stop_server

    requests = batch_requests()
    extra = ["--max-batch", "16", "--max-wait-ms", "50", "--worker", worker]
    server, url = start_server(str(smoke_model), extra=extra)
    try:

        def send(files):
            body = [("files", (name, data, "image/png")) for name, data in files]
            return httpx.post(f"{url}/predict?topk=3", files=body, timeout=120)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(send, requests))
        metrics = metric_samples(httpx.get(f"{url}/metrics", timeout=30).text)
    finally:
        stop_server(server)

    for files, response in zip(requests, responses, strict=True):
        alone = predictor.predict(files, topk=3)
        if all(not p.ok for p in alone):
            assert response.status_code == 400
            continue
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        assert [g["source"] for g in got] == [p.source for p in alone]
        for g, p in zip(got, alone, strict=True):
            assert (g["predicted"], g["error"]) == (p.predicted, p.error)
            assert [t["class"] for t in g["topk"]] == [c for c, _ in p.topk]
            np.testing.assert_allclose(
                [t["probability"] for t in g["topk"]], [q for _, q in p.topk], atol=1e-5
            )
    answered = sum(r.status_code == 200 for r in responses)
    assert (
        metrics[("vit_requests_total", (("endpoint", "/predict"), ("status", "200")))] == answered
    )
    assert metrics[("vit_requests_total", (("endpoint", "/predict"), ("status", "400")))] == 2
    passes = metrics[("vit_batch_size_count", ())]
    images = metrics[("vit_batch_size_sum", ())]
    assert images == sum(p.ok for files in requests for p in predictor.predict(files))
    assert passes < answered  # requests shared forward passes


@pytest.mark.parametrize("inline_bytes", [0, 10**9], ids=["thread pool", "model worker"])
def test_both_decoding_paths_answer_like_the_predictor(smoke_model, predictor, monkeypatch,
                                                       inline_bytes):  # fmt: skip
    """Uploads up to serve.INLINE_DECODE_BYTES are decoded by the model worker, larger ones
    in the thread pool: either way, each request gets Predictor.predict's answer."""
    import serve

    monkeypatch.setattr(serve, "INLINE_DECODE_BYTES", inline_bytes)
    calls = {"submit": 0, "predict": 0}
    with TestClient(create_app(smoke_model, device="cpu")) as c:
        batcher = c.app.state.batcher
        for name in calls:
            real = getattr(batcher, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(batcher, name, counted)
        for files in batch_requests()[-3:]:
            body = [("files", (name, data, "image/png")) for name, data in files]
            response = c.post("/predict?topk=3", files=body)
            alone = predictor.predict(files, topk=3)
            if all(not p.ok for p in alone):
                assert response.status_code == 400
                continue
            got = response.json()["predictions"]
            assert [(g["source"], g["predicted"], g["error"]) for g in got] == [
                (p.source, p.predicted, p.error) for p in alone
            ]
    # the thread-pool path's predict decodes, then hands the prepared batch to submit
    assert calls == (
        {"submit": 2, "predict": 3} if inline_bytes == 0 else {"submit": 3, "predict": 0}
    )


def test_a_cancelled_request_is_dropped_and_its_batch_still_answered(predictor):
    """A Future cancelled while queued (an asyncio caller that gave up) is skipped by the
    worker; the requests batched with it get their answers; stop cancels what is left."""
    import threading

    from batching import Batcher

    batcher = Batcher(predictor, max_batch=8, max_wait_ms=0)
    entered, release = threading.Event(), threading.Event()
    real_logits, sizes = predictor.logits, []

    def held(batch):
        sizes.append(len(batch))
        entered.set()
        assert release.wait(60)
        return real_logits(batch)

    predictor.logits = held
    try:
        batcher.start()
        first = batcher.submit([("a.png", png())])
        assert entered.wait(60)  # the worker is inside the first forward pass
        queued = [batcher.submit([(f"{i}.png", png((30 * i, 0, 0)))], topk=2) for i in range(3)]
        assert queued[1].cancel()
        release.set()
        answers = [first.result(60), queued[0].result(60), queued[2].result(60)]
    finally:
        predictor.logits = real_logits
        batcher.stop()
    assert sizes == [1, 2]  # the cancelled request never reached the model
    expected = predictor.predict([("0.png", png((0, 0, 0)))], topk=2)[0]
    assert [c for c, _ in answers[1][0].topk] == [c for c, _ in expected.topk]
    np.testing.assert_allclose([q for _, q in answers[1][0].topk], [q for _, q in expected.topk],
                               atol=1e-5)  # fmt: skip
    assert [a[0].source for a in answers] == ["a.png", "0.png", "2.png"]

    stopped = Batcher(predictor)  # never started: stop cancels what was queued
    late = stopped.submit([("late.png", png())])
    stopped.running = False
    stopped.work()
    assert late.cancelled()


def test_a_full_queue_answers_503_with_retry_after(smoke_model):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(smoke_model, device="cpu", max_batch=1, max_queue=2)
    with TestClient(app) as c:
        batcher = app.state.batcher
        entered, release = threading.Event(), threading.Event()
        real_logits = app.state.predictor.logits

        def held(batch):
            entered.set()
            assert release.wait(60)
            return real_logits(batch)

        app.state.predictor.logits = held  # the worker blocks inside its forward pass

        def send():
            return c.post("/predict", files={"files": ("a.png", png(), "image/png")})

        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(send)
            assert entered.wait(60)
            waiting = [pool.submit(send), pool.submit(send)]
            deadline = time.monotonic() + 60
            while batcher.depth < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert batcher.depth == 2
            refused = send()
            release.set()
            answers = [first.result(), *(w.result() for w in waiting)]
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "already waiting for the model" in refused.json()["detail"]
        assert [a.status_code for a in answers] == [200, 200, 200]
        metrics = metric_samples(c.get("/metrics").text)
    assert metrics[("vit_requests_total", (("endpoint", "/predict"), ("status", "503")))] == 1
    assert metrics[("vit_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 3


def test_metrics_describe_the_model_and_count_what_was_sent(smoke_model):
    with TestClient(create_app(smoke_model, device="cpu")) as c:
        for _ in range(3):
            c.post("/predict", files={"files": ("a.png", png(), "image/png")})
        c.post("/predict", files={"files": ("t.txt", b"text", "text/plain")})
        c.get("/health")
        response = c.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    metrics = metric_samples(response.text)
    ckpt = load_checkpoint(smoke_model)
    assert metrics[("vit_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 3
    assert metrics[("vit_requests_total", (("endpoint", "/predict"), ("status", "400")))] == 1
    assert metrics[("vit_requests_total", (("endpoint", "/health"), ("status", "200")))] == 1
    assert metrics[("vit_request_latency_seconds_count", (("endpoint", "/predict"),))] == 4
    assert metrics[("vit_batch_size_count", ())] == 3 and metrics[("vit_batch_size_sum", ())] == 3
    assert metrics[("vit_queue_depth", ())] == 0
    [info] = [labels for (name, labels) in metrics if name == "vit_model_info"]
    info = dict(info)
    assert info["model_path"] == str(smoke_model)
    assert info["created"] == str(ckpt["provenance"]["created"]) and info["backend"] == "torch"


# ---- hostile clients and models (issue 26) -----------------------------------------------------


def test_every_error_answer_is_json(smoke_model, monkeypatch):
    """404, 405, 413 and a 500 from an unexpected exception: {"detail": ...}, never text."""
    app = create_app(smoke_model, max_upload_bytes=20_000, device="cpu")
    with TestClient(app, raise_server_exceptions=False) as c:

        def broken(*args, **kwargs):
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(app.state.batcher, "predict", broken)
        monkeypatch.setattr(app.state.batcher, "submit", broken)
        answers = {
            404: c.get("/no/such/page"),
            405: c.get("/predict"),
            413: c.post("/predict", files={"files": ("big.png", b"\0" * 30_000)}),
            500: c.post("/predict", files={"files": ("a.png", png(), "image/png")}),
        }
    for status, response in answers.items():
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json", status
        assert set(response.json()) == {"detail"} and response.json()["detail"], status
    assert "a bug" not in answers[500].text  # the log has it, not the client


@pytest.fixture(scope="module")
def nan_model(smoke_model, tmp_path_factory) -> Path:
    ckpt = load_checkpoint(smoke_model)
    name = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][name] = ckpt["state_dict"][name].clone().fill_(float("nan"))
    path = tmp_path_factory.mktemp("nan") / "model.pth"
    save_checkpoint(ckpt, path)
    return path


def test_a_model_with_nan_weights_is_refused_at_start(nan_model, capsys):
    assert serve.main(["--model-path", str(nan_model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot serve {nan_model}: ") and "\n" not in err
    with pytest.raises(CheckpointError), TestClient(create_app(nan_model, device="cpu")):
        pass


def test_slow_and_malformed_clients_are_answered_or_closed(smoke_model):
    """A client sending a header byte at a time is disconnected at --header-timeout; a
    malformed request gets uvicorn's 400 as JSON; a good client is served meanwhile."""
    import httpx

    from load import start_server, stop_server

    server, url = start_server(str(smoke_model), extra=["--header-timeout", "1.5"])
    try:
        host, port = url.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)), timeout=10)
        start, closed = time.monotonic(), False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                slow.sendall(bytes([byte]))
                time.sleep(0.25)
            except OSError:  # reset: closed by the server
                closed = True
                break
            if time.monotonic() - start > 6:
                break
        if not closed:
            slow.settimeout(1)
            closed = slow.recv(1024) == b""
        assert closed and time.monotonic() - start < 6
        slow.close()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        with socket.create_connection((host, int(port)), timeout=10) as bad:
            bad.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer = b""
            while chunk := bad.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
        assert json.loads(body)["detail"].startswith("malformed HTTP request")
    finally:
        stop_server(server)
