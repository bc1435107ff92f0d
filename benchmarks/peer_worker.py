"""One implementation's side of benchmarks/peers.py, run in that implementation's own Python environment:

    PYTHON benchmarks/peer_worker.py IMPLEMENTATION SPEC_JSON

It builds the implementation's LoRA model from the shared weights (ours: the lit-llama checkpoint; the peers:
the same weights exported to Hugging Face format), batches the shared examples as that implementation's
documented training recipe does, and then waits for the driver's orders, one JSON line each on stdin:
{"do": "warmup"}, {"do": "chunk", "index": c, "of": n} (the c-th of n equal parts of its timed steps),
{"do": "memory"} (the step peak of its step with the most positions) and {"do": "quit"}. Each answer is one
stdout line starting with ANSWER; anything else a library prints is ignored by the driver. The implementations
take turns because only one of them is given an order at a time.

Only torch and the implementation's own packages are imported here (ours: lit_llama), so a peer's environment
needs nothing of ours.
"""

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.measure import step_peak_memory, sync_time  # noqa: E402 (torch only)

ANSWER = "@@peer "
IGNORE = -100  # the ignored label of all four implementations

Example = Dict[str, List[int]]  # input_ids and labels (labels not shifted: label t is token t's, or IGNORE)
Step = Tuple[Dict[str, torch.Tensor], int, int]  # the step's inputs, its real tokens, its positions


def pad(examples: List[Example], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded to the batch's longest example (inputs with 0, labels with IGNORE): the collate functions
    of lit-llama, litgpt and Hugging Face's DataCollatorForSeq2Seq."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (longest - len(e["input_ids"])) for e in examples], device=device)
    labels = torch.tensor([e["labels"] + [IGNORE] * (longest - len(e["labels"])) for e in examples], device=device)
    return ids, labels


def padded_steps(spec: Dict[str, Any], steps: List[List[int]], device: torch.device) -> List[Step]:
    out = []
    for indices in steps:
        examples = [spec["examples"][i] for i in indices]
        ids, labels = pad(examples, device)
        out.append(({"input_ids": ids, "labels": labels}, sum(len(e["input_ids"]) for e in examples), ids.numel()))
    return out


def build_ours(spec, device, dtype):
    from lit_llama.checkpoint import load_model, resolve_checkpoint
    from lit_llama.finetune import keep_trainable_in_fp32
    from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable
    from lit_llama.training import compute_loss

    lora = spec["lora"]
    model = load_model(resolve_checkpoint(Path(spec["lit_checkpoint"])), device, dtype, LoRALLaMA,
                       lora=LoRAConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"]))
    mark_only_lora_as_trainable(model)
    keep_trainable_in_fp32(model)  # as finetune/lora.py: bf16 base, float32 LoRA weights
    loss = lambda b: compute_loss(model, b["input_ids"], b["labels"], positions=b.get("positions"))  # noqa: E731
    return model, loss, ours_packed_steps if spec["pack"] else padded_steps


def ours_packed_steps(spec: Dict[str, Any], steps: List[List[int]], device: torch.device) -> List[Step]:
    """finetune's `--packing true`: each step's examples packed into one row without padding
    (lit_llama.batches.pack_batch), positions restarting at each example, attention example by example."""
    from lit_llama.batches import pack_batch

    out = []
    for indices in steps:
        samples = [{key: torch.tensor(spec["examples"][i][key]) for key in ("input_ids", "labels")} for i in indices]
        ids, labels, positions = pack_batch(samples, spec["max_seq_length"])
        inputs = {"input_ids": ids.to(device), "labels": labels.to(device), "positions": positions.to(device)}
        out.append((inputs, sum(len(spec["examples"][i]["input_ids"]) for i in indices), ids.numel()))
    return out


def build_peft(spec, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    lora = spec["lora"]
    hf = LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(hf, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                          target_modules=["q_proj", "v_proj"], bias="none"))
    # no attention_mask: right padding under a causal mask never reaches a real token, and a mask would take
    # SDPA off its fast causal path
    return model, lambda b: model(input_ids=b["input_ids"], labels=b["labels"]).loss, padded_steps


def hf_weights(spec, device, dtype) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.to(device, dtype) for k, v in load_file(str(Path(spec["hf_dir"]) / "model.safetensors")).items()}


def build_litgpt(spec, device, dtype):
    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
    from litgpt.utils import chunked_cross_entropy

    hf, lora = spec["hf_config"], spec["lora"]
    config = Config(
        name="peers", block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"], n_query_groups=hf["num_key_value_heads"],
        head_size=hf["hidden_size"] // hf["num_attention_heads"], rotary_percentage=1.0, parallel_residual=False,
        bias=False, norm_class_name="RMSNorm", norm_eps=hf["rms_norm_eps"], mlp_class_name="LLaMAMLP",
        intermediate_size=hf["intermediate_size"], rope_base=int(hf["rope_theta"]),
        lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], lora_query=True, lora_value=True,
    )
    state: Dict[str, torch.Tensor] = {}
    copy_weights_hf_llama(config, {}, state, hf_weights(spec, device, dtype))
    with device:
        model = GPT(config).to(dtype)
    model.load_state_dict(state, strict=False)  # the LoRA weights keep their initialisation (B = 0)
    mark_only_lora_as_trainable(model)
    model.max_seq_length = spec["max_seq_length"]

    def loss(b):  # litgpt/finetune/lora.py's step
        logits = model(b["input_ids"], lm_head_chunk_size=128)
        logits[-1] = logits[-1][..., :-1, :]
        return chunked_cross_entropy(logits, b["labels"][..., 1:])

    return model, loss, padded_steps


def build_torchtune(spec, device, dtype):
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3 import lora_llama3
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    hf, lora = spec["hf_config"], spec["lora"]
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    with device:
        model = lora_llama3(
            ["q_proj", "v_proj"], vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"], embed_dim=hf["hidden_size"],
            max_seq_len=hf["max_position_embeddings"], intermediate_dim=hf["intermediate_size"],
            norm_eps=hf["rms_norm_eps"], rope_base=int(hf["rope_theta"]), lora_rank=lora["r"],
            lora_alpha=lora["alpha"], lora_dropout=lora["dropout"]).to(dtype)
    state = hf_to_tune(hf_weights(spec, device, dtype), num_heads=hf["num_attention_heads"],
                       num_kv_heads=hf["num_key_value_heads"], dim=hf["hidden_size"], head_dim=head_dim)
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied embeddings: the same values
    model.load_state_dict(state, strict=False)
    set_trainable_params(model, get_adapter_params(model))
    loss_fn = CEWithChunkedOutputLoss()  # its LoRA recipes' loss: the output layer in 8 chunks
    model.set_num_output_chunks(loss_fn.num_output_chunks)

    def loss(b):  # recipes/lora_finetune_single_device.py's step: labels shifted left, IGNORE appended
        labels = torch.cat([b["labels"][:, 1:], torch.full_like(b["labels"][:, :1], IGNORE)], dim=1)
        extra = {k: b[k] for k in ("mask", "input_pos") if k in b}
        return loss_fn(model(b["input_ids"], **extra), labels)

    return model, loss, packed_steps if spec["pack"] else padded_steps


def packed_steps(spec: Dict[str, Any], steps: List[List[int]], device: torch.device) -> List[Step]:
    """torchtune's packing (`packed: True`): the same examples in the same order, concatenated into rows of
    max_seq_length (an example never split), micro_batch_size rows a step, a block-causal mask and positions
    restarting at each example."""
    from torchtune.data import padded_collate_packed
    from torchtune.datasets import PackedDataset

    examples = [{"tokens": spec["examples"][i]["input_ids"], "labels": spec["examples"][i]["labels"]}
                for indices in steps for i in indices]
    rows = list(PackedDataset(examples, max_seq_len=spec["max_seq_length"], padding_idx=0, split_across_pack=False))
    real = [0]  # real tokens per row: the same greedy filling as PackedDataset's, which does not report it
    for e in examples:
        if real[-1] + len(e["tokens"]) > spec["max_seq_length"]:
            real.append(0)
        real[-1] += len(e["tokens"])
    assert len(real) == len(rows), (len(real), len(rows))
    out, size = [], spec["micro_batch_size"]
    for start in range(0, len(rows), size):
        batch = padded_collate_packed(rows[start:start + size])
        inputs = {"input_ids": batch["tokens"].to(device), "labels": batch["labels"].to(device),
                  "input_pos": batch["input_pos"].to(device), "mask": batch["mask"].to(device)}
        out.append((inputs, sum(real[start:start + size]), batch["tokens"].numel()))
    return out


BUILDERS: Dict[str, Callable] = {"ours": build_ours, "peft": build_peft, "litgpt": build_litgpt,
                                 "torchtune": build_torchtune}


def answer(**fields: Any) -> None:
    print(ANSWER + json.dumps(fields), flush=True)


def main(implementation: str, spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    try:
        model, loss_fn, make_steps = BUILDERS[implementation](spec, device, dtype)
    except Exception as e:  # a peer that cannot be built here is a skip, said in one line
        answer(error=f"{type(e).__name__}: {e}".splitlines()[0], trace=traceback.format_exc())
        return
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["learning_rate"],
                                  weight_decay=spec["weight_decay"])
    warmup, timed = make_steps(spec, spec["warmup"], device), make_steps(spec, spec["timed"], device)

    def step(inputs: Dict[str, torch.Tensor]) -> float:
        loss = loss_fn(inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    answer(ready=True, steps=len(timed), trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    for line in sys.stdin:
        order = json.loads(line)
        if order["do"] == "quit":
            return
        if order["do"] == "memory":  # after the timing: on a CPU the tracking slows a step
            inputs = max(timed, key=lambda s: s[2])[0]
            answer(memory_gb=step_peak_memory(lambda: step(inputs), device))
            continue
        if order["do"] == "warmup":
            chosen = warmup
        else:
            n, c = len(timed), order["index"]
            chosen = timed[c * n // order["of"]:(c + 1) * n // order["of"]]
        losses, t0 = [], sync_time(device)
        for inputs, _, _ in chosen:
            torch.manual_seed(len(losses))
            losses.append(step(inputs))
        answer(seconds=sync_time(device) - t0, tokens=sum(s[1] for s in chosen),
               positions=sum(s[2] for s in chosen), steps=len(chosen), losses=losses)


if __name__ == "__main__":
    main(*sys.argv[1:3])
