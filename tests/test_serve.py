"""The translation service, in-process: answers against the Translator, attention against the formula,
bad requests, batching under concurrent load, and a bounded load test on loopback."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from transformer.data.batching import collate
from transformer.serve import Limits, create_app, load, running_server
from transformer.translate import Translator

SENTENCES = [
    "Ein Mann fährt Fahrrad.",
    "Zwei Hunde spielen im Schnee.",
    "Eine Frau liest ein Buch.",
    "Kinder spielen am Strand.",
]
LIMITS = Limits(max_sentences=4, max_chars=200, max_body_bytes=2000, max_beam=4)


@pytest.fixture(scope="module")
def translator(run_dir: Path) -> Translator:
    return Translator.from_checkpoint(run_dir)


@pytest.fixture
def client(translator: Translator) -> TestClient:
    with TestClient(create_app(translator, LIMITS)) as client:
        yield client


def test_translations_are_the_translators_with_the_beams_alternatives(
    client: TestClient, translator: Translator
) -> None:
    answer = client.post("/translate", json={"sentences": [*SENTENCES[:2], " "], "beam": 3})
    assert answer.status_code == 200, answer.text
    results = answer.json()["translations"]
    assert [r["translation"] for r in results] == translator.translate([*SENTENCES[:2], " "], beam=3)
    for result in results[:2]:
        alternatives = result["alternatives"]
        assert len(alternatives) == 3 and alternatives[0]["translation"] == result["translation"]
        scores = [a["score"] for a in alternatives]
        assert scores == sorted(scores, reverse=True)
        assert all(a["log_prob"] < 0 for a in alternatives)
    empty = {"translation": "", "score": 0.0, "log_prob": 0.0}  # one alternative, as --nbest gives
    assert results[2] == {**empty, "alternatives": [empty], "source": " "}


def test_a_request_is_searched_in_batches_of_a_token_budget(
    translator: Translator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `translate` batches: a request of long sentences at a wide beam is not one batch, whose cache
    would grow with sentences × beam × length; the answers are those of one batch."""
    from transformer import serve as serve_module
    from transformer import translate as translate_module

    app = create_app(translator, LIMITS)
    whole = TestClient(app).post("/translate", json={"sentences": SENTENCES[:4], "beam": 3}).json()
    calls = []
    search = translate_module.beam_search_n_best
    monkeypatch.setattr(
        translate_module,
        "beam_search_n_best",
        lambda model, src, **how: calls.append(len(src)) or search(model, src, **how),
    )
    monkeypatch.setattr(serve_module, "MAX_TOKENS", 3 * 12)  # 12 source tokens a batch at beam 3
    split = TestClient(create_app(translator, LIMITS)).post(
        "/translate", json={"sentences": SENTENCES[:4], "beam": 3}
    )
    assert len(calls) > 1 and sum(calls) == 4
    for a, b in zip(split.json()["translations"], whole["translations"], strict=True):  # batches pad apart
        assert [x["translation"] for x in a["alternatives"]] == [x["translation"] for x in b["alternatives"]]
        assert [x["score"] for x in a["alternatives"]] == pytest.approx(
            [x["score"] for x in b["alternatives"]]
        )


def test_attention_weights_are_the_models(client: TestClient, translator: Translator) -> None:
    answer = client.post("/translate", json={"sentences": SENTENCES[:2], "beam": 2, "attention": True})
    assert answer.status_code == 200, answer.text
    model, tokenizer = translator.model, translator.tokenizer
    config = model.config
    for sentence, result in zip(SENTENCES[:2], answer.json()["translations"], strict=True):
        a = result["attention"]
        source = tokenizer.encode(sentence)
        s, t = len(source) + 1, len(a["output_tokens"])
        assert a["source_tokens"] == [tokenizer.piece(i) for i in source] + ["</s>"]
        assert a["target_tokens"][0] == "<s>" and a["output_tokens"][-1] == "</s>"
        for key, layers, rows, cols in (
            ("encoder", config.n_encoder_layers, s, s),
            ("decoder", config.n_decoder_layers, t, t),
            ("cross", config.n_decoder_layers, t, s),
        ):
            weights = torch.tensor(a[key])
            assert weights.shape == (layers, config.n_heads, rows, cols), key
            assert torch.allclose(weights.sum(-1), torch.ones(layers, config.n_heads, rows), atol=1e-3), key
        decoder_self = torch.tensor(a["decoder"])
        assert (decoder_self.triu(1) == 0).all(), "a target position attends only to earlier ones"
        # Encoder layer 1 from the formula: softmax(Q·Kᵀ/√d_k) on the embedded source.
        with torch.no_grad():
            src = collate([(source, [])]).src
            x = model.src_pos(model.src_embed(src))
            attn = model.encoder.layers[0].self_attn
            q = attn.w_q(x).view(1, s, config.n_heads, -1).transpose(1, 2)
            k = attn.w_k(x).view(1, s, config.n_heads, -1).transpose(1, 2)
            expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(config.d_k), dim=-1)[0]
        assert torch.allclose(torch.tensor(a["encoder"][0]), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "Invalid JSON"),
        (b'{"beam": 2}', 422, "sentences"),
        (b'{"sentences": "Ein Mann."}', 422, "sentences"),
        (b'{"sentences": []}', 422, "at least one"),
        (b'{"sentences": ["a"], "beam": 0}', 422, "beam must be between 1 and 4"),
        (b'{"sentences": ["a"], "beam": 5}', 422, "beam must be between 1 and 4"),
        (b'{"sentences": ["a"], "beam": "2"}', 422, "beam"),
        (b'{"sentences": ["a"], "attention": "yes"}', 422, "attention"),
        (b'{"sentences": ["a"], "temperature": 2}', 422, "temperature"),
        (b'{"sentences": ["a"], "ev\\nil": 2}', 422, "ev il: Extra inputs"),  # one line, as the key's newline
        (b'{"sentences": ["a", "b", "c", "d", "e"]}', 413, "at most 4 per request"),
        (b'{"sentences": ["' + b"a" * 201 + b'"]}', 413, "201 characters"),
        (b'{"sentences": ["' + b"a" * 2000 + b'"]}', 413, "at most 2000"),
        (  # attention weights grow with the square of the lengths: a few short sentences' only
            b'{"sentences": ["'
            + b'", "'.join([b"Zwei Hunde spielen im Schnee und ein Mann ruft. " * 4] * 4)
            + b'"], '
            b'"attention": true}',
            413,
            "source tokens; at most 128 per request",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(client: TestClient, body: bytes, status: int, message: str) -> None:
    answer = client.post("/translate", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "message", "allow"),
    [
        ("GET", "/nope", 404, "GET /nope: Not Found", None),
        ("GET", "/static/nope.js", 404, "GET /static/nope.js: Not Found", None),
        ("GET", "/translate", 405, "GET /translate: Method Not Allowed (allowed: POST)", "POST"),
        ("DELETE", "/health", 405, "DELETE /health: Method Not Allowed (allowed: GET)", "GET"),
    ],
)
def test_unknown_paths_and_wrong_methods_answer_an_error_line_too(
    client: TestClient, method: str, path: str, status: int, message: str, allow: str | None
) -> None:
    """FastAPI's own errors would answer {"detail": ...}: a client reading "error" would find nothing."""
    answer = client.request(method, path)
    assert answer.status_code == status, answer.text
    assert answer.json() == {"error": message}
    assert answer.headers.get("allow") == allow  # a 405 keeps its Allow header


def test_invalid_parameters_and_crashes_answer_an_error_line_too(translator: Translator) -> None:
    """No route takes typed parameters today; one added later must answer {"error": ...} as well, and so
    must a model call that fails (a 500, not Starlette's plain "Internal Server Error")."""
    app = create_app(translator, LIMITS)

    @app.get("/typed")
    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    def broken(*_: object) -> None:
        raise RuntimeError("out of memory")

    app.state.batcher.engine.run = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/typed", params={"n": 3}).json() == {"n": 3}
        answer = client.get("/typed", params={"n": "three"})
        assert answer.status_code == 422
        assert answer.json()["error"].startswith("query.n: Input should be a valid integer")
        answer = client.post("/translate", json={"sentences": ["Ein Mann."]})
        assert answer.status_code == 500
        assert answer.json() == {"error": "internal error (RuntimeError); see the server's log"}


def test_health_and_page(client: TestClient, translator: Translator) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["attention"] is True
    assert health["heads"] == translator.model.config.n_heads and health["limits"]["max_beam"] == 4
    page = client.get("/")
    assert page.status_code == 200 and '<canvas id="heatmap"' in page.text
    assert "function draw()" in client.get("/static/app.js").text


def test_concurrent_requests_share_model_calls_and_get_their_own_answers(translator: Translator) -> None:
    app = create_app(translator, Limits(batch_window_s=0.05))
    sentences = SENTENCES * 2

    async def send_all() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answers = await asyncio.gather(
                *(client.post("/translate", json={"sentences": [s], "beam": 2}) for s in sentences)
            )
        return [answer.json() for answer in answers]

    answers = asyncio.run(send_all())
    assert [a["translations"][0]["translation"] for a in answers] == translator.translate(sentences, beam=2)
    assert app.state.batcher.model_calls < len(sentences)  # batched, not one call per request
    assert sum(app.state.batcher.batch_sizes) == len(sentences)


def test_load_on_loopback_has_no_errors(translator: Translator) -> None:
    with running_server(create_app(translator)) as url:
        assert url.startswith("http://127.0.0.1:")
        report = asyncio.run(load(url, SENTENCES, requests=40, concurrency=8, beam=2))
    print(report.summary())
    assert report.errors == 0 and len(report.latencies_ms) == 40
    assert report.percentile(50) <= report.percentile(90) <= report.percentile(99)


def test_the_serve_command_hands_its_settings_to_uvicorn(run_dir: Path, monkeypatch, capsys) -> None:
    """`transformer serve` as a user runs it: the checkpoint loaded at the precision asked for, uvicorn given
    the host and port, and a bad checkpoint refused in one line before any server starts."""
    import uvicorn

    from transformer.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append((app, kwargs)))
    assert main(["serve", "--checkpoint", str(run_dir), "--host", "0.0.0.0", "--port", "8123"]) == 0
    ((app, kwargs),) = started
    assert kwargs["host"] == "0.0.0.0" and kwargs["port"] == 8123
    assert TestClient(app).get("/health").status_code == 200
    assert "serving" in capsys.readouterr().out
    assert main(["serve", "--checkpoint", str(run_dir / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and len(started) == 1
    assert Limits() == Limits(max_sentences=32, max_chars=1000, max_body_bytes=64 * 1024, max_beam=8)


def test_several_checkpoints_are_served_as_their_ensemble(run_dir: Path, monkeypatch, capsys) -> None:
    """`transformer serve --checkpoint A B`: the ensemble's translations, `members` in /health, and a request
    for attention weights (which an ensemble has not) refused in one line."""
    import uvicorn

    from transformer.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    assert main(["serve", "--checkpoint", str(run_dir), str(run_dir)]) == 0
    assert f"serving {run_dir} + {run_dir} on" in capsys.readouterr().out
    with TestClient(started[0]) as client:
        health = client.get("/health").json()
        assert health["members"] == 2 and health["attention"] is False
        alone = Translator.from_checkpoint(run_dir)
        assert health["parameters"] == 2 * alone.model.num_parameters()
        answer = client.post("/translate", json={"sentences": SENTENCES[:2], "beam": 2})
        assert answer.status_code == 200, answer.text
        ensemble = Translator.from_checkpoints([run_dir, run_dir])
        translations = [r["translation"] for r in answer.json()["translations"]]
        assert translations == ensemble.translate(SENTENCES[:2], beam=2)
        refused = client.post("/translate", json={"sentences": SENTENCES[:1], "attention": True})
        assert refused.status_code == 422
        message = "attention weights need one Transformer checkpoint (this is an ensemble of 2)"
        assert refused.json() == {"error": message}


def test_an_address_the_server_cannot_take_is_one_line_before_serving(run_dir: Path, capsys) -> None:
    """uvicorn reported these after "serving …" was printed: a port in use as a log line, a port out of
    range as a 74-line traceback."""
    import socket

    from transformer.cli import main

    assert main(["serve", "--checkpoint", str(run_dir), "--port", "99999"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port must be 0 to 65535, got 99999"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(run_dir), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: cannot serve on 127.0.0.1:{port}: Address already in use"
    assert "serving" not in captured.out
