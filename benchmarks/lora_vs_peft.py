"""LoRA finetuning speed: our training step vs Hugging Face PEFT LoRA on the same model, same batches.

    python benchmarks/lora_vs_peft.py                       # CPU, a small LLaMA shape
    python benchmarks/lora_vs_peft.py --model_size 7B --device cuda --precision bf16-true --steps 10

Both sides get identical weights (ours converted to `LlamaForCausalLM` with lit_llama.convert), the same
LoRA settings (r 8, alpha 16, dropout 0.05 on query and value), the same AdamW, and the same micro-batches
of real Alpaca records tokenized with the real LLaMA tokenizer when ../shared has them (else random tokens
of Alpaca-like lengths). Our side runs the code finetune/lora.py runs (LoRALLaMA, pad_batch, compute_loss). The
two alternate step by step so both see the same machine load. Reports tokens/s (real, unpadded tokens),
step-0 losses (they must agree: same model) and peak memory, and appends a row to benchmarks/RESULTS.md.
"""

import platform
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, sync_time
from lit_llama.convert import lit_to_hf
from lit_llama.data import prepare_sample
from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer
from lit_llama.training import compute_loss, keep_trainable_in_fp32, pad_batch, peak_memory_gb
from lit_llama.utils import UserError, default_dtype, precision_dtype, run_cli

RESULTS_HEADER = """
## LoRA finetuning speed: lit-llama vs Hugging Face PEFT

`python benchmarks/lora_vs_peft.py`: training steps (forward, backward, AdamW) alternating between the two
implementations on identical weights and batches; LoRA r 8, alpha 16, dropout 0.05 on query and value.
Tokens are real (unpadded) tokens. Both step-0 losses must agree: same model, same batch.

| date | machine | model | precision | micro batch | data | lit-llama tokens/s | PEFT tokens/s | ratio | step-0 loss (ours / PEFT) |
|---|---|---|---|---|---|---|---|---|---|
"""

# a LLaMA shape small enough for a CPU: 4 layers of width 512, the real 32k vocabulary
SMALL = dict(n_layer=4, n_head=8, n_embd=512, intermediate_size=1376, vocab_size=32000, block_size=512)


def main(
    model_size: Optional[str] = None,
    micro_batch_size: int = 4,
    max_seq_length: int = 256,
    steps: int = 6,
    warmup_steps: int = 2,
    device: str = "cpu",
    precision: str = "32-true",
    data: str = "alpaca",
    data_file: Path = SHARED / "data" / "alpaca_sample.json",
    tokenizer_path: Path = SHARED / "tokenizers" / "llama" / "tokenizer.model",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> Dict[str, float]:
    """Times LoRA training steps of lit-llama and of PEFT side by side; returns the tokens/s of each.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        micro_batch_size: Examples per step.
        max_seq_length: Examples are cut to this many tokens (the article prepares Alpaca at 256).
        steps: Timed steps per implementation.
        warmup_steps: Untimed steps first.
        device: cpu or cuda.
        precision: 32-true, or bf16-true (frozen weights in bf16; our LoRA weights stay float32).
        data: alpaca (real records, loss on the response only, as finetune/lora.py trains by default) or
            random (random tokens, loss on every position: no prompt positions for us to skip).
        data_file: With --data alpaca: Alpaca-format JSON records (default: ../shared's sample, beside the repo).
        tokenizer_path: With --data alpaca: the LLaMA tokenizer (32,000 pieces; default: ../shared's).
        results_file: Markdown file to append the result row to (none: print only).
    """
    try:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise UserError(f"this benchmark compares against Hugging Face PEFT: pip install transformers peft ({e})")

    torch.manual_seed(0)
    dev, dtype = torch.device(device), precision_dtype(precision)
    config = Config.from_name(model_size) if model_size else Config(**SMALL)
    lora = LoRAConfig(r=8, alpha=16, dropout=0.05)
    batches, source = make_batches(config, micro_batch_size, max_seq_length, warmup_steps + steps, data, data_file,
                                   tokenizer_path)
    print(f"data: {source}")

    with dev, default_dtype(dtype):
        ours = LoRALLaMA(config, lora)
    mark_only_lora_as_trainable(ours)
    keep_trainable_in_fp32(ours)

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, attn_implementation="sdpa",
    )
    with dev, default_dtype(dtype):
        hf = LlamaForCausalLM(hf_config)
    base = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
    hf.load_state_dict(dict(lit_to_hf(base.items(), config)), strict=True)
    theirs = get_peft_model(hf, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=["q_proj", "v_proj"], bias="none"))
    copy_lora_weights(ours, theirs, config)  # same starting point, so the losses can be compared
    for model in (ours, theirs):
        model.train()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=3e-4)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=3e-4)

    def step_ours(input_ids, labels):
        loss = compute_loss(ours, input_ids, labels)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_theirs(input_ids, labels):
        loss = theirs(input_ids=input_ids, labels=labels).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss

    times = {"lit-llama": [], "peft": []}
    first_loss = {}
    tokens = [int(sum(n)) for _, _, n in batches]
    for i, (input_ids, labels, _) in enumerate(batches):
        input_ids, labels = input_ids.to(dev), labels.to(dev)
        for name, step in (("lit-llama", step_ours), ("peft", step_theirs)):
            torch.manual_seed(i)  # same dropout masks are not possible across implementations; same seeds are
            t0 = sync_time(dev)
            loss = step(input_ids, labels)
            elapsed = sync_time(dev) - t0
            first_loss.setdefault(name, loss.item())
            if i >= warmup_steps:
                times[name].append(elapsed)

    timed_tokens = sum(tokens[warmup_steps:])
    rate = {name: timed_tokens / sum(t) for name, t in times.items()}
    shape = model_size or "4x512 (32k vocab)"
    print(f"model {shape}, {precision}, micro batch {micro_batch_size}, {source}, {steps} timed steps")
    for name in times:
        print(f"  {name:10s} {rate[name]:8.0f} tokens/s  (median step {statistics.median(times[name]):.3f} s, "
              f"step-0 loss {first_loss[name]:.4f})")
    print(f"  ratio lit-llama / peft: {rate['lit-llama'] / rate['peft']:.2f}x; peak memory "
          f"{peak_memory_gb(dev):.2f} GB ({'GPU' if dev.type == 'cuda' else 'process RSS, both models'})")
    if results_file:
        machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        add_rows(results_file, RESULTS_HEADER, [
            f"| {date.today()} | {machine} | {shape} | {precision} | {micro_batch_size} | {source} | "
            f"{rate['lit-llama']:.0f} | {rate['peft']:.0f} | {rate['lit-llama'] / rate['peft']:.2f}x | "
            f"{first_loss['lit-llama']:.4f} / {first_loss['peft']:.4f} |"
        ])
    return rate


def make_batches(
    config: Config, micro_batch_size: int, max_seq_length: int, n: int, data: str, data_file: Path,
    tokenizer_path: Path,
) -> Tuple[list, str]:
    """Padded (input_ids, labels, lengths) micro-batches of real Alpaca records or of random tokens."""
    samples: List[dict]
    if data == "alpaca":
        for path, flag in ((data_file, "--data_file"), (tokenizer_path, "--tokenizer_path")):
            if not Path(path).is_file():
                raise UserError(f"--data alpaca: {flag} {path} not found; give the Alpaca records and the LLaMA "
                                "tokenizer, or use --data random")
        import json

        tokenizer = Tokenizer(tokenizer_path)
        if tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"--tokenizer_path {tokenizer_path} has {tokenizer.vocab_size} tokens, the model "
                            f"{config.vocab_size}")
        records = [{"input": "", **r} for r in json.loads(Path(data_file).read_text())]
        samples = [prepare_sample(r, tokenizer, max_seq_length) for r in records]
        source = f"real Alpaca records ({Path(data_file).name}), response-only loss"
    elif data == "random":
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(60, max_seq_length, (n * micro_batch_size,), generator=g)
        samples = []
        for length in lengths.tolist():
            ids = torch.randint(3, config.vocab_size, (length,), generator=g)
            samples.append({"input_ids": ids, "labels": ids.clone()})
        source = "random tokens, loss on all positions"
    else:
        raise UserError(f"--data {data!r} is not one of alpaca, random")
    batches = []
    for i in range(n):
        chunk = [samples[(i * micro_batch_size + j) % len(samples)] for j in range(micro_batch_size)]
        input_ids, labels = pad_batch(chunk, max_seq_length)
        batches.append((input_ids, labels, [min(len(s["input_ids"]), max_seq_length) for s in chunk]))
    return batches, source


def copy_lora_weights(ours: LoRALLaMA, theirs, config: Config) -> None:
    """Gives PEFT's q/v LoRA A and B our initial values (B is zero on both sides; A differs by seed)."""
    hf_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for i, block in enumerate(ours.transformer.h):
            layer = block.attn.c_attn
            (A_q, A_v), (B_q, B_v) = layer.lora_A.split(layer.r), layer.lora_B.split(layer.adapted_sizes)
            prefix = f"base_model.model.model.layers.{i}.self_attn"
            for proj, A, B in (("q_proj", A_q, B_q), ("v_proj", A_v, B_v)):
                hf_params[f"{prefix}.{proj}.lora_A.default.weight"].copy_(A)
                hf_params[f"{prefix}.{proj}.lora_B.default.weight"].copy_(B)



if __name__ == "__main__":
    run_cli(main)
