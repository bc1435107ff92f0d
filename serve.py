"""An OpenAI-compatible server for one base model and every LoRA adapter in a folder.

    python serve.py --checkpoint_dir checkpoints/lit-llama/open_llama_3b --lora_dir adapters --port 8000

Endpoints (OpenAI's request and response shapes, `"stream": true` too): POST /v1/chat/completions,
POST /v1/completions, GET /v1/models; GET /health answers "ok" once the model is loaded.

* Adapters: each LoRA file FOLDER/NAME.pth (finetune/lora.py's) is the model NAME; "base" is the base model
  alone. The files there at start are checked and loaded then; a file added later is checked and loaded when a
  request first names it, and loaded again when its content changes (hot load). A file trained on another base
  model, or with a bad field, is refused with the reason. The base is loaded once, never merged
  (lit_llama/multi_lora.py).
* The request's `model` picks the adapter. Chat messages are put in the prompt style the adapter was trained
  with (recorded in its file; Alpaca for the base: the last user message is the instruction), see
  `lit_llama.prompts.chat_turns`; the answer ends at end-of-text, the style's stop text, a `stop` string of
  the request, or `max_tokens`. /v1/completions continues the raw prompt text, without a template.
* Batching: the requests waiting when the model is free (up to --max_batch_size, whatever their adapters) are
  decoded in one batch, each row with its own adapter, prompt length and `max_tokens` (`stream_batch`).
  Requests with another temperature or top_k in the same batch are decoded after the first ones. A batch runs
  to its end before the next one starts (no requests join a batch in flight). Greedy answers
  (`"temperature": 0`, and below MIN_TEMPERATURE) are the same alone or in a batch. Should decoding fail (a bug),
  only the requests of that temperature and top_k get a 500; the others of the batch are answered.
* A bad request (unparsable JSON, nesting deeper than 32 levels, text that is not valid Unicode, a missing field,
  an unknown model, a prompt as long as the context, max_tokens < 1, more than 4 stop strings or one longer than
  256 characters, ...) is answered 400 or 404 with OpenAI's error shape `{"error": {"message": ...}}` before it
  is queued, so it never reaches, nor fails, a batch. A body over 1 MiB is refused (413) before it is read.

* Finetune runs (`--runs`): each run folder of finetune/lora.py, adapter.py or full.py is the model named by its
  folder; a LoRA run joins the LoRA batches, an adapter or full finetune is decoded by a model of its own.
* GET / is a page comparing the models side by side (lit_llama/web/): one prompt to two to four models, their
  answers streamed in columns with tokens/s, the runs' training curves and settings; it uses only the
  endpoints above (/v1/models carries each run's settings and curves in its `lit_llama` field).

How it runs (lit_llama/serving.py): the model decodes in a worker process (`LoRAServer`, loaded in its `setup`);
the HTTP endpoints (`OpenAIEndpoints`, FastAPI on uvicorn) check and tokenize each request and queue it for the
worker, which streams back each row's new text every few tokens.
"""

import asyncio
import hashlib
import json
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere, installed or not

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from pydantic import BaseModel, ConfigDict, ValidationError  # noqa: E402

from lit_llama.adapter import adapter_config_from_checkpoint, adapter_prompt_style, load_adapter_model  # noqa: E402
from lit_llama.checkpoint import CheckpointPaths, check_vocab, load_model, load_state_dict, resolve_checkpoint
from lit_llama.cli import check_at_least, check_range, UserError, run_cli
from lit_llama.distributed import default_device, precision_dtype
from lit_llama.run_dir import RUN_NAME
from lit_llama.generation import stop_ids, stream_batch  # noqa: E402
from lit_llama.json_input import parse_json  # noqa: E402
from lit_llama.model import LLaMA  # noqa: E402
from lit_llama.multi_lora import BASE, MultiLoRALLaMA, check_cache_flags, read_lora_factors  # noqa: E402
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES, chat_turns, get_prompt_style, prompt_style_of_data  # noqa: E402
from lit_llama.quantize import check_generate_quantize, quantize_for_generation  # noqa: E402
from lit_llama.runs import FINAL_NAMES, read_json, run_card, run_method  # noqa: E402
from lit_llama.serving import BatchWorker, WorkerFailed, serve  # noqa: E402
from lit_llama.tokenizer import Tokenizer  # noqa: E402

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what the server binds to: this machine only, or every interface
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256  # characters of a stop string: the stop test of every row at every step costs its length
# a request body past this is refused before it is read: a prompt that fits a LLaMA context (2048 to 4096 tokens)
# is some 10 to 20 KB of text, and reading, parsing and tokenizing 60 MB bodies would hold up every other client
MAX_BODY_BYTES = 1 << 20
# temperatures below this decode greedily: dividing the logits by 1e-45 gives infinities, and sampling then fails;
# at 0.001 a difference of 0.01 between two logits is already a factor of e^10 in their probabilities
MIN_TEMPERATURE = 1e-3
WEB = Path(__file__).resolve().parent / "lit_llama" / "web"  # the comparison page: HTML, CSS and JavaScript
RACY_SECONDS = 2  # the coarsest time step of a common file system (FAT's 2 s); see AdapterFolder.version


def main(
    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B"),
    lora_dir: Optional[Path] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    max_new_tokens: int = 256,
    top_k: Optional[int] = 200,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    runs: Optional[List[Path]] = None,
    swap: str = "unmerged",
    max_device_adapters: Optional[int] = None,
    max_host_adapters: Optional[int] = None,
) -> None:
    """Serves the base model, LoRA files and finetune runs through OpenAI's API, with a comparison page at /.

    The page (lit_llama/web/) puts one prompt to two to four of the models and shows their answers side by side,
    with the runs' training curves and settings.

    Args:
        checkpoint_dir: The base model folder every LoRA file was trained on.
        lora_dir: The folder of LoRA files (finetune/lora.py's), one adapter per file, named by its file name
            without .pth: `model: "alpaca"` in a request is alpaca.pth. Files added while serving are picked up.
            A leaf of a LoRA tree is served with its ancestors (the files it records; howto/lora_tree.md).
            Default: adapters, or, with --runs, no folder.
        host: 127.0.0.1 (this machine only), 0.0.0.0 or :: (every network interface: anyone who can reach
            the machine can use the server; it has no authentication).
        port: The port to listen on (1024 to 65535).
        max_batch_size: The most requests decoded together in one batch (whatever their adapters).
        batch_timeout: Seconds the model waits for more requests to fill a batch, once free; more than 0
            (with 0, requests sent together would rarely share a batch).
        max_new_tokens: The most new tokens of an answer when a request gives no max_tokens.
        top_k: Sample only among the k most likely tokens when a request gives no top_k (null: all tokens).
        precision: 32-true, 16-true or bf16-true (default: bf16-true on a GPU that has it, else 32-true).
        quantize: int8 (CPU or GPU) or int4 (CUDA GPUs): weight-only quantized base weights, through torchao
            (the adapters stay in the model's dtype).
        compile: torch.compile the prefill and the decode step: faster decoding once compiled; the first
            batches of each size compile.
        runs: Finished finetune run folders to serve too, each as the model named by its folder's name: the
            --out_dir of finetune/lora.py, finetune/adapter.py or finetune/full.py (scripts/compare.py's
            out/compare/lora, ...). A LoRA run is served in the same batches as --lora_dir's files; an adapter
            or a full finetune is a model of its own, loaded beside the base (memory: a full finetune is a
            whole model). The comparison page at / shows each run's training curves (its metrics.csv) and
            settings. Example: --runs '[out/compare/lora, out/compare/adapter]'.
        swap: unmerged (every batch through the adapters' stacks) or merged (a batch whose requests all name one
            adapter runs with it merged into the base weights, as fast as the base; mixed batches run unmerged;
            the base weights are restored bit for bit). Not with --quantize.
        max_device_adapters: LoRA adapters kept on the device at once, least recently used out (null: all); at
            least --max_batch_size, so that every batch fits.
        max_host_adapters: LoRA adapters kept in host memory (null: all), at least --max_device_adapters; the
            others are read from their files again when a request names them. A LoRA tree's nodes count one each.
    """
    # every flag and file is checked before anything loads: a mistake is one line, not a server that dies later
    check_range("port", port, 1024, 65535)  # the ports below need root
    if host not in HOSTS:
        raise UserError(f"--host {host!r} is not one of {', '.join(HOSTS)}")
    check_at_least("max_batch_size", max_batch_size, 1)
    check_range("batch_timeout", batch_timeout, 0, 60, low_inclusive=False)
    check_at_least("max_new_tokens", max_new_tokens, 1)
    check_at_least("top_k", top_k, 1, optional=True)
    precision_dtype(precision)
    check_cache_flags(swap, max_device_adapters, max_host_adapters)
    if swap == "merged" and quantize:
        raise UserError("--swap merged needs the base weights unquantized (an adapter is merged into them): "
                        "drop --quantize or use --swap unmerged")
    if max_device_adapters is not None and max_device_adapters < max_batch_size:
        raise UserError(f"--max_device_adapters {max_device_adapters} is less than --max_batch_size {max_batch_size}: "
                        "a batch may name that many adapters; raise it or lower --max_batch_size")
    check_generate_quantize(quantize)
    if lora_dir is None and not runs:
        lora_dir = Path("adapters")
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise UserError(f"--lora_dir {lora_dir} is not a folder")
    paths = resolve_checkpoint(checkpoint_dir)
    check_vocab(Tokenizer(paths.tokenizer), paths)
    if max_new_tokens > paths.config.context_length:
        raise UserError(f"--max_new_tokens {max_new_tokens} is more than the model's context of "
                        f"{paths.config.context_length} tokens")
    served = served_runs(runs or [], paths)
    folder = AdapterFolder(lora_dir and Path(lora_dir), paths,
                           {name: run.final for name, run in served.items() if run.method == "lora"})
    clash = sorted(set(served) & {p.stem for p in Path(lora_dir).glob("*.pth")}) if lora_dir else []
    if clash:
        raise UserError(f"--runs: the run {clash[0]!r} has the name of a LoRA file in --lora_dir {lora_dir}: "
                        "rename one of them")
    for name in folder.names():
        folder.check(name)  # each file read and checked now
    models = OpenAIEndpoints.model_names(folder, served)
    check_port_free(host, port)

    cache = dict(swap=swap, max_device_adapters=max_device_adapters, max_host_adapters=max_host_adapters)
    worker = BatchWorker(LoRAServer(paths, folder, precision, quantize, compile, served, cache), default_device().type,
                         max_batch_size, batch_timeout)
    app = FastAPI(title="lit-llama")
    OpenAIEndpoints(paths, folder, max_new_tokens, top_k, worker, served).add_to(app)
    add_comparison_page(app)
    print(f"Serving {', '.join(models)} on http://{host}:{port}/v1 (loading the model ...)", file=sys.stderr)
    error = serve(app, worker, host, port)  # a request waits in the queue as long as the batches before it take
    if error:
        raise UserError(error)


def add_comparison_page(app: FastAPI) -> None:
    """The comparison page at / (lit_llama/web/compare.html, its script and style under /web/). It speaks only
    to the endpoints above: /v1/models for the models, their settings and curves, /v1/chat/completions for the
    answers."""
    app.mount("/web", StaticFiles(directory=WEB), name="web")
    app.add_api_route("/", lambda: FileResponse(WEB / "compare.html"), methods=["GET"], include_in_schema=False)


@dataclass
class Run:
    """A finetune run folder served as a model (--runs)."""

    name: str
    method: str  # lora, adapter or full (lit_llama/runs.py)
    final: Path  # its final checkpoint
    prompt_style: str  # chat messages are put in it
    card: Dict[str, Any]  # what the comparison page shows: settings and curves (`run_card`)


def served_runs(run_dirs: List[Path], paths: CheckpointPaths) -> Dict[str, Run]:
    """--runs read and checked: each folder a finished run trained on this base, the names unique."""
    served: Dict[str, Run] = {}
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise UserError(f"--runs: {run_dir} is not a folder")
        name = run_dir.resolve().name
        if name == BASE or name in served:
            raise UserError(f"--runs: two models would be named {name!r} (a run is named by its folder): "
                            "serve runs from folders of different names")
        method = run_method(run_dir)
        final = run_dir / FINAL_NAMES[method]
        style = DEFAULT_PROMPT_STYLE
        if method == "lora":
            style = read_lora_factors(final, paths.config, paths.weights)[1]
        elif method == "adapter":
            checkpoint = load_state_dict(final)
            adapter_config_from_checkpoint(checkpoint, paths.config, final)  # trained on a base of this shape
            style = adapter_prompt_style(checkpoint, final)
        else:
            if final.is_dir():
                raise UserError(f"--runs: {final} is sharded (FSDP): serve.py reads one-file full finetunes; "
                                "finetune with --devices 1, or without sharded saving")
            check_vocab(Tokenizer(paths.tokenizer), resolve_checkpoint(checkpoint_path=final))
            data_dir = (read_json(run_dir / RUN_NAME, "").get("training") or {}).get("data_dir") \
                if (run_dir / RUN_NAME).is_file() else None
            style = prompt_style_of_data(Path(data_dir)) if data_dir else DEFAULT_PROMPT_STYLE
        served[name] = Run(name, method, final, style, run_card(run_dir))
    return served


def check_port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if host == "::" else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"--port {port} on {host} cannot be used: {e.strerror}")


class AdapterFolder:
    """The LoRA files of a folder, one adapter per file, named by its stem. The folder is listed again for
    every request (a glob: cheap), so files added while serving are found; a file's version is the hash of its
    content (`version`), so a file changed is read again, even when it keeps its size and modification time."""

    def __init__(self, folder: Optional[Path], paths: CheckpointPaths, runs: Optional[Dict[str, Path]] = None) -> None:
        self.folder, self.paths = folder, paths
        self.runs = dict(runs or {})  # name -> LoRA file of a run folder (--runs): served beside the folder's
        self.checked: Dict[str, Tuple[str, str]] = {}  # name -> (version checked, prompt style)
        self.hashed: Dict[str, Tuple[Tuple[int, ...], str, int]] = {}  # name -> (file status, version, hashed at)

    def names(self) -> List[str]:
        files = self.folder.glob("*.pth") if self.folder else []  # no folder: the LoRA runs of --runs only
        return sorted({*self.runs, *(p.stem for p in files if p.is_file() and p.stem != BASE)})

    def path(self, name: str) -> Path:
        return self.runs[name] if name in self.runs else self.folder / f"{name}.pth"

    def version(self, name: str) -> str:
        """The SHA-256 of the file's content. Hashed again only when the file's status (inode, size, modification
        and change times) differs from when it was last hashed, or when its last change came less than
        RACY_SECONDS before that hash (as git does: a file system keeps times in coarse steps, so a rewrite just
        after the hash could keep every time). The change time cannot be set back (touch sets the modification
        time only), so a file replaced later always has another status."""
        path = self.path(name)
        stat = path.stat()
        status = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        known = self.hashed.get(name)
        if known and known[0] == status and known[2] - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_SECONDS * 1e9:
            return known[1]
        hashed_at = time.time_ns()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.hashed[name] = (status, digest.hexdigest(), hashed_at)
        return digest.hexdigest()

    def check(self, name: str) -> Tuple[Path, str, str]:
        """The adapter's file, version and prompt style, after the checks of loading it on this base (its fields,
        the base it was trained on, shapes, DoRA refused: `read_lora_factors`), done once per version; UserError
        if it cannot be served."""
        if name not in self.names():  # only names listed in the folder: a name can never reach another path
            raise UserError(f"the model {name!r} does not exist: the models are {', '.join([BASE, *self.names()])} "
                            f"(the LoRA files in {self.folder})")
        path = self.path(name)
        try:
            version = self.version(name)
            if name not in self.checked or self.checked[name][0] != version:
                _, style = read_lora_factors(path, self.paths.config, self.paths.weights)
                self.checked[name] = (version, style)
        except OSError as e:  # removed or replaced just now
            raise UserError(f"{path} could not be read: {e.strerror or e}")
        return path, version, self.checked[name][1]


# ---------------------------------------------------------------- the model: the worker process


class LoRAServer:
    """Runs in the worker process (lit_llama/serving.py's BatchWorker): loads the base and the adapters in `setup`,
    then decodes each batch of queued requests (checked and tokenized by `OpenAIEndpoints`) with `stream_batch`,
    yielding every few tokens one output per request: its new text, and at its end the finish reason and token
    counts. The LoRA adapters share one model (`MultiLoRALLaMA`); an adapter or full finetune of --runs is a
    model of its own, whose rows are decoded apart."""

    def __init__(self, paths: CheckpointPaths, folder: AdapterFolder, precision: Optional[str], quantize: Optional[str],
                 compile: bool, runs: Optional[Dict[str, Run]] = None, cache: Optional[Dict[str, Any]] = None) -> None:
        self.paths, self.folder, self.precision, self.quantize, self.compile = paths, folder, precision, quantize, compile
        self.cache = cache or {}  # MultiLoRALLaMA's swap, max_device_adapters and max_host_adapters
        self.runs = {name: run for name, run in (runs or {}).items() if run.method != "lora"}

    def setup(self, device: str) -> None:
        self.torch_device = torch.device(device)
        self.tokenizer = Tokenizer(self.paths.tokenizer)
        # every token that ends an answer: eos, generation_config.json's eos_token_id (Llama 3's <|eot_id|> and
        # <|end_of_text|>), and the styles' stop texts this tokenizer has as one token (<|im_end|>)
        self.stop_ids = stop_ids(self.tokenizer, list(PROMPT_STYLES.values()))
        self.model = load_model(self.paths, self.torch_device, precision_dtype(self.precision), MultiLoRALLaMA,
                                **self.cache).eval()
        if self.quantize:  # the base's weights; the adapters' stacks stay in the model's dtype
            quantize_for_generation(self.model, self.quantize)
        self.loaded: Dict[str, str] = {}  # adapter name -> version of its file in the model
        for name in self.folder.names():
            try:
                version = self.folder.version(name)  # before reading: a file replaced meanwhile is read again later
                self.model.add_adapter(name, self.folder.path(name), self.paths.weights)
            except (UserError, OSError) as e:  # replaced or removed since main() checked it: requests say why
                print(f"the adapter {name!r} could not be loaded: {e}", file=sys.stderr)
                continue
            self.loaded[name] = version
        print(self.model.describe_memory(), file=sys.stderr)
        self.own_models: Dict[str, LLaMA] = {}  # adapter and full finetunes of --runs, by name
        dtype = precision_dtype(self.precision)
        for name, run in self.runs.items():
            if run.method == "adapter":
                model = load_adapter_model(self.paths, run.final, self.torch_device, dtype)
            else:
                model = load_model(resolve_checkpoint(checkpoint_path=run.final), self.torch_device, dtype)
            if self.quantize:
                quantize_for_generation(model, self.quantize)
            self.own_models[name] = model.eval()

    def predict(self, requests: List[Dict[str, Any]]) -> Iterator[List[Dict[str, Any]]]:
        rows = [Row(request, self.tokenizer, self.stop_ids) for request in requests]
        print(f"batch of {len(rows)}: {', '.join(row.adapter for row in rows)}", file=sys.stderr, flush=True)
        for row in rows:
            self.load_adapter(row)
        if any(row.error for row in rows):
            yield [row.take() for row in rows]
        # one decoding loop per sampling setting (most batches have one) and per model (the LoRA adapters share
        # one); each row its own adapter and limit
        groups: Dict[Tuple[str, float, Optional[int]], List[Row]] = {}
        for row in rows:
            if not row.error:
                groups.setdefault((self.model_key(row), row.temperature, row.top_k), []).append(row)
        for (_, temperature, top_k), group in groups.items():
            try:
                for chunk in self.decode(group, temperature, top_k):
                    for row, tokens in zip(group, chunk):
                        row.add(tokens)
                    yield [row.take() for row in rows]
            except Exception:  # noqa: BLE001 - a failure (a bug) ends this group's requests only, not the batch's
                traceback.print_exc()
                for row in group:
                    row.fail("the model failed on this request: see the server's log", status=500)
                yield [row.take() for row in rows]

    def decode(self, group: List["Row"], temperature: float, top_k: Optional[int]) -> Iterator[List[List[int]]]:
        """`stream_batch` for rows of one model and sampling setting, each with its own adapter, prompt and
        limit."""
        model = self.own_models.get(self.model_key(group[0]))
        if model is None:
            model = self.model
            model.select([row.adapter for row in group])
        prompts = [torch.tensor(row.prompt, device=self.torch_device) for row in group]
        yield from stream_batch(model, prompts, [row.max_tokens for row in group], temperature, top_k,
                                self.stop_ids, [row.stop_found if row.stops else None for row in group],
                                self.compile)

    def model_key(self, row: "Row") -> str:
        """The model a row is decoded with: its name for a model of its own, "" for the LoRA model."""
        return row.adapter if row.adapter in self.runs else ""

    def load_adapter(self, row: "Row") -> None:
        """Loads the row's adapter file if it is new or changed since it was loaded (hot load)."""
        if row.adapter == BASE or row.adapter in self.runs or self.loaded.get(row.adapter) == row.version:
            return
        try:
            self.model.add_adapter(row.adapter, Path(row.path), self.paths.weights)
            self.loaded[row.adapter] = row.version
        except (UserError, OSError) as e:  # the file changed or went away since the request was checked
            row.fail(f"the adapter {row.adapter!r} could not be loaded: {e}", status=400)
        except Exception:  # noqa: BLE001 - a bug (or no memory left) fails this request only, not its batch
            traceback.print_exc()
            row.fail(f"the adapter {row.adapter!r} could not be loaded: see the server's log", status=500)


class Row:
    """One request in a batch: its new tokens, and the text of them sent so far. The text is the whole answer
    decoded again after each chunk (SentencePiece pieces merge: decoding token by token would be wrong); what
    is new is sent, except an end that could still turn into a stop string or is half a UTF-8 character."""

    def __init__(self, request: Dict[str, Any], tokenizer: Tokenizer, stop_ids: Sequence[int]) -> None:
        self.__dict__.update(request)  # adapter, path, version, prompt, max_tokens, temperature, top_k, stops, strip
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.tokens: List[int] = []
        self.sent, self.pending = "", ""
        self.finish_reason: Optional[str] = None
        self.error: Optional[Dict[str, Any]] = None  # {"message", "status"} of a request that failed
        self.reported = False

    def fail(self, message: str, status: int) -> None:
        """Ends this request with an error (answered with `status`), unless it has already ended."""
        if not self.finish_reason and not self.error:
            self.error = {"message": message, "status": status}

    def text(self, tokens: List[int]) -> str:
        """The answer's text, decoded after the prompt's last token so that its first word keeps its leading
        space (SentencePiece drops it at the start of a text)."""
        context = self.prompt[-1:]
        return self.tokenizer.decode(context + tokens)[len(self.tokenizer.decode(context)):]

    def stop_found(self, tokens: torch.Tensor) -> bool:
        """`stream_batch`'s stop test for this row: a stop string in its text."""
        text = self.text(tokens.tolist())
        return any(stop in text for stop in self.stops)

    def add(self, new_tokens: List[int]) -> None:
        if self.finish_reason:
            return
        self.tokens.extend(new_tokens)
        end = next((i for i, token in enumerate(self.tokens) if token in self.stop_ids), None)
        text = self.text(self.tokens[:end] if end is not None else self.tokens)
        cut = min((text.find(stop) for stop in self.stops if stop in text), default=-1)
        if cut >= 0:
            text, self.finish_reason = text[:cut], "stop"
        elif end is not None:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        else:
            text = held_back(text, self.stops)
        if self.strip:  # chat answers: no surrounding whitespace (trailing whitespace waits for what follows)
            text = text.strip()
        if text.startswith(self.sent):
            self.pending += text[len(self.sent):]
            self.sent = text

    def take(self) -> Dict[str, Any]:
        """This step's output: the new text; at the end also the finish reason and token counts (once)."""
        if self.reported:
            return {}
        if self.error:
            self.reported = True
            return {"error": self.error["message"], "status": self.error["status"]}
        output, self.pending = {"text": self.pending}, ""
        if self.finish_reason:
            self.reported = True
            output.update(finish_reason=self.finish_reason, prompt_tokens=len(self.prompt),
                          completion_tokens=len(self.tokens))
        return output


def held_back(text: str, stops: List[str]) -> str:
    """`text` without an unfinished UTF-8 character (decoded as U+FFFD) or an end that begins a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - hold]


# ---------------------------------------------------------------- the HTTP side: this process


class ChatMessage(BaseModel):
    role: str
    content: Union[str, List[Dict[str, Any]]]  # text, or OpenAI's parts [{"type": "text", "text": ...}]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Params(BaseModel):
    """What both endpoints read; OpenAI's other fields are accepted and ignored (as vLLM does)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None  # not OpenAI's: vLLM's extension (`extra_body={"top_k": 50}`)
    n: int = 1
    stop: Union[str, List[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatParams(Params):
    messages: List[ChatMessage]
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name of max_tokens


class CompletionParams(Params):
    prompt: str


class RequestError(Exception):
    """A bad request: answered with this status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


class OpenAIEndpoints:
    """OpenAI's endpoints: /v1/chat/completions, /v1/completions and /v1/models. Each request is checked here
    (JSON, fields, the adapter, the prompt's length) so that only good ones are queued for the worker. Both
    answering endpoints share one queue: chat and completion requests are batched together."""

    def __init__(self, paths: CheckpointPaths, folder: AdapterFolder, max_new_tokens: int, top_k: Optional[int],
                 worker: BatchWorker, runs: Optional[Dict[str, Run]] = None) -> None:
        self.paths, self.folder, self.max_new_tokens, self.top_k = paths, folder, max_new_tokens, top_k
        self.worker, self.runs = worker, dict(runs or {})
        self.tokenizer = Tokenizer(paths.tokenizer)

    @staticmethod
    def model_names(folder: AdapterFolder, runs: Dict[str, Run]) -> List[str]:
        """The base, then the LoRA files and the runs by name."""
        return [BASE, *sorted({*folder.names(), *runs})]

    def add_to(self, app: FastAPI) -> None:
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])

    async def models(self) -> Dict[str, Any]:
        """OpenAI's model list. Each entry also says what the model is, for the comparison page: `lit_llama`
        holds its method (base, lora, adapter, full) and, for a run of --runs, its settings and training curves
        (`run`; null for a LoRA file of --lora_dir and the base). OpenAI's clients ignore the extra field."""
        def describe(name: str) -> Dict[str, Any]:
            run = self.runs.get(name)
            method = run.method if run else ("base" if name == BASE else "lora")
            return {"id": name, "object": "model", "created": 0, "owned_by": "lit-llama",
                    "lit_llama": {"method": method, "run": run.card if run else None}}

        return {"object": "list", "data": [describe(name) for name in self.model_names(self.folder, self.runs)]}

    async def chat_completions(self, request: Request) -> Any:
        return await self.answer(request, ChatParams)

    async def completions(self, request: Request) -> Any:
        return await self.answer(request, CompletionParams)

    async def answer(self, request: Request, kind: type) -> Any:
        try:
            params = await read_params(request, kind)
            # in a thread: tokenizing a long prompt or checking a new adapter file takes a while, and meanwhile
            # this process goes on answering other clients (/health too); SentencePiece releases the GIL
            job = await asyncio.to_thread(self.job, params)
        except RequestError as e:
            return e.response()
        outputs = self.submit(job)
        try:  # the first output before answering: an adapter that fails to load still gets its 4xx
            first = await outputs.__anext__()
        except RequestError as e:
            return e.response()
        chat = kind is ChatParams
        if params.stream:
            include_usage = bool(params.stream_options and params.stream_options.include_usage)
            return StreamingResponse(stream_events(params.model, chat, first, outputs, include_usage),
                                     media_type="text/event-stream")
        text, output = first.get("text", ""), first
        try:
            async for output in outputs:
                text += output.get("text", "")
        except RequestError as e:
            return e.response()
        return whole_answer(params.model, chat, text, output)

    def job(self, params: Params) -> Dict[str, Any]:
        """The checked request as the worker reads it, with the prompt's tokens; RequestError if it is bad."""
        if params.n != 1:
            raise RequestError(400, f"n must be 1 (one answer per request), got {params.n}", "n")
        if params.top_p != 1:
            raise RequestError(400, f"top_p must be 1 (sampling is cut by top_k here), got {params.top_p}", "top_p")
        if not 0 <= params.temperature <= 2:
            raise RequestError(400, f"temperature must be in [0, 2], got {params.temperature}", "temperature")
        if params.top_k is not None and params.top_k < 1:
            raise RequestError(400, f"top_k must be at least 1, got {params.top_k}", "top_k")
        max_tokens = getattr(params, "max_completion_tokens", None)
        max_tokens = params.max_tokens if max_tokens is None else max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        if len(stops) > MAX_STOP_STRINGS or not all(stops) or max(map(len, stops), default=0) > MAX_STOP_LENGTH:
            raise RequestError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_LENGTH} "
                                    f"characters, got {len(stops)} of lengths {[len(stop) for stop in stops]}", "stop")
        path, version, style = None, None, "alpaca"
        if params.model not in self.model_names(self.folder, self.runs):
            raise RequestError(404, f"the model {params.model!r} does not exist: the models are "
                                    f"{', '.join(self.model_names(self.folder, self.runs))}", "model", "model_not_found")
        if params.model in self.runs and self.runs[params.model].method != "lora":
            style = self.runs[params.model].prompt_style
        elif params.model != BASE:
            try:
                path, version, style = self.folder.check(params.model)
            except UserError as e:
                unknown = "does not exist" in str(e)
                raise RequestError(404 if unknown else 400, str(e), "model", "model_not_found" if unknown else None)
        if isinstance(params, ChatParams):
            try:
                turns = chat_turns(get_prompt_style(style), [message_text(m) for m in params.messages])
            except UserError as e:
                raise RequestError(400, str(e), "messages")
            prompt = [t for i, turn in enumerate(turns)
                      for t in self.tokenizer.encode(turn, bos=True, eos=i < len(turns) - 1).tolist()]
            stops = [*get_prompt_style(style).stop_strings, *stops]
        else:
            prompt = self.tokenizer.encode(params.prompt, bos=True).tolist()
        context = self.paths.config.context_length
        if len(prompt) >= context:
            raise RequestError(400, f"the prompt is {len(prompt)} tokens: the model's context is {context} tokens, "
                                    "answer included", "messages" if isinstance(params, ChatParams) else "prompt",
                               "context_length_exceeded")
        return {"adapter": params.model, "path": str(path) if path else None, "version": version, "prompt": prompt,
                "max_tokens": min(max_tokens or self.max_new_tokens, context - len(prompt)),
                "temperature": params.temperature if params.temperature >= MIN_TEMPERATURE else 0.0,
                "top_k": params.top_k or self.top_k, "stops": stops,
                "strip": isinstance(params, ChatParams)}

    async def submit(self, job: Dict[str, Any]) -> AsyncIterator[Dict[str, Any]]:
        """Queues the job for the worker; yields its outputs until its last (the one with a finish reason)."""
        try:
            async for output in self.worker.submit(job):
                if "error" in output:
                    raise RequestError(output["status"], output["error"], "model" if output["status"] < 500 else None)
                yield output
                if "finish_reason" in output:
                    return
        except WorkerFailed:  # an exception in the worker (its log has the traceback)
            raise RequestError(500, "the model failed on this request's batch: see the server's log")


async def read_params(request: Request, kind: type) -> Params:
    try:
        body = parse_json(await read_body(request), "the request body")
    except UserError as e:
        raise RequestError(400, str(e))
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return kind(**body)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        raise RequestError(400, f"{field}: {error['msg']}", field or None)


async def read_body(request: Request) -> bytes:
    """The request's body, refused (413) past MAX_BODY_BYTES before it is read: by its Content-Length, or, sent
    in chunks without one, as soon as it grows past the limit."""
    too_large = RequestError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def message_text(message: ChatMessage) -> Dict[str, str]:
    """A chat message as {"role", "content"} with text content (OpenAI's content parts joined)."""
    if isinstance(message.content, str):
        return {"role": message.role, "content": message.content}
    if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in message.content):
        raise RequestError(400, "only text content parts ({\"type\": \"text\", \"text\": ...}) are served", "messages")
    return {"role": message.role, "content": "".join(part["text"] for part in message.content)}


def response_head(model: str, chat: bool, chunk: bool = False) -> Dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": model}


def usage(output: Dict[str, Any]) -> Dict[str, int]:
    prompt, completion = output["prompt_tokens"], output["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def whole_answer(model: str, chat: bool, text: str, last: Dict[str, Any]) -> Dict[str, Any]:
    choice = {"index": 0, "finish_reason": last["finish_reason"], "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {**response_head(model, chat), "choices": [choice], "usage": usage(last)}


async def stream_events(model: str, chat: bool, first: Dict[str, Any], outputs: AsyncIterator[Dict[str, Any]],
                        include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: chunks of text, one with the finish reason, (the usage), [DONE]."""
    head = response_head(model, chat, chunk=True)  # one id for every chunk of the answer

    def event(text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    if chat:
        yield event("", role=True)
    output = first
    try:
        while True:
            if output.get("text"):
                yield event(output["text"])
            if "finish_reason" in output:
                break
            output = await outputs.__anext__()
    except RequestError as e:  # the answer has begun (status 200): the error goes in the stream, as OpenAI does
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': 'server_error'}})}\n\n"
        return
    yield event(None, output["finish_reason"])
    if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(output)})}\n\n"
    yield "data: [DONE]\n\n"


if __name__ == "__main__":
    run_cli(main)
