"""The machinery under serve.py: a model worker process that decodes queued requests in batches and streams each
one's outputs back, and the web server in front of it (FastAPI on uvicorn).

serve.py used to run on LitServe, but it needed LitServe's internal loop, queue and buffer classes (a batched
streaming loop that sleeps while idle, requests checked before they are queued, chat and completions in one
queue), which changed in LitServe 0.3. What it needs is small, so it is here, on the two libraries LitServe
itself is built on:

* `BatchWorker` runs the model in a process of its own, as LitServe did: the decoding loop then never waits
  for the web server's threads to hand back Python's GIL. There, `setup` loads the model once; then, for
  ever, the worker waits for a request, gathers those that come within `batch_timeout` seconds (up to
  `max_batch_size`), and calls `predict` on the batch. `predict` yields, step after step, one output per request (a dict; `{}` when a
  request has nothing new this step), which goes back to that request's stream.
* `submit` queues one request from the web server's event loop and returns an async iterator of its outputs;
  a thread of the web server's process hands each output the worker sends to its request's stream.
"""

import asyncio
import multiprocessing
import threading
import time
import traceback
import uuid
from queue import Empty
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

READY, FAILED, SETUP_FAILED = "ready", "failed", "setup failed"  # what the worker says besides outputs


class Model(Protocol):
    """What `BatchWorker` runs (pickled into the worker process, so loaded only in `setup`): `setup` loads the
    model on the device; `predict` decodes a batch of requests, yielding one output per request per step."""

    def setup(self, device: str) -> None: ...

    def predict(self, requests: List[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]: ...


class WorkerFailed(Exception):
    """`predict` raised on the request's batch (a bug: the traceback is in the server's log)."""


def work(model: Model, device: str, max_batch_size: int, batch_timeout: float, requests: Any, outputs: Any) -> None:
    """The worker process: loads the model, then decodes batch after batch. Sends, for each step of a batch, the
    list of (request id, output) pairs of the requests with something new; [(None, READY)] once loaded,
    [(None, SETUP_FAILED)] if loading failed, (request id, FAILED) for the requests of a batch `predict` failed on."""
    try:
        model.setup(device)
    except BaseException:  # noqa: BLE001 - whatever it is, the server must say so and stop
        traceback.print_exc()
        outputs.put([(None, SETUP_FAILED)])
        return
    outputs.put([(None, READY)])
    try:
        while True:
            batch = gather(requests, max_batch_size, batch_timeout)
            try:
                for step in model.predict([request for _, request in batch]):
                    # one message per step, not one per request: each is pickled by a thread of this process,
                    # which takes Python's GIL from the decoding loop
                    outputs.put([(uid, output) for (uid, _), output in zip(batch, step) if output])
            except Exception:  # noqa: BLE001 - a bug fails this batch's requests, not the server
                traceback.print_exc()
                outputs.put([(uid, FAILED) for uid, _ in batch])
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the server stops us anyway
        pass


def gather(requests: Any, max_batch_size: int, batch_timeout: float) -> List[Tuple[str, Any]]:
    """The next batch: waits (asleep, not polling) for a request, then takes those that come within
    `batch_timeout` seconds, up to `max_batch_size`."""
    batch = [requests.get()]
    deadline = time.monotonic() + batch_timeout
    while len(batch) < max_batch_size:
        try:
            batch.append(requests.get(timeout=max(0.0, deadline - time.monotonic())))
        except Empty:
            break
    return batch


class BatchWorker:
    def __init__(self, model: Model, device: str, max_batch_size: int, batch_timeout: float) -> None:
        # spawn: a fresh interpreter (a forked one would share torch's and the web server's threads' state)
        context = multiprocessing.get_context("spawn")
        self.requests, self.outputs = context.Queue(), context.Queue()
        self.process = context.Process(target=work, args=(model, device, max_batch_size, batch_timeout, self.requests,
                                                          self.outputs), name="model", daemon=True)
        self.streams: Dict[str, Tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}  # request id -> its stream
        self.ready = threading.Event()  # set once the model is loaded
        self.error: Optional[str] = None  # why the worker stopped, if it did

    def start(self, on_setup_error: Callable[[], None]) -> None:
        """Starts the worker process, and the thread that hands its outputs to the requests' streams;
        `on_setup_error()` is called (in that thread) should loading fail."""
        self.process.start()
        threading.Thread(target=self.dispatch, args=(on_setup_error,), name="outputs", daemon=True).start()

    def dispatch(self, on_setup_error: Callable[[], None]) -> None:
        while True:
            try:
                messages = self.outputs.get(timeout=1.0)
            except Empty:
                if not self.process.is_alive():  # killed (out of memory?): the server stops, saying so
                    self.error = f"the model's process ended (exit code {self.process.exitcode}): see the log above"
                    on_setup_error()
                    return
                continue
            for uid, output in messages:
                if uid is None:
                    if output == READY:
                        self.ready.set()
                    else:
                        self.error = "the model could not be loaded: its error is printed above"
                        on_setup_error()
                        return
                elif uid in self.streams:  # else a request whose client went away: dropped
                    stream, loop = self.streams[uid]
                    loop.call_soon_threadsafe(stream.put_nowait, output)

    async def submit(self, request: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
        """Queues the request and yields its outputs as the worker makes them (WorkerFailed if its batch
        failed). The caller stops reading after the request's last output; should it stop earlier (a client
        gone), what the worker still sends is dropped."""
        uid, stream = uuid.uuid4().hex, asyncio.Queue()
        self.streams[uid] = (stream, asyncio.get_running_loop())
        try:
            self.requests.put((uid, request))
            while True:
                output = await stream.get()
                if output == FAILED:
                    raise WorkerFailed
                yield output
        finally:
            self.streams.pop(uid, None)


def serve(app: FastAPI, worker: BatchWorker, host: str, port: int) -> Optional[str]:
    """Runs the web server until Ctrl-C (or SIGTERM), with the worker loading the model meanwhile: GET /health
    answers "ok" once it has loaded (503 "not ready" before). Should the worker fail to load the model (or die),
    the server stops and a line saying why is returned; else None."""

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok") if worker.ready.is_set() else PlainTextResponse("not ready", 503)

    # streams in flight get 5 s to finish at Ctrl-C, then the connections are closed
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5))

    def stop() -> None:
        server.should_exit = True

    worker.start(on_setup_error=stop)
    try:
        server.run()
    finally:
        worker.process.terminate()  # a daemon process would be ended at exit anyway; now, before the next line
        worker.process.join(10)
    return worker.error
