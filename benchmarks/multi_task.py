"""Several LoRAs trained together in one run (finetune/multi_lora.py) against the same tasks trained one after
another (finetune/lora.py per task): tokens/s and the peak memory of a training step.

    python benchmarks/multi_task.py                              # CPU, the 4x512 shape of benchmarks/multi_lora.py
    python benchmarks/multi_task.py --model_size 7B --device cuda --precision bf16-true

For T = 2, 4 and 8 tasks (LoRA r 8 on query and value each), the same rows: per task `rows_per_task` rows of
random tokens, 64 to 128 long (loss on every position), per step:
- together: one MultiTaskLLaMA, one micro-batch of T x rows_per_task rows, each row through its task's LoRA
  (lit_llama/multi_task.py), one AdamW step over every task's LoRA;
- one after another: one LoRALLaMA per task (finetune/lora.py's model), each task's rows a micro-batch of its
  own, its own AdamW step; the T steps one after another.
Each arm's time is the median over `repeats` steps (after one untimed warm-up) of a whole training step
(forward, backward, optimizer). Peak memory: above what was allocated before the step (GPU: the allocator's
peak; CPU: the largest total of live tensors), for together the mixed step, for one after another the
largest single task's step. Appends the rows to benchmarks/RESULTS.md.
"""

import platform
import sys
from datetime import date
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_rows, median_seconds, step_peak_memory  # noqa: E402
from benchmarks.multi_lora import SMALL  # noqa: E402
from lit_llama.checkpoint import default_dtype  # noqa: E402
from lit_llama.cli import run_cli  # noqa: E402
from lit_llama.distributed import precision_dtype  # noqa: E402
from lit_llama.lora import LoRAConfig, LoRALLaMA, mark_only_lora_as_trainable  # noqa: E402
from lit_llama.model import Config  # noqa: E402
from lit_llama.multi_task import MultiTaskLLaMA  # noqa: E402
from lit_llama.training import compute_loss, pad_batch  # noqa: E402

RESULTS_HEADER = """
## Several LoRAs trained together vs one after another

`python benchmarks/multi_task.py`: T tasks (LoRA r 8 on query and value each), per task 2 rows of random
tokens (64-128 long, loss on every position) per step. Together: one micro-batch of all tasks' rows, each row
through its task's LoRA (finetune/multi_lora.py). One after another: each task's rows on its own LoRA model
(finetune/lora.py), T steps. Whole training steps (forward, backward, AdamW), median of the repeats. Peak: the
step's memory above what was allocated before it (one after another: its largest single step).

| date | machine | model | precision | tasks T | together tokens/s | one after another tokens/s | speedup | peak together | peak one after another |
|---|---|---|---|---|---|---|---|---|---|
"""


def main(
    model_size: Optional[str] = None,
    task_counts: List[int] = [2, 4, 8],
    rows_per_task: int = 2,
    repeats: int = 3,
    device: str = "cpu",
    precision: str = "32-true",
    results_file: Optional[Path] = REPO / "benchmarks" / "RESULTS.md",
) -> None:
    """Measures training T LoRAs together against one after another.

    Args:
        model_size: A named size from lit_llama/model.py (e.g. 7B); default: a 4-layer, 512-wide LLaMA.
        task_counts: Numbers of tasks T, one row each.
        rows_per_task: Rows of each task in a step.
        repeats: Timed steps per arm (the median is reported) after one untimed warm-up.
        device: cpu or cuda.
        precision: 32-true or bf16-true (the frozen base; the LoRAs train in float32 either way).
        results_file: Markdown file to add the rows to (none: print only).
    """
    dev, dtype = torch.device(device), precision_dtype(precision)
    config = Config.from_name(model_size) if model_size else Config(**SMALL)
    shape = model_size or "4x512 (32k vocab)"
    threads = torch.get_num_threads()
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {platform.machine()}, {threads} threads"
    lora = LoRAConfig(r=8, alpha=16, dropout=0.0)
    torch.manual_seed(0)
    with dev, default_dtype(dtype):
        alone_model = LoRALLaMA(config, lora)
    base_state = {k: v for k, v in alone_model.state_dict().items() if "lora_" not in k}
    for tasks in task_counts:
        g = torch.Generator().manual_seed(tasks)
        samples = []
        for i in range(tasks * rows_per_task):  # row i is task i % tasks (finetune/multi_lora.py's interleave)
            ids = torch.randint(3, config.vocab_size, (int(torch.randint(64, 129, (1,), generator=g)),), generator=g)
            samples.append({"input_ids": ids, "labels": ids.clone(), "task": i % tasks})
        batch = [t.to(dev) for t in pad_batch(samples, config.block_size)]
        task_ids = torch.tensor([s["task"] for s in samples], device=dev)
        per_task = [[t.to(dev) for t in pad_batch(samples[t::tasks], config.block_size)] for t in range(tasks)]
        tokens = sum(len(s["input_ids"]) for s in samples)

        with dev, default_dtype(dtype):
            together = MultiTaskLLaMA(config, [(f"t{t}", lora) for t in range(tasks)])
        together.load_state_dict(base_state, strict=False)
        together.reset_extra_parameters()
        for name, p in together.named_parameters():
            p.requires_grad = "lora_" in name
            if p.requires_grad:
                p.data = p.data.float()
        together_opt = torch.optim.AdamW([p for p in together.parameters() if p.requires_grad], lr=1e-4)

        def together_step() -> None:
            together.route_rows(task_ids)
            compute_loss(together, *batch, tasks=task_ids).backward()
            together_opt.step()
            together_opt.zero_grad(set_to_none=True)

        # one LoRA model per task would hold T copies of the base; the steps are the same on one model whose
        # LoRA weights are each task's in turn, so one model and one optimizer per task's LoRA tensors
        mark_only_lora_as_trainable(alone_model)
        for p in alone_model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        lora_params = [p for p in alone_model.parameters() if p.requires_grad]
        task_loras = [[p.detach().clone() for p in lora_params] for _ in range(tasks)]
        task_opts = [torch.optim.AdamW(weights, lr=1e-4) for weights in task_loras]

        def one_task_step(t: int) -> None:
            for p, w in zip(lora_params, task_loras[t]):  # the task's own LoRA (a pointer swap, no copy)
                p.data = w
            compute_loss(alone_model, *per_task[t]).backward()
            for p, w in zip(lora_params, task_loras[t]):
                w.grad, p.grad = p.grad, None
            task_opts[t].step()
            task_opts[t].zero_grad(set_to_none=True)

        def one_after_another() -> None:
            for t in range(tasks):
                one_task_step(t)

        together_seconds = median_seconds(together_step, dev, repeats)
        alone_seconds = median_seconds(one_after_another, dev, repeats)
        peak_together = step_peak_memory(together_step, dev)
        peak_alone = max(step_peak_memory(lambda t=t: one_task_step(t), dev) for t in range(tasks))
        together_rate, alone_rate = tokens / together_seconds, tokens / alone_seconds
        print(f"T={tasks}: together {together_rate:.0f} tokens/s, one after another {alone_rate:.0f} tokens/s "
              f"({together_rate / alone_rate:.2f}x); step peak {peak_together:.3f} GB vs {peak_alone:.3f} GB")
        row = (f"| {date.today()} | {machine} | {shape} | {precision} | {tasks} | {together_rate:.0f} | "
               f"{alone_rate:.0f} | {together_rate / alone_rate:.2f}x | {peak_together:.3f} GB | {peak_alone:.3f} GB |")
        if results_file and Path(results_file) != Path(""):  # each row as soon as measured; "": print only
            add_rows(results_file, RESULTS_HEADER, [row])
            print(f"row added to {results_file}")
        del together, together_opt, task_loras, task_opts



if __name__ == "__main__":
    run_cli(main)
