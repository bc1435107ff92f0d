"""Finetune several LoRAs in one run on one base model: one per task, every micro-batch a mix of the tasks' rows,
each row through its own task's LoRA in the same forward and backward pass (lit_llama/multi_task.py).

    python finetune/multi_lora.py --checkpoint_dir checkpoints/lit-llama/7B \
        --task math=data/math --task code=data/code --task_lora_r code=16 --task_learning_rate math=1e-4

Writes one ordinary LoRA file per task, out_dir/<task>/lit-llama-lora-finetuned.pth (generate/lora.py,
generate/multi_lora.py, scripts/merge_lora.py and scripts/export_peft.py load it), and run.json, summary.json
and metrics.csv to --out_dir; see howto/multi_lora.md. `--help` lists every flag: the tasks' below, the shared
ones in lit_llama/args.py.
"""

import sys
from pathlib import Path
from typing import Any, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.cli import UserError, normalize_repeated_flag
from lit_llama.finetune import finetune_cli, finetune_from_python
from lit_llama.lora import LoRAConfig
from lit_llama.multi_task import MultiTaskFinetune, parse_tasks

REPEATED = ("--task", "--task_lora_r", "--task_lora_alpha", "--task_lora_targets", "--task_learning_rate")


def multi_lora(
    task: List[str] = [],
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_rslora: bool = False,
    task_lora_r: List[str] = [],
    task_lora_alpha: List[str] = [],
    task_lora_targets: List[str] = [],
    task_learning_rate: List[str] = [],
) -> MultiTaskFinetune:
    """Finetunes one LoRA per task in one run, every micro-batch a mix of the tasks' rows (see --task).

    Args:
        task: NAME=DATA_DIR: a task's name (letters, digits, - and _; its sub-folder of --out_dir) and its
            prepared data (scripts/prepare_*.py, with this checkpoint's tokenizer). Repeat for each task (in a
            --config YAML file: a list). --batch_size and --micro_batch_size count the rows of all tasks, an
            equal share each: with T tasks a task trains on the rows finetune/lora.py trains on alone with
            --micro_batch_size / T, --batch_size / T and the same --seed, in the same order. The loss is the sum
            of the tasks' mean losses (each LoRA gets its own mean's gradient); train_loss and val_loss in
            metrics.csv are the mean over the tasks. --data_dir is not used. Per-task flags below are
            NAME=VALUE, repeated for each task that differs from the shared flag.
        lora_r: LoRA rank of every task without --task_lora_r.
        lora_alpha: LoRA alpha of every task without --task_lora_alpha; updates are scaled by alpha / r.
        lora_dropout: Dropout on the LoRA branch's input (each row with its task's LoRA).
        lora_query: Adapt the attention query projection (tasks without --task_lora_targets).
        lora_key: Adapt the attention key projection (idem).
        lora_value: Adapt the attention value projection (idem).
        lora_projection: Adapt the attention output projection (idem).
        lora_mlp: Adapt the three MLP projections (idem).
        lora_rslora: Rank-stabilised LoRA for every task: scale updates by alpha / sqrt(r).
        task_lora_r: NAME=R: that task's LoRA rank.
        task_lora_alpha: NAME=ALPHA: that task's LoRA alpha.
        task_lora_targets: NAME=T1,T2,...: that task's adapted layers, of query, key, value, projection, mlp
            (the output layer and DoRA are not offered: a task that needs them trains alone in finetune/lora.py).
        task_learning_rate: NAME=LR: that task's peak learning rate (default --learning_rate), on the same
            warmup and cosine schedule.
    """
    defaults = dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key, value=lora_value,
                    projection=lora_projection, mlp=lora_mlp, rslora=lora_rslora)
    try:
        shared = LoRAConfig(**defaults)
    except ValueError as e:
        raise UserError(f"--lora_{e}")  # LoRAConfig's messages start with the field's (= the flag's) name
    return MultiTaskFinetune(parse_tasks(task, shared, task_lora_r, task_lora_alpha, task_lora_targets,
                                         task_learning_rate))


def setup(**flags: Any) -> None:
    """`python finetune/multi_lora.py --flag value` from Python: `setup(flag=value)` (lists for the tasks)."""
    finetune_from_python(multi_lora, flags, MultiTaskFinetune.flag_defaults)


if __name__ == "__main__":
    for flag in REPEATED:
        sys.argv = [sys.argv[0], *normalize_repeated_flag(sys.argv[1:], flag)]
    finetune_cli(multi_lora, MultiTaskFinetune.flag_defaults)
