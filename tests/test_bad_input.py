"""The bad-file corpus (tests/badfiles.py) through every serving entry point (issue 9): the
Predictor, the predict.py command line, the REST API and the Streamlit app. Every "ok" file is
classified, every "refused" file gets an error naming it and the reason, nothing raises, the
order is kept, and the decompression bomb is refused without allocating its pixels."""

from __future__ import annotations

import json
import re
import resource
import threading

import psutil
import pytest
from fastapi.testclient import TestClient
from test_app import predictions_shown, run_app, upload

import predict
from badfiles import make_corpus
from predict import Predictor
from serve import create_app

# Why each refused file is refused, as Prediction.error / the API's detail say it.
REASONS = {
    "zero_byte": r"the file is empty \(0 bytes\)",
    "truncated": r"unreadable image \(.+\)",
    "text_named": r"not an image file \(or an unsupported format\)",
    "html_named": r"not an image file \(or an unsupported format\)",
    "bomb": r"refused, too many pixels \(Image size \(900000000 pixels\) exceeds limit .+\)",
}
MAX_GROWTH_MB = 500  # a decoded 30000 x 30000 bomb would take 900 MB (grayscale) or 2.7 GB


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    corpus = make_corpus(tmp_path_factory.mktemp("bad"))
    assert {n for n, (_, e) in corpus.items() if e == "refused"} == set(REASONS)
    return corpus


@pytest.fixture(scope="module")
def predictor(smoke_model) -> Predictor:
    return Predictor(smoke_model, device="cpu")


@pytest.fixture(scope="module")
def client(smoke_model):
    with TestClient(create_app(smoke_model, device="cpu")) as c:
        yield c


@pytest.fixture(scope="module")
def expected(corpus, predictor) -> dict[str, tuple[str, float]]:
    """(predicted, probability) of each ok file, one file a call: the reference for the rest."""
    out = {}
    for name, (path, kind) in corpus.items():
        if kind == "ok" and name != "huge_photo":  # the huge photo: once per entry point
            [p] = predictor.predict(path)
            out[name] = (p.predicted, p.probability)
    return out


def by_file(corpus) -> dict[str, tuple[str, str]]:
    """file name -> (corpus name, expected outcome)"""
    return {path.name: (name, kind) for name, (path, kind) in corpus.items()}


def check_entry(entry: dict, name: str, kind: str, predictor: Predictor, expected) -> None:
    """One JSON prediction (Prediction.as_dict) against the corpus' expectation."""
    if kind == "refused":
        assert re.fullmatch(REASONS[name], entry["error"]), (name, entry["error"])
        assert entry["predicted"] is None and entry["topk"] == [], name
        return
    assert entry["error"] is None, (name, entry["error"])
    assert entry["predicted"] in predictor.classes and len(entry["topk"]) == 5, name
    if name in expected:
        assert entry["predicted"] == expected[name][0], name
        assert entry["probability"] == pytest.approx(expected[name][1], abs=1e-6), name


# ---- the decompression bomb, first, while the process' peak memory is still low --------------


class PeakRss:
    """The highest RSS of this process while the block runs, polled every 2 ms."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            threading.Event().wait(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.growth_mb = (self.peak - self.start) / 2**20
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.max_growth_mb = (max_after - self.max_before) / 2**10


def test_the_bomb_is_refused_without_allocating_its_pixels(corpus, client, predictor):
    path = corpus["bomb"][0]
    assert path.stat().st_size < 10_000  # a few KB that claim 900 megapixels
    with PeakRss() as api:
        response = client.post("/predict", files={"files": ("bomb.png", path.read_bytes())})
    assert response.status_code == 400
    assert re.fullmatch("bomb.png: " + REASONS["bomb"], response.json()["detail"])
    with PeakRss() as direct:
        [p] = predictor.predict(path)
    assert re.fullmatch(REASONS["bomb"], p.error)
    for peak in (api, direct):
        assert peak.growth_mb < MAX_GROWTH_MB and peak.max_growth_mb < MAX_GROWTH_MB


# ---- Predictor -------------------------------------------------------------------------------


def test_predictor_on_the_corpus_folder_and_a_list(corpus, predictor, expected):
    folder = next(iter(corpus.values()))[0].parent
    paths = sorted(path for path, _ in corpus.values())
    from_folder = predictor.predict(folder)  # never raises
    assert [p.source for p in from_folder] == [str(p) for p in paths]  # sorted, all of them
    names = by_file(corpus)
    # A list keeps its order: refused and ok files interleaved, the huge photo excluded
    # (it is in the folder run already).
    mixed = [p for p in reversed(paths) if p.name != "huge_photo.jpg"]
    from_list = predictor.predict(mixed, batch_size=4)  # errors in several batches
    assert [p.source for p in from_list] == [str(p) for p in mixed]
    for p in from_folder + from_list:
        name, kind = names[p.source.rsplit("/", 1)[-1]]
        assert p.ok == (kind == "ok"), name
        check_entry(p.as_dict(), name, kind, predictor, expected)
    assert sum(p.ok for p in from_folder) == 7 and sum(not p.ok for p in from_folder) == 5


# ---- predict.py command line -------------------------------------------------------------------


def test_cli_json_lists_every_file_and_exits_1(corpus, smoke_model, predictor, expected, capsys):
    folder = next(iter(corpus.values()))[0].parent
    argv = [str(folder), "--format", "json", "--model-path", str(smoke_model), "--device", "cpu"]
    assert predict.main(argv) == 1  # some files could not be classified
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["source"] for r in rows] == sorted(str(p) for p, _ in corpus.values())
    names = by_file(corpus)
    for row in rows:
        check_entry(row, *names[row["source"].rsplit("/", 1)[-1]], predictor, expected)
    assert "5 of 12 image(s) could not be classified" in err


# ---- REST API --------------------------------------------------------------------------------


def test_api_each_file_alone(corpus, client, predictor, expected):
    for name, (path, kind) in corpus.items():
        if name in ("huge_photo", "bomb"):  # in the batch below / the bomb test above
            continue
        response = client.post("/predict", files={"files": (path.name, path.read_bytes())})
        if kind == "refused":
            assert response.status_code == 400, name
            assert re.fullmatch(
                f"{re.escape(path.name)}: {REASONS[name]}", response.json()["detail"]
            )
        else:
            assert response.status_code == 200, (name, response.text)
            [entry] = response.json()["predictions"]
            assert entry["source"] == path.name
            check_entry(entry, name, kind, predictor, expected)


def test_api_all_files_in_one_request(corpus, client, predictor, expected):
    files = [("files", (path.name, path.read_bytes())) for path, _ in corpus.values()]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    entries = response.json()["predictions"]
    assert [e["source"] for e in entries] == [path.name for path, _ in corpus.values()]
    for entry, (name, (_, kind)) in zip(entries, corpus.items(), strict=True):
        check_entry(entry, name, kind, predictor, expected)


# ---- Streamlit app ---------------------------------------------------------------------------


def test_app_shows_errors_for_refused_uploads_and_predictions_for_the_rest(
    monkeypatch, smoke_model, corpus, expected
):
    # The uploader accepts jpg, jpeg, png, webp and bmp: every refused file has one of those.
    chosen = ["bomb", "cmyk", "truncated", "zero_byte", "huge_photo", "html_named", "exif_rotated"]
    at = run_app(monkeypatch, smoke_model)
    upload(at, *[(corpus[n][0].name, corpus[n][0].read_bytes()) for n in chosen])
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    refused = [n for n in chosen if corpus[n][1] == "refused"]
    assert len(errors) == len(refused)
    for message, name in zip(errors, refused, strict=True):
        label = corpus[name][0].name.replace("_", "\\_")  # Markdown-escaped (app.md_escape)
        assert re.fullmatch(rf"\*\*{re.escape(label)}\*\*: {REASONS[name]}", message)
    shown = predictions_shown(at)
    assert len(shown) == 3 and len(at.main.dataframe) == 3
    for name, line in zip(("cmyk", "exif_rotated"), (shown[0], shown[2]), strict=True):
        predicted, probability = expected[name]
        assert line == f"**Prediction: {predicted}** ({probability:.1%})"
    assert at.main.markdown[0].value == "3 of 7 image(s) classified."
