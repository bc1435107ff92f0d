"""Answer a file of requests, each with its own LoRA adapter (or the base model), on one base model in batches.

    python generate/multi_lora.py --checkpoint_dir checkpoints/lit-llama/open_llama_3b \
        --lora alpaca=out/lora/alpaca/lit-llama-lora-finetuned.pth --lora dolly=out/lora/dolly/lit-llama-lora-finetuned.pth \
        --requests requests.jsonl

Each line of the requests file is {"adapter": NAME or "base", "instruction": ..., "input": ...} ("input"
optional). The base weights are loaded once and never merged; every batch mixes requests for different
adapters, each row computed with its own (lit_llama/multi_lora.py) and prompted in the style that adapter was trained
with (recorded in its LoRA file; Alpaca for the base). Prints one JSON line per request, in
the file's order: {"adapter", "instruction", "response"}. Greedy output (--temperature 0) is what
generate/lora.py gives for the same instruction with that adapter merged.

With --swap merged, a batch whose requests all name one adapter runs with it merged into the base, at the base
model's speed (consecutive requests for one adapter make such batches); a mixed batch runs unmerged as above,
and the base weights come back bit for bit after each merge. --max_device_adapters and --max_host_adapters
bound the adapter cache (device slots over host memory, least recently used out); what each level holds is
printed to stderr at the end.
"""

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.checkpoint import load_model, resolve_checkpoint
from lit_llama.cli import UserError, check_at_least, normalize_repeated_flag, run_cli
from lit_llama.generation import check_sampling_flags, generate_responses, setup_generation
from lit_llama.json_input import parse_json
from lit_llama.multi_lora import BASE, MultiLoRALLaMA, check_cache_flags, read_lora_factors
from lit_llama.prompts import DEFAULT_PROMPT_STYLE, get_prompt_style
from lit_llama.quantize import check_generate_quantize, quantize_for_generation


def main(
    checkpoint_dir: Path = Path("checkpoints/lit-llama/7B"),
    lora: List[str] = [],
    requests: Path = Path("requests.jsonl"),
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    batch_size: int = 8,
    seed: int = 1234,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    swap: str = "unmerged",
    max_device_adapters: Optional[int] = None,
    max_host_adapters: Optional[int] = None,
) -> None:
    """Responds to every request of a JSON-lines file with the adapter it names.

    Args:
        checkpoint_dir: The base model folder every LoRA file was trained on.
        lora: NAME=PATH of a LoRA file written by finetune/lora.py; repeat the flag for each adapter. A leaf of a
            LoRA tree (howto/lora_tree.md) is its whole path; leaves sharing ancestors may share a batch.
        requests: JSON-lines file, one {"adapter", "instruction", "input"} object per line.
        max_new_tokens: The most tokens per response.
        temperature: Sampling temperature; 0 is greedy decoding.
        top_k: Sample only among the k most likely tokens.
        batch_size: Requests answered together in one batch (whatever their adapters).
        seed: Random seed, for repeatable samples.
        precision: 32-true, 16-true or bf16-true (default: bf16-true on a GPU that has it, else 32-true).
        quantize: int8 (CPU or GPU) or int4 (CUDA GPUs): weight-only quantized linear layers for generation,
            through torchao: a half or a quarter of the bf16 weight bytes to read per token.
        compile: torch.compile the prefill and the decode step (a static KV cache, no host sync per token, CUDA
            graphs on a GPU): faster decoding once compiled; the first batch of each size compiles.
        swap: unmerged (every batch through the adapters' stacks) or merged (a batch of one adapter runs with it
            merged into the base weights, as fast as the base; mixed batches run unmerged; the base weights are
            restored exactly). Not with --quantize.
        max_device_adapters: Adapters kept on the device at once, least recently used out (null: all); a batch
            may name at most this many.
        max_host_adapters: Adapters kept in host memory (null: all), at least --max_device_adapters; the others
            are read from their files again when a batch needs them. A LoRA tree's nodes count one each.
    """
    adapters = parse_adapters(lora)
    check_cache_flags(swap, max_device_adapters, max_host_adapters)
    if swap == "merged" and quantize:
        raise UserError("--swap merged needs the base weights unquantized (an adapter is merged into them): "
                        "drop --quantize or use --swap unmerged")
    check_sampling_flags(1, max_new_tokens, temperature, top_k, seed)
    check_generate_quantize(quantize)
    check_at_least("batch_size", batch_size, 1)
    records = read_requests(requests, adapters)
    for start in range(0, len(records), batch_size):  # before anything loads: no batch may fail halfway
        batch = records[start : start + batch_size]
        names = {r["adapter"] for r in batch} - {BASE}
        if max_device_adapters is not None and len(names) > max_device_adapters:
            raise UserError(f"{requests}: requests {start + 1} to {start + len(batch)} (one batch) name {len(names)} "
                            f"adapters, more than --max_device_adapters {max_device_adapters} holds: raise it or "
                            "lower --batch_size")
    paths = resolve_checkpoint(checkpoint_dir)
    tokenizer, device, dtype = setup_generation(paths, precision, "", max_new_tokens)  # prompts: checked below
    styles = {BASE: get_prompt_style(DEFAULT_PROMPT_STYLE)}  # each adapter's, from its file: as it was trained
    for name, path in adapters.items():  # every LoRA file checked (fields, base, shapes) before the model loads
        styles[name] = get_prompt_style(read_lora_factors(path, paths.config, paths.weights)[1])
    for number, record in enumerate(records, 1):
        prompt = styles[record["adapter"]].prompt(record["instruction"], record["input"])
        length = len(tokenizer.encode(prompt, bos=True))
        if length >= paths.config.block_size:
            raise UserError(f"{requests} line {number}: the prompt has {length} tokens, the model's context "
                            f"is {paths.config.block_size}")

    model = load_model(paths, device, dtype, MultiLoRALLaMA, swap=swap, max_device_adapters=max_device_adapters,
                       max_host_adapters=max_host_adapters).eval()
    if quantize:  # the base's weights; the adapters' stacks stay in the model's dtype
        quantize_for_generation(model, quantize)
    for name, lora_path in adapters.items():
        model.add_adapter(name, lora_path, paths.weights)

    torch.manual_seed(seed)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        model.select([r["adapter"] for r in batch])
        responses = generate_responses(model, tokenizer, [(r["instruction"], r["input"]) for r in batch], device,
                                       max_new_tokens, temperature, top_k,
                                       [model.prompt_styles[r["adapter"]] for r in batch], compile)
        for record, response in zip(batch, responses):
            print(json.dumps({"adapter": record["adapter"], "instruction": record["instruction"],
                              "response": response}), flush=True)
    print(model.describe_memory(), file=sys.stderr)


def parse_adapters(lora: List[str]) -> Dict[str, Path]:
    adapters = {}
    for item in lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora {item!r}: expected NAME=PATH")
        if name == BASE:
            raise UserError(f"--lora {item!r}: the name {BASE!r} means no adapter; choose another")
        if name in adapters:
            raise UserError(f"--lora {item!r}: the name {name!r} is given twice")
        if not Path(path).is_file():
            raise UserError(f"--lora {item!r}: {path} does not exist")
        adapters[name] = Path(path)
    return adapters


def read_requests(path: Path, adapters: Dict[str, Path]) -> List[Dict[str, str]]:
    """The requests file's records, checked: UTF-8 lines of JSON objects (`parse_json`) with a string
    "instruction" and an adapter that was loaded (or "base")."""
    if not Path(path).is_file():
        raise UserError(f"--requests {path} does not exist")
    records = []
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path} line {number}")
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise UserError(f'{path} line {number}: expected an object with a string "instruction"')
        adapter = record.get("adapter", BASE)
        if not isinstance(adapter, str):
            raise UserError(f'{path} line {number}: "adapter" must be a name (a string), got {adapter!r}')
        if adapter != BASE and adapter not in adapters:
            known = ", ".join([BASE, *adapters])
            raise UserError(f"{path} line {number}: unknown adapter {adapter!r} (loaded: {known})")
        if not isinstance(record.get("input", ""), str):
            raise UserError(f'{path} line {number}: "input" must be a string')
        records.append({"adapter": adapter, "instruction": record["instruction"], "input": record.get("input", "")})
    if not records:
        raise UserError(f"--requests {path} holds no requests")
    return records


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *normalize_repeated_flag(sys.argv[1:], "--lora")]
    run_cli(main)
