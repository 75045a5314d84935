"""Bounded load tests (issue 9): the REST API under 16 concurrent clients against a real
uvicorn server (no errors, the right answers, flat memory), benchmarks/load.py in --quick
mode, and several Streamlit sessions at once sharing one cached model."""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_app import APP, predictions_shown

from predict import Predictor

SAMPLES = Path(__file__).resolve().parents[1] / "assets" / "samples"
CONCURRENCY = 16
REQUESTS = 200
RSS_MARGIN_MB = 50  # allocator noise; a leak of even 0.25 MB a request would show


@pytest.fixture(scope="module")
def server(smoke_model):
    """(process, URL) of `source/serve.py` on a free loopback port; always stopped."""
    import load

    process, url = load.start_server(str(smoke_model), threads=1)
    try:
        yield process, url
    finally:
        load.stop_server(process)
    assert process.poll() is not None


@pytest.mark.slow
def test_16_concurrent_clients_no_errors_and_flat_memory(server, smoke_model):
    import load

    process, url = server
    images = load.sample_images()
    assert len(images) == 6
    predictor = Predictor(smoke_model, device="cpu")
    expected = {name: p for (name, _), p in zip(images, predictor.predict(images), strict=True)}

    warm = load.run_load(url, images, requests=64, concurrency=CONCURRENCY)
    assert warm.errors == []
    rss_warm = load.server_rss_mb(process)
    result = load.run_load(
        url, images, requests=REQUESTS, concurrency=CONCURRENCY, classes=predictor.classes
    )
    rss_end = load.server_rss_mb(process)

    assert result.errors == [] and result.concurrency == CONCURRENCY
    assert len(result.latencies_ms) == REQUESTS and all(a is not None for a in result.answers)
    for i, answer in enumerate(result.answers):  # the right answer for every request
        name = images[i % len(images)][0]
        assert answer["source"] == name
        assert answer["predicted"] == expected[name].predicted
        assert answer["probability"] == pytest.approx(expected[name].probability, abs=1e-6)
        assert [t["class"] for t in answer["topk"]] == [c for c, _ in expected[name].topk]
    q = result.percentiles()
    assert 0 < q["p50"] <= q["p95"] <= q["p99"] <= max(result.latencies_ms)
    assert math.isfinite(result.throughput) and result.throughput > 0
    print(
        f"\n{REQUESTS} requests, {CONCURRENCY} clients: p50 {q['p50']:.1f} ms, p95 "
        f"{q['p95']:.1f} ms, p99 {q['p99']:.1f} ms, {result.throughput:.0f} requests/s; "
        f"server RSS {rss_warm:.0f} -> {rss_end:.0f} MiB"
    )
    assert rss_end - rss_warm < RSS_MARGIN_MB
    assert process.poll() is None  # still serving


def test_check_answer_flags_what_is_wrong():
    import httpx

    import load

    def answer(status=200, **prediction):
        entry = {"source": "a.png", "predicted": "3", "probability": 0.9, "error": None}
        entry["topk"] = [{"class": "3", "probability": 0.9}] * 5
        body = {"classes": [str(i) for i in range(10)], "threshold": None}
        return httpx.Response(status, json={**body, "predictions": [{**entry, **prediction}]})

    assert load.check_answer(answer(), None, 5) is None
    assert load.check_answer(answer(500), None, 5).startswith("status 500")
    assert load.check_answer(answer(predicted="cat"), None, 5).startswith("bad prediction")
    assert load.check_answer(answer(error="boom"), None, 5).startswith("bad prediction")
    assert load.check_answer(answer(), None, 3).startswith("bad prediction")  # topk length
    assert load.check_answer(answer(), ["a", "b"], 5) == "classes differ from /metadata"


@pytest.mark.slow
def test_load_benchmark_quick_writes_its_report(smoke_model, tmp_path):
    import load

    out = tmp_path / "load.md"
    argv = ["--quick", "--model-path", str(smoke_model), "--out", str(out)]
    assert load.main(argv) == 0
    text = out.read_text()
    assert text.startswith("# Load test of the REST API")
    assert "| requests / errors | 100 / 0 |" in text
    assert "from 16 concurrent keep-alive clients" in text
    for row in ("| latency p50 / p95 / p99 |", "| throughput |", "| server RSS at start /"):
        assert row in text


def test_sweep_targets_are_judged_on_rows_of_the_same_run():
    import load

    def row(config, concurrency, throughput, p50, p99, errors=0):
        return dict(config=config, concurrency=concurrency, throughput=throughput, p50=p50,
                    p99=p99, errors=errors, requests=100)  # fmt: skip

    rows = [
        row("torch, batched", 1, 200, 5.0, 7.0),
        row("torch, unbatched", 1, 250, 4.0, 6.0),
        row("torch, batched", 16, 300, 50.0, 90.0),
        row("torch, unbatched", 16, 100, 150.0, 180.0),
        row("torchscript, batched", 16, 360, 40.0, 120.0),
        row("torchscript, unbatched", 16, 200, 80.0, 95.0),
        row("no-model ceiling", 16, 400, 40.0, 60.0, errors=1),
        row("torch, batched, one process", 16, 240, 60.0, 95.0),
        row("no-model ceiling, one process", 16, 320, 45.0, 70.0),
    ]
    assert load.sweep_targets(rows) == [
        "- 16 clients, batched torch >= 2.5x unbatched: 3.00x (the no-model ceiling itself is "
        "4.00x unbatched): **met**",
        "- 16 clients, batched torch >= 70% of the no-model ceiling: 75% (300 of 400 "
        "requests/s): **met**",
        "- 16 clients, batched torch p99 <= 100 ms: 90.0 ms: **met**",
        "- 1 client, batched torch p50 within 10% of unbatched: 5.0 ms against 4.0 ms (1.25x): "
        "**missed**",
        "- 16 clients, batched torchscript >= 2.5x unbatched: 1.80x (the no-model ceiling itself "
        "is 2.00x unbatched): **missed**",
        "- 16 clients, batched torchscript >= 70% of the no-model ceiling: 90% (360 of 400 "
        "requests/s): **met**",
        "- 16 clients, batched torchscript p99 <= 100 ms: 120.0 ms: **missed**",
        "- For comparison, the forward passes in a thread of the server (`--worker thread`), 16 "
        "clients: batched torch 240 requests/s against 300 with the model process (1.25x); 75% "
        "of its own ceiling (320 requests/s)",
        "- 0 errors: 1 in 900 requests: **missed**",
    ]


@pytest.mark.slow
def test_sweep_quick_runs_every_configuration_at_every_level(smoke_model, tmp_path):
    import shutil

    import load

    model = tmp_path / "model.pth"
    shutil.copy(smoke_model, model)  # the ONNX and TorchScript exports land beside it
    out = tmp_path / "sweep.md"
    configs = ["torch", "torch-1", "torchscript", "ceiling"]
    argv = ["--sweep", "--quick", "--levels", "1", "2", "--configs", *configs]
    argv += ["--model-path", str(model)]
    assert load.main([*argv, "--out", str(out)]) == 0
    text = out.read_text()
    assert model.with_suffix(".pt").is_file() and out.with_suffix(".png").is_file()
    assert not model.with_suffix(".onnx").exists()  # no ONNX configuration asked for
    for label, *_ in (load.SWEEP[name] for name in configs):
        for level in (1, 2):
            assert f"| {label} | {level} |" in text
        assert f"- {label}: " in text and " MiB over " in text
    assert "- 1 client, batched torch p50 within 10% of unbatched:" in text
    assert "- 1 client, batched torchscript p50" not in text  # no unbatched torchscript row
    assert "onnx" not in text
    assert "- 0 errors: 0 in 512 requests: **met**" in text
    assert "16 clients" not in text  # no row at 16: nothing judged there


def test_images_from_a_folder_and_an_empty_folder_refused(tmp_path, capsys):
    import load

    for i in range(70):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / f"c{i % 2}" / f"{i:03d}.jpg").write_bytes(bytes([i]))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    images = load.sample_images(tmp_path / "imgs")
    assert len(images) == 64 and images[0] == ("000.jpg", bytes([0]))
    assert [name for name, _ in images[:2]] == ["000.jpg", "002.jpg"]  # c0/ sorts first
    model = tmp_path / "model.pth"
    model.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    argv = ["--model-path", str(model), "--images", str(tmp_path / "empty")]
    assert load.main(argv) == 2
    assert f"no PNG or JPEG images in {tmp_path / 'empty'}" in capsys.readouterr().err


def test_load_benchmark_refuses_a_missing_model(tmp_path, capsys):
    import load

    assert load.main(["--model-path", str(tmp_path / "none.pth")]) == 2
    assert "no model file at" in capsys.readouterr().err


def app_session(name: str) -> list[str]:
    """One user's session of the app: open it, upload `name`, return the prediction shown."""
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.file_uploader[0].set_value([(name, (SAMPLES / name).read_bytes(), "image/png")])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return predictions_shown(at)


@pytest.mark.slow
def test_three_app_sessions_at_once_each_get_their_prediction(monkeypatch, smoke_model):
    """Three sessions run the app script at the same time, each gets its own image's answer.
    Separate processes: AppTest keeps one global Runtime, so threads would race on it."""
    monkeypatch.setenv("MODEL_PATH", str(smoke_model))
    names = ["digit-0.png", "digit-5.png", "digit-8.png"]
    predictor = Predictor(smoke_model, device="cpu")
    expected = [predictor.predict(SAMPLES / n)[0] for n in names]
    context = multiprocessing.get_context("spawn")  # fresh interpreters, MODEL_PATH inherited
    with ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        shown = list(pool.map(app_session, names))
    assert shown == [[f"**Prediction: {e.predicted}** ({e.probability:.1%})"] for e in expected]
