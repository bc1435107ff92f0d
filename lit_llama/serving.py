"""The machinery under serve.py: a model worker that decodes queued requests in batches and streams each one's
outputs back, and the web server it runs under (FastAPI on uvicorn).

serve.py used to run on LitServe, but it needed LitServe's internal loop, queue and buffer classes (a batched
streaming loop that sleeps while idle, requests checked before they are queued, chat and completions in one
queue), which changed in LitServe 0.3. What it needs is small, so it is here, on the two libraries LitServe
itself is built on:

* `BatchWorker` runs the model in a thread of its own: `setup` once (loading the model), then, for ever, it
  waits for a request, gathers those that come within `batch_timeout` seconds (up to `max_batch_size`), and
  calls `predict` on the batch. `predict` yields, step after step, one output per request (a dict; `{}` when
  a request has nothing new this step), which goes to that request's stream.
* `submit` queues one request from the web server's event loop and returns an async iterator of its outputs.

A thread rather than a process: the model's work is in torch, which releases the GIL, and the web side's
(parsing, tokenizing) is light, so one process serves both, with nothing to pickle between them.
"""

import asyncio
import threading
import time
import traceback
from queue import Empty, Queue
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Protocol

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse


class Model(Protocol):
    """What `BatchWorker` runs: `setup` loads the model on the device; `predict` decodes a batch of requests,
    yielding one output per request per step."""

    def setup(self, device: str) -> None: ...

    def predict(self, requests: List[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]: ...


class WorkerFailed(Exception):
    """`predict` raised on the request's batch (a bug: the traceback is in the server's log)."""


FAILED = object()  # put in a request's stream when its batch failed


class BatchWorker:
    def __init__(self, model: Model, device: str, max_batch_size: int, batch_timeout: float) -> None:
        self.model, self.device = model, device
        self.max_batch_size, self.batch_timeout = max_batch_size, batch_timeout
        self.requests: Queue = Queue()  # (stream, its event loop, request)
        self.ready = threading.Event()  # set once the model is loaded
        self.setup_error: Optional[BaseException] = None

    def start(self, on_setup_error) -> None:
        """Starts the worker thread; `on_setup_error()` is called (in that thread) should loading fail. A daemon:
        it ends with the server's process."""
        threading.Thread(target=self.run, args=(on_setup_error,), name="model", daemon=True).start()

    def run(self, on_setup_error) -> None:
        try:
            self.model.setup(self.device)
        except BaseException as e:  # noqa: BLE001 - whatever it is, the server must say so and stop
            traceback.print_exc()
            self.setup_error = e
            on_setup_error()
            return
        self.ready.set()
        while True:
            batch = self.gather()
            try:
                for outputs in self.model.predict([request for _, _, request in batch]):
                    for (stream, loop, _), output in zip(batch, outputs):
                        if output:  # nothing new for this request this step: nothing to send
                            loop.call_soon_threadsafe(stream.put_nowait, output)
            except Exception:  # noqa: BLE001 - a bug fails this batch's requests, not the server
                traceback.print_exc()
                for stream, loop, _ in batch:
                    loop.call_soon_threadsafe(stream.put_nowait, FAILED)

    def gather(self) -> List[Any]:
        """The next batch: waits (asleep, not polling) for a request, then takes those that come within
        `batch_timeout` seconds, up to `max_batch_size`."""
        batch = [self.requests.get()]
        deadline = time.monotonic() + self.batch_timeout
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.requests.get(timeout=max(0.0, deadline - time.monotonic())))
            except Empty:
                break
        return batch

    async def submit(self, request: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
        """Queues the request and yields its outputs as the worker makes them (WorkerFailed if its batch
        failed). The caller stops reading after the request's last output; should it stop earlier (a client
        gone), what the worker still sends is dropped with the stream."""
        stream: asyncio.Queue = asyncio.Queue()
        self.requests.put((stream, asyncio.get_running_loop(), request))
        while True:
            output = await stream.get()
            if output is FAILED:
                raise WorkerFailed
            yield output


def serve(app: FastAPI, worker: BatchWorker, host: str, port: int) -> None:
    """Runs the web server until Ctrl-C (or SIGTERM), with the worker loading the model meanwhile: GET /health
    answers "ok" once it has loaded (503 "not ready" before). Should loading fail, the server stops and the
    error is raised here."""

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok") if worker.ready.is_set() else PlainTextResponse("not ready", 503)

    # streams in flight get 5 s to finish at Ctrl-C, then the connections are closed
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5))

    def stop() -> None:
        server.should_exit = True

    worker.start(on_setup_error=stop)
    server.run()
    if worker.setup_error is not None:
        raise worker.setup_error

