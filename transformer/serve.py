"""The translation service: a JSON API and an attention viewer in the browser, on FastAPI and uvicorn.

    POST /translate  {"sentences": ["…"], "beam": 4, "attention": false}
    GET  /health
    GET  /           the page (static HTML + JS from transformer/static, no build step)

Requests are batched: each one is queued, and one worker takes whatever has arrived within a few
milliseconds (or while the previous batch was running) and translates it in one model call, on a thread
of its own so the event loop keeps accepting requests. Sentences of different requests then share one
beam search, which on a CPU costs little more than the longest of them alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from transformer.data.batching import collate
from transformer.errors import TransformerError
from transformer.model import Transformer
from transformer.model.attention import AttentionRecord
from transformer.model.ensemble import Ensemble
from transformer.search import SearchConfig
from transformer.translate import MAX_TOKENS, Translator, n_best, source_ids

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is refused with a 4xx before any work is done."""

    max_sentences: int = 32
    max_chars: int = 1000  # per sentence
    max_body_bytes: int = 64 * 1024
    max_beam: int = 8
    # Source tokens of a request with attention weights, which grow with the square of the lengths (4
    # sentences of 800 tokens gave a 190 MB answer); 128: one long sentence, or a few of ~30 tokens.
    max_attention_tokens: int = 128
    max_batch_sentences: int = 64  # sentences the worker puts into one model call
    batch_window_s: float = 0.005  # how long the worker waits for more requests after the first


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sentences: list[str]
    beam: int | None = None  # None: the run's beam size
    attention: bool = False


# --------------------------------------------------------------------------------------------------------
# The model side: synchronous, called on the worker thread
# --------------------------------------------------------------------------------------------------------


class Engine:
    """A Translator's model and tokenizer, turned into the service's answers."""

    def __init__(self, translator: Translator) -> None:
        self.model = translator.model.eval()
        self.tokenizer = translator.tokenizer
        self.train_config = translator.train_config
        self.max_source_len = translator.max_source_len
        self.members = len(self.model.members) if isinstance(self.model, Ensemble) else 1
        self.has_attention = isinstance(self.model, Transformer)  # one Transformer: an ensemble has none

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids per sentence; a sentence longer than the model takes is an error, not a truncation."""
        encoded, limit = source_ids(self.tokenizer, sentences), self.max_source_len
        for n, ids in enumerate(encoded):
            if len(ids) > limit:
                message = f"sentence {n + 1} has {len(ids)} tokens; the model takes at most {limit}"
                raise RequestError(413, message)
        return encoded

    @torch.inference_mode()
    def run(self, sources: list[list[int]], beam: int, attention: list[bool]) -> list[dict[str, Any]]:
        """Translate `sources` by beam search, in batches of similar length and at most MAX_TOKENS padded
        source tokens × beam, as `translate` makes them (one batch of 64 long sentences at beam 8 would
        hold GBs of cache); with attention weights where `attention` says so. An empty source's one
        alternative is the empty translation, as `--nbest`'s, and it has no attention."""
        search = SearchConfig(beam=beam, length_penalty=self.train_config.length_penalty)
        present = [i for i, ids in enumerate(sources) if ids]
        empty = {"translation": "", "score": 0.0, "log_prob": 0.0}
        results: list[dict[str, Any]] = [{**empty, "alternatives": [{**empty}]} for _ in sources]
        device = next(self.model.parameters()).device
        beams = n_best(self.model, sources, search, max_tokens=MAX_TOKENS, device=device)
        for i in present:
            hypotheses = beams[i]
            texts = self.tokenizer.decode_batch([h.tokens for h in hypotheses])
            alternatives = [
                {"translation": text, "score": h.score, "log_prob": h.log_prob, "tokens": h.tokens}
                for text, h in zip(texts, hypotheses, strict=True)
            ]
            best = alternatives[0]
            results[i] = {
                "translation": best["translation"],
                "score": best["score"],
                "log_prob": best["log_prob"],
                "alternatives": alternatives,
            }
        wanted = [i for i in present if attention[i]]
        if wanted:
            pairs = [(sources[i], results[i]["alternatives"][0]["tokens"]) for i in wanted]
            for i, weights in zip(wanted, self.attention(pairs), strict=True):
                results[i]["attention"] = weights
        for result in results:
            for alternative in result["alternatives"]:
                alternative.pop("tokens", None)
        return results

    def attention(self, pairs: list[tuple[list[int], list[int]]]) -> list[dict[str, Any]]:
        """Attention weights of the model reading each (source, translation) pair, teacher-forced: one
        batched pass with every layer's weights recorded, then cut back to each pair's lengths.

        Rows of the decoder's matrices are the positions that predict output_tokens (the translation and
        EOS); their inputs are target_tokens (BOS and the translation)."""
        batch = collate(pairs)
        device = next(self.model.parameters()).device
        encoder_record: AttentionRecord = []
        decoder_record: AttentionRecord = []
        memory, src_mask = self.model.encode(batch.src.to(device), record=encoder_record)
        self.model.decode(batch.tgt_in.to(device), memory, src_mask, record=decoder_record)
        piece = self.tokenizer.piece
        out = []
        for b, (source, target) in enumerate(pairs):
            s, t = len(source) + 1, len(target) + 1

            out.append(
                {
                    "source_tokens": [piece(i) for i in source] + ["</s>"],
                    "target_tokens": ["<s>"] + [piece(i) for i in target],
                    "output_tokens": [piece(i) for i in target] + ["</s>"],
                    "encoder": _cut(encoder_record, "self", b, s, s),
                    "decoder": _cut(decoder_record, "self", b, t, t),
                    "cross": _cut(decoder_record, "cross", b, t, s),
                }
            )
        return out


def _cut(record: list[dict[str, torch.Tensor]], key: str, b: int, rows: int, cols: int) -> list:
    """Sentence b's (layers, heads, rows, cols) weights as nested lists, rounded: four decimals are
    plenty for a heatmap and keep the JSON small."""
    return [
        [
            [[round(x, 4) for x in row] for row in layer[key][b, h, :rows, :cols].float().tolist()]
            for h in range(layer[key].size(1))
        ]
        for layer in record
    ]


# --------------------------------------------------------------------------------------------------------
# The batcher: requests in, one model call per batch out
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    sources: list[list[int]]
    beam: int
    attention: bool
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Gathers the jobs that arrive close together into one model call per beam size.

    One worker coroutine runs the model, on a thread, one batch at a time: jobs queue up while a batch
    runs and form the next one, so batches grow with the load by themselves."""

    def __init__(self, engine: Engine, limits: Limits) -> None:
        self.engine, self.limits = engine, limits
        self.pending: collections.deque[_Job] = collections.deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.model_calls = 0
        # sentences per model call, the last 1,024 (for the tests and the load test): a list grew for ever
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1024)

    async def submit(self, sources: list[list[int]], beam: int, attention: bool) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        if loop is not self.loop or self.worker is None or self.worker.done():
            # First request, or an app served again on a new event loop (tests do that): a new worker.
            self.loop, self.wake = loop, asyncio.Event()
            self.pending.clear()
            self.worker = loop.create_task(self._work())
        job = _Job(sources, beam, attention, loop.create_future())
        self.pending.append(job)
        self.wake.set()
        return await job.future

    def _take(self) -> list[_Job]:
        """The oldest jobs, up to max_batch_sentences (always at least one job)."""
        jobs = [self.pending.popleft()]
        count = len(jobs[0].sources)
        while self.pending and count + len(self.pending[0].sources) <= self.limits.max_batch_sentences:
            job = self.pending.popleft()
            jobs.append(job)
            count += len(job.sources)
        if not self.pending and self.wake is not None:
            self.wake.clear()
        return jobs

    async def _work(self) -> None:
        assert self.wake is not None
        while True:
            await self.wake.wait()
            await asyncio.sleep(self.limits.batch_window_s)  # let the requests arriving together gather
            jobs = self._take()
            for beam in sorted({job.beam for job in jobs}):
                group = [job for job in jobs if job.beam == beam and not job.future.done()]
                if group:
                    await self._run(group, beam)

    async def _run(self, group: list[_Job], beam: int) -> None:
        sources = [ids for job in group for ids in job.sources]
        attention = [job.attention for job in group for _ in job.sources]
        try:
            results = await asyncio.to_thread(self.engine.run, sources, beam, attention)
        except Exception as error:  # the requests fail, the service stays up
            for job in group:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.model_calls += 1
        self.batch_sizes.append(len(sources))
        start = 0
        for job in group:
            if not job.future.done():  # a client that went away has cancelled its future
                job.future.set_result(results[start : start + len(job.sources)])
            start += len(job.sources)


# --------------------------------------------------------------------------------------------------------
# The HTTP side
# --------------------------------------------------------------------------------------------------------


def create_app(translator: Translator, limits: Limits | None = None) -> FastAPI:
    """The ASGI app serving `translator`: usable in-process (tests) or by uvicorn (`transformer serve`)."""
    limits = limits or Limits()
    engine = Engine(translator)
    app = FastAPI(title="transformer", docs_url="/docs", redoc_url=None)
    app.state.batcher = batcher = Batcher(engine, limits)
    default_beam = min(engine.train_config.beam, limits.max_beam)

    # Every error answers {"error": "<one line>"}, as README promises: the service's own (RequestError)
    # and the framework's (unknown path, wrong method, invalid parameters, a crash), which would
    # otherwise answer {"detail": ...} or plain text, so a client needs one way to read errors.
    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        allowed = (error.headers or {}).get("Allow")
        if allowed:
            message += f" (allowed: {allowed})"
        # The headers stay: a 405 must name the allowed methods in Allow.
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _first_error(error.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log (Starlette re-raises after answering), not to the client.
        message = f"internal error ({type(error).__name__}); see the server's log"
        return JSONResponse({"error": message}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        config, tc = engine.model.config, engine.train_config
        return {
            "status": "ok",
            "model": tc.model,
            "parameters": engine.model.num_parameters(),
            "members": engine.members,  # checkpoints decoded as an ensemble; 1 for one model
            "src_lang": tc.src_lang,
            "tgt_lang": tc.tgt_lang,
            "beam": default_beam,
            "attention": engine.has_attention,
            "layers": {
                "encoder": getattr(config, "n_encoder_layers", 0),
                "decoder": getattr(config, "n_decoder_layers", 0),
            },
            "heads": getattr(config, "n_heads", 0),
            "limits": {
                "max_sentences": limits.max_sentences,
                "max_chars": limits.max_chars,
                "max_body_bytes": limits.max_body_bytes,
                "max_beam": limits.max_beam,
                "max_attention_tokens": limits.max_attention_tokens,
            },
            "model_calls": batcher.model_calls,
        }

    @app.post("/translate")
    async def translate(request: Request) -> dict[str, Any]:
        body = await _read_body(request, limits.max_body_bytes)
        try:
            query = TranslateRequest.model_validate_json(body)
        except ValidationError as error:
            status = 400 if error.errors()[0]["type"] == "json_invalid" else 422
            raise RequestError(status, _first_error(error.errors())) from None
        beam = default_beam if query.beam is None else query.beam
        if not 1 <= beam <= limits.max_beam:
            raise RequestError(422, f"beam must be between 1 and {limits.max_beam}, got {beam}")
        if not query.sentences:
            raise RequestError(422, "sentences: give at least one sentence")
        if len(query.sentences) > limits.max_sentences:
            raise RequestError(
                413, f"{len(query.sentences)} sentences; at most {limits.max_sentences} per request"
            )
        for n, sentence in enumerate(query.sentences):
            if len(sentence) > limits.max_chars:
                raise RequestError(
                    413, f"sentence {n + 1} has {len(sentence)} characters; at most {limits.max_chars}"
                )
        if query.attention and not engine.has_attention:
            served = f"an ensemble of {engine.members}" if engine.members > 1 else "an RNN"
            raise RequestError(422, f"attention weights need one Transformer checkpoint (this is {served})")
        sources = engine.encode(query.sentences)
        tokens = sum(map(len, sources))
        if query.attention and tokens > limits.max_attention_tokens:
            raise RequestError(
                413,
                f"attention weights of {tokens} source tokens; at most {limits.max_attention_tokens} "
                "per request (they grow with the square of the length)",
            )
        started = time.perf_counter()
        results = await batcher.submit(sources, beam, query.attention)
        for sentence, result in zip(query.sentences, results, strict=True):
            result["source"] = sentence
        return {"beam": beam, "translations": results, "time_ms": (time.perf_counter() - started) * 1e3}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _first_error(errors: Sequence[Any]) -> str:
    """One line for a list of pydantic errors: the first one, with where it is (`beam: Input should be a
    valid integer`); the client fixes one thing at a time, and a line reads better than the whole list."""
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return " ".join(f"{where}: {first['msg']}".split())  # one line, whatever a client's key holds


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def serve(
    checkpoints: Sequence[str | Path],
    name: str = "best",
    host: str = "127.0.0.1",
    port: int = 8000,
    precision: str = "fp32",
) -> None:
    """`transformer serve`: load the checkpoint (several: an ensemble) and serve it until interrupted."""
    import uvicorn

    _check_address(host, port)
    app = create_app(Translator.from_checkpoints(checkpoints, name, precision=precision))
    served = " + ".join(map(str, checkpoints))
    print(f"serving {served} on http://{host}:{port}/ (the page) and /translate (the API)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _check_address(host: str, port: int) -> None:
    """One line now for an address uvicorn could not bind, which it reports after "serving …" was printed,
    as a log line (a port in use) or a 74-line traceback (a port out of range)."""
    import socket

    if not 0 <= port <= 65535:
        raise TransformerError(f"--port must be 0 to 65535, got {port}")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        why = os.strerror(error.errno) if error.errno else str(error)
        raise TransformerError(f"cannot serve on {host}:{port}: {why}") from None


# --------------------------------------------------------------------------------------------------------
# Running a server in a thread, and loading it: for the tests and benchmarks/serve_load.py
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of `host`, in a thread; yields the base URL."""
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass(frozen=True)
class LoadReport:
    requests: int
    concurrency: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    def percentile(self, q: float) -> float:
        """The q-th percentile (nearest rank) of the latencies."""
        ordered = sorted(self.latencies_ms)
        return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.concurrency} concurrent: {self.errors} errors, "
            f"{self.requests / self.seconds:.1f} requests/s, latency p50 {self.percentile(50):.0f} ms, "
            f"p90 {self.percentile(90):.0f} ms, p99 {self.percentile(99):.0f} ms "
            f"(mean {statistics.fmean(self.latencies_ms):.0f} ms)"
        )


async def load(
    url: str, sentences: Sequence[str], requests: int, concurrency: int, beam: int = 4
) -> LoadReport:
    """Send `requests` POST /translate (one sentence each, taken in turn from `sentences`) with at most
    `concurrency` in flight; count every non-200 answer or transport failure as an error."""
    import httpx

    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors, next_index
        while next_index < requests:
            n, next_index = next_index, next_index + 1
            body = {"sentences": [sentences[n % len(sentences)]], "beam": beam}
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/translate", json=body)
                ok = response.status_code == 200 and len(response.json()["translations"]) == 1
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - started) * 1e3)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return LoadReport(requests, concurrency, errors, time.perf_counter() - started, latencies)
