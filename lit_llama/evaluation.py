"""Evaluation: our model as lm-evaluation-harness's language model, and perplexity on a text file.

`LitLM` answers the three kinds of request lm-eval's tasks make:
- `loglikelihood(context, continuation)`: log P(continuation | context) and whether it is the greedy answer
  (multiple choice: the choice with the highest likelihood wins);
- `loglikelihood_rolling(text)`: log P(text), in windows of the model's context (perplexity tasks);
- `generate_until(context, until)`: greedy text until a stop string (generation tasks), through
  `lit_llama.generation`'s batched loop with the KV cache.
Texts are split into tokens exactly as lm-eval's Hugging Face backend (HFLM) splits them (its `TemplateLM`
does the splitting for both), so the two give the same loglikelihoods on the same model; tests/test_evaluation.py
checks it.

lm-eval is optional (`pip install lm-eval`, the `eval` extra): only scripts/evaluate.py and the tests import this
module, and the script says so in one line where the package is missing.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lit_llama.cli import UserError, describe_exception
from lit_llama.generation import generate_batch
from lit_llama.model import LLaMA
from lit_llama.tokenizer import Tokenizer

TASKS_DIR = Path(__file__).with_name("eval_tasks")  # the tasks this package ships (local data: run offline)


class LitLM(TemplateLM):
    """A lit-llama model (base, LoRA merged or adapter) and its tokenizer as an lm-eval LM.

    Args:
        model: The model, in eval mode, on its device.
        tokenizer: Its tokenizer.
        batch_size: Sequences per forward pass (loglikelihoods) or per generation batch.
        max_length: The longest sequence the model reads (default: its context length); longer inputs lose
            their left end, as in lm-eval's own backends.
    """

    def __init__(self, model: LLaMA, tokenizer: Tokenizer, batch_size: int = 8,
                 max_length: Optional[int] = None) -> None:
        super().__init__()
        self.model, self.lit_tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = max_length or model.config.context_length
        self.model_device = next(model.parameters()).device

    # --- tokens, as lm-eval's Hugging Face backend makes them ---

    @property
    def eot_token_id(self) -> int:
        return self.lit_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) is conditioned on: bos, else eos (as HFLM)."""
        bos = self.lit_tokenizer.bos_id
        return bos if bos is not None else self.lit_tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> List[int]:
        """The tokens of `string`, with bos where the tokenizer begins texts with it (`add_special_tokens`
        None or True), but not twice: a text that already starts with the bos text gets no second one."""
        bos = add_special_tokens is not False
        bos_text = self.lit_tokenizer.decode([self.prefix_token_id]) if self.lit_tokenizer.bos_id is not None else None
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            bos = False
        return self.lit_tokenizer.encode(string, bos=bos).tolist()

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.lit_tokenizer.decode(list(tokens))

    # --- loglikelihoods ---

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: List[Tuple[Any, List[int], List[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> List[Tuple[float, bool]]:
        """(log P(continuation tokens | context tokens), greedy?) per request, `batch_size` sequences per
        forward pass: the longest first, right-padded (padding after the last real token is never seen by the
        causal mask), logits only at the continuation's positions."""
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        inputs = []
        for _, context, continuation in requests:
            # the model reads context + continuation without its last token; the last max_length of them
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]
            inputs.append((tokens, continuation))
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i][0]))
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood batches", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            T = len(inputs[batch[0]][0])
            idx = torch.zeros(len(batch), T, dtype=torch.long)
            scored = torch.zeros(len(batch), T, dtype=torch.bool)  # the positions that predict the continuation
            for row, i in enumerate(batch):
                tokens, continuation = inputs[i]
                idx[row, : len(tokens)] = torch.tensor(tokens)
                scored[row, len(tokens) - len(continuation) : len(tokens)] = True
            # logits only where the continuation is predicted: (scored positions, vocab), row after row
            logits = self.model(idx.to(self.model_device), output_mask=scored.to(self.model_device))
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            offset = 0
            for i in batch:
                continuation = inputs[i][1]
                rows = logprobs[offset : offset + len(continuation)]
                offset += len(continuation)
                targets = torch.tensor(continuation)
                total = rows.gather(1, targets.unsqueeze(1)).sum().item()
                results[i] = (total, bool((rows.argmax(dim=-1) == targets).all()))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: Iterable[Any], disable_tqdm: bool = False) -> List[float]:
        """log P(text) per request: the text's tokens in disjoint windows of `max_length`, each window's first
        token conditioned on the prefix token (lm-eval's windows, as its Hugging Face backend makes them)."""
        texts = [request.args[0] for request in requests]
        return [total for total, _ in self.rolling(texts)]

    def rolling(self, texts: Sequence[str]) -> List[Tuple[float, int]]:
        """(log P(text), its number of tokens) per text; the windows of every text batched together."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            tokens = self.tok_encode(text)
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [[0.0, 0] for _ in texts]
        for i, (window, (logprob, _)) in zip(owner, zip(windows, self._loglikelihood_tokens(windows))):
            totals[i][0] += logprob
            totals[i][1] += len(window[2])
        return [(total, count) for total, count in totals]

    # --- generation ---

    def generate_until(self, requests: Iterable[Any], disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, where the task asks) text per (context, {"until": [...], "max_gen_toks": n}),
        cut before the first stop string; requests with the same settings run as one batch of `batch_size`."""
        requests = list(requests)
        results: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for key, members in groups.items():
            settings = GenerationSettings.from_lm_eval(json.loads(key), self.tok_decode([self.eot_token_id]))
            # the context keeps its right end, leaving room for the answer
            room = max(1, self.max_length - settings.max_new_tokens)
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for start in tqdm(range(0, len(members), self.batch_size), desc="generation batches",
                              disable=disable_tqdm):
                batch = members[start : start + self.batch_size]
                prompts = [torch.tensor(self.tok_encode(requests[i].args[0])[-room:], device=self.model_device)
                           for i in batch]
                stop = settings.stop_check(self.lit_tokenizer)
                outputs = generate_batch(self.model, prompts, settings.max_new_tokens, settings.temperature,
                                         None, self.lit_tokenizer.stop_ids, [stop] * len(batch))
                for i, prompt, output in zip(batch, prompts, outputs):
                    results[i] = settings.cut(self.lit_tokenizer.decode(output[prompt.size(0) :]))
        return results  # type: ignore[return-value]


@dataclass
class GenerationSettings:
    """A generation task's settings (lm-eval's gen_kwargs) in the terms of `lit_llama.generation`."""

    until: List[str]
    max_new_tokens: int
    temperature: float

    @classmethod
    def from_lm_eval(cls, gen_kwargs: Dict[str, Any], eot_text: str) -> "GenerationSettings":
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if eot_text and eot_text not in until:
            until.append(eot_text)
        sampled = gen_kwargs.get("do_sample", False)
        temperature = float(gen_kwargs.get("temperature", 1.0 if sampled else 0.0)) if sampled else 0.0
        return cls(until, int(gen_kwargs.get("max_gen_toks", 256)), temperature)

    def cut(self, text: str) -> str:
        """The text before the first stop string."""
        for stop in self.until:
            if stop:
                text = text.split(stop)[0]
        return text

    def stop_check(self, tokenizer: Tokenizer) -> Callable[[torch.Tensor], bool]:
        """For the decoding loop: has a stop string appeared in the new tokens yet?"""
        stops = [stop for stop in self.until if stop]
        return lambda new: any(stop in tokenizer.decode(new) for stop in stops)


# --- perplexity on a text file ---


def perplexity(lm: LitLM, path: Path) -> Dict[str, Any]:
    """The model's perplexity on a UTF-8 text file, in lm-eval's rolling windows of `lm.max_length` tokens:
    exp(-log P(text) / tokens), with bits per byte (independent of the tokenizer) beside it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--perplexity_file {path} cannot be read as UTF-8 text ({describe_exception(e)})")
    if not text.strip():
        raise UserError(f"--perplexity_file {path} is empty: give a text to measure perplexity on")
    logprob, tokens = lm.rolling([text])[0]
    return {"file": str(path), "tokens": tokens, "bytes": len(text.encode("utf-8")),
            "nll_per_token": -logprob / tokens, "perplexity": math.exp(-logprob / tokens),
            "bits_per_byte": -logprob / math.log(2) / len(text.encode("utf-8")), "window": lm.max_length}


# --- tasks ---


def task_manager(task_names: Sequence[str], include_path: Sequence[Path] = ()) -> Any:
    """lm-eval's TaskManager for `task_names`: this package's tasks and the user's folders (`include_path`) first;
    lm-eval's own catalogue (thousands of YAML files, 10-20 s to index) only when a name is not among those.
    A name found nowhere is a UserError naming it (and names close to it)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_path)]
    local = TaskManager(include_path=paths, include_defaults=False)
    wanted = [name for name in task_names if not is_task_file(name)]
    if all(name in local.all_tasks for name in wanted):
        return local
    # a name written in none of lm-eval's task files is refused at once, before the slow index
    texts = [path.read_text(errors="ignore") for path in catalogue_files()]
    unknown = [name for name in wanted if name not in local.all_tasks and not any(name in text for text in texts)]
    manager = None
    if not unknown:
        manager = TaskManager(include_path=paths)
        unknown = [name for name in wanted if name not in manager.all_tasks]
    if unknown:
        names = sorted({m.group(1) for text in texts for m in re.finditer(r"^task:\s*['\"]?([\w.-]+)", text, re.M)})
        close = [name for name in [*local.all_tasks, *names] if unknown[0].lower()[:6] in name.lower()][:5]
        raise UserError(f"--tasks: no task named {unknown[0]!r} in lm-eval, this package's tasks "
                        f"({', '.join(local.all_tasks)}) or --include_path"
                        + (f"; similar names: {', '.join(close)}" if close else ""))
    return manager


def catalogue_files() -> List[Path]:
    """lm-eval's own task files (thousands: reading them as text takes a second, parsing them 10-20 s)."""
    import lm_eval.tasks

    return sorted(Path(lm_eval.tasks.__file__).parent.rglob("*.yaml"))


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


OFFLINE_HINTS = ("offline", "couldn't reach", "could not reach", "connection", "resolve", "network", "timed out",
                 "doesn't exist on the hub", "not found on the hub", "cannot find the requested files")


def load_tasks(task_names: Sequence[str], manager: Any) -> Dict[str, Any]:
    """The tasks by name, built (their documents read, which `run_tasks` then finds in the datasets cache): a task
    file that does not exist, or a dataset that cannot be reached (no network, or HF_DATASETS_OFFLINE=1 and not in
    the local cache), is one UserError."""
    from lm_eval.tasks import get_task_dict

    for name in task_names:
        if is_task_file(name) and not Path(name).is_file():
            raise UserError(f"--tasks: the task file {name} does not exist")
    try:
        if hasattr(manager, "load"):  # newer lm-eval (0.4.13 has it): flat dicts of tasks and groups
            return manager.load(list(task_names))["tasks"]
        return get_task_dict(list(task_names), manager)
    except Exception as e:  # noqa: BLE001 - datasets' and lm-eval's many errors, turned into one line
        message = describe_exception(e)
        if any(hint in message.lower() for hint in OFFLINE_HINTS) or "Connection" in type(e).__name__:
            offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")
            raise UserError(
                f"--tasks {','.join(task_names)}: a task's dataset cannot be reached "
                + ("(HF_DATASETS_OFFLINE=1 and it is not in the local cache)" if offline else "(no network?)")
                + f": {first_dataset_name(message)}; use a task whose documents are local files "
                "(this package's, or a YAML with dataset_path: json and local data_files)")
        raise UserError(f"--tasks {','.join(task_names)}: the task could not be loaded ({message})")


def first_dataset_name(message: str) -> str:
    """The dataset a datasets error names, for the one-line error (else the message, shortened)."""
    quoted = re.search(r"['\"]([\w.-]+/[\w.-]+)['\"]", message)
    return f"dataset {quoted.group(1)}" if quoted else message[:160]


def run_tasks(lm: LitLM, task_names: Sequence[str], manager: Any, limit: Optional[int] = None,
              num_fewshot: Optional[int] = None, seed: int = 1234) -> Dict[str, Dict[str, Any]]:
    """lm-eval's evaluation of `lm` on the tasks: per task (and group), {"metrics": {name: value}, "stderr":
    {name: standard error}, "documents": how many were scored}."""
    from lm_eval.evaluator import simple_evaluate

    out = simple_evaluate(model=lm, tasks=list(task_names), task_manager=manager, limit=limit,
                          num_fewshot=num_fewshot, bootstrap_iters=1000, log_samples=False, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    results = {}
    for task, values in out["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            name = key.split(",")[0]  # "acc,none": the metric and lm-eval's filter
            if name.endswith("_stderr"):
                if isinstance(value, (int, float)):
                    stderr[name.removesuffix("_stderr")] = value
            elif isinstance(value, (int, float)) and name != "sample_len":  # (lm-eval counts documents there)
                metrics[name] = value
        documents = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = {"metrics": metrics, "stderr": stderr, "documents": documents}
    return results
