"""Several LoRAs trained in one run on one base (finetune/multi_lora.py): one adapter per task, every micro-batch
a mix of the tasks' rows, each row through its own task's adapter in the same forward and backward pass.

The layer is multi_lora.py's stacked-adapter layer, with gradients: per adapted linear layer each task keeps its
trainable A and B in LoRALinear's layout (`TaskFactors`); each forward pass stacks the tasks' whole updates
(`LoRALinear.factors`: the fused q/k/v blocks and alpha / r folded in, smaller ranks padded with zeros) into

    A_all: (tasks, R, in)      B_all: (tasks, out, R)

and `MultiLoRALinear.forward_with` gathers each row's A and B by its task: y = x W^T + (x A_row^T) B_row^T. The
gather and the stacking are differentiable, so the backward pass brings each task's gradient to its own
factors; the base stays frozen, and rows never meet (attention is within a row), so a task's loss depends on
its own adapter only.

Equal to training each task alone, on the same rows in the same order:
* the rows: micro-batch k holds, for every task, the rows `batch_indices` gives for micro-batch k of that
  task's data with a micro-batch of micro_batch_size / tasks (what finetune/lora.py takes alone with that
  --micro_batch_size and the same seed), interleaved (row j is task j % tasks);
* the loss: the sum over the tasks of each task's mean (`training.compute_loss` with tasks), so each task's
  adapter gets the gradient of its own mean, as alone; the mean over all positions would scale it by its
  share of the batch's tokens;
* the optimizer: AdamW is elementwise, so its state is per task already; each task's parameters are a group
  with its own peak learning rate on the same schedule (`fit`'s "peak_lr");
* the start: each task's factors drawn from the same random state as finetune/lora.py draws them.

Each task's adapter is saved as an ordinary LoRA file (out_dir/<task>/<name>.pth), which generate/lora.py,
generate/multi_lora.py, scripts/merge_lora.py and scripts/export_peft.py load as they load finetune/lora.py's.
"""

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama import training
from lit_llama.checkpoint import CheckpointPaths, check_vocab, full_state_dict, load_model, num_parameters, save_atomic
from lit_llama.cli import UserError
from lit_llama.data import check_data_fits, load_prepared
from lit_llama.distributed import load_device, unwrap
from lit_llama.lora import LoRAConfig, LoRAFinetune, LoRALinear, LoRALLaMA, base_fingerprint, lora_state_dict
from lit_llama.model import Config, LLaMA
from lit_llama.multi_lora import MultiLoRALinear
from lit_llama.prompts import prompt_style_of_data
from lit_llama.tokenizer import Tokenizer

TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")  # also its sub-folder of --out_dir and a module name (no dots)
TASKS_KEY = "task_loras"  # the name of each adapted layer's per-task factors: <layer>.task_loras.<task>.lora_A


@dataclass
class Task:
    """One task: its name, its prepared data, its LoRA and its peak learning rate (None: --learning_rate)."""

    name: str
    data_dir: Path
    lora: LoRAConfig
    learning_rate: Optional[float] = None


class TaskFactors(nn.Module):
    """One task's LoRA of one linear layer: `lora_A` and `lora_B` laid out and named as in LoRALinear (so a task's
    tensors are a LoRA file's tensors), without a weight of its own."""

    def __init__(self, in_features: int, out_features: int, lora: LoRAConfig,
                 parts: Optional[Sequence[Tuple[int, bool]]] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.parts = list(parts or [(out_features, True)])
        self.adapted_sizes = [size for size, adapted in self.parts if adapted]
        self.r, self.scaling, self.dropout = lora.r, lora.scaling, lora.dropout
        self.lora_A = nn.Parameter(torch.empty(lora.r * len(self.adapted_sizes), in_features))
        self.lora_B = nn.Parameter(torch.empty(sum(self.adapted_sizes), lora.r))

    def init_factors(self) -> None:
        """As `LoRALinear.reset_extra_parameters` draws them: each block's A Kaiming-uniform, B zero."""
        for A in self.lora_A.split(self.r):
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    factors = LoRALinear.factors  # (A, B) with B @ A the whole update: the same attributes, the same layout


class MultiTaskLoRALinear(MultiLoRALinear):
    """A frozen linear layer plus the trainable LoRAs of the tasks that adapt it (`task_loras`, by task name);
    `row_slots` (set by `MultiTaskLLaMA.route_rows`) holds each row's task index."""

    def __init__(self, linear: nn.Linear, task_names: Sequence[str], loras: Dict[str, "TaskFactors"]) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.task_names = list(task_names)  # every task of the model, in index order; `task_loras`: those adapting this
        self.task_loras = nn.ModuleDict(loras)
        self.rank = max(f.lora_A.size(0) for f in loras.values())  # R: the widest task's A rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_slots is None:
            return super().forward(x)
        A_all, B_all = self.stacks()
        return self.forward_with(x, A_all, B_all, self.dropped(x))

    def stacks(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tasks, R, in) and (tasks, out, R): each task's factors padded to rank R, zeros for a task that does
        not adapt this layer. Built anew in every forward pass, with gradients."""
        As, Bs = [], []
        for name in self.task_names:
            if name in self.task_loras:
                A, B = self.task_loras[name].factors()
                As.append(F.pad(A, (0, 0, 0, self.rank - A.size(0))))
                Bs.append(F.pad(B, (0, self.rank - B.size(1))))
            else:
                any_lora = next(iter(self.task_loras.values())).lora_A
                As.append(any_lora.new_zeros(self.rank, self.in_features))
                Bs.append(any_lora.new_zeros(self.out_features, self.rank))
        return torch.stack(As), torch.stack(Bs)

    def dropped(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The low-rank branch's input with each row's task's LoRA dropout (training only), or None."""
        p_task = [self.task_loras[n].dropout if n in self.task_loras else 0.0 for n in self.task_names]
        if not self.training or not any(p_task):
            return None
        p = torch.tensor(p_task, device=x.device, dtype=x.dtype).index_select(0, self.row_slots)
        p = p.view(-1, *([1] * (x.dim() - 1)))
        return x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)


class MultiTaskLLaMA(LLaMA):
    """LLaMA whose linear layers carry one trainable LoRA per task that adapts them. Build it with
    `load_model(paths, device, dtype, MultiTaskLLaMA, tasks=[(name, LoRAConfig), ...])`, then `route_rows`
    before each forward pass. The output layer is not adapted: the loss sends it positions, not rows."""

    def __init__(self, config: Config, tasks: Sequence[Tuple[str, LoRAConfig]]) -> None:
        super().__init__(config)
        self.task_configs = dict(tasks)
        names = list(self.task_configs)
        hs = config.head_size
        q_size, kv_size = config.n_head * hs, config.n_query_groups * hs

        def adapted(linear: nn.Linear, targets: Callable[[LoRAConfig], Optional[list]]) -> nn.Module:
            loras = {name: TaskFactors(linear.in_features, linear.out_features, lora, targets(lora))
                     for name, lora in self.task_configs.items() if targets(lora) is not None}
            return MultiTaskLoRALinear(linear, names, loras) if loras else linear

        def qkv(lora: LoRAConfig) -> Optional[list]:
            if not (lora.query or lora.key or lora.value):
                return None
            return [(q_size, lora.query), (kv_size, lora.key), (kv_size, lora.value)]

        def whole_if(flag: str) -> Callable[[LoRAConfig], Optional[list]]:
            return lambda lora: [] if getattr(lora, flag) else None  # []: one block, the whole layer

        for block in self.transformer.h:
            attn, mlp = block.attn, block.mlp
            attn.c_attn, attn.c_proj = adapted(attn.c_attn, qkv), adapted(attn.c_proj, whole_if("projection"))
            mlp.c_fc1, mlp.c_fc2 = adapted(mlp.c_fc1, whole_if("mlp")), adapted(mlp.c_fc2, whole_if("mlp"))
            mlp.c_proj = adapted(mlp.c_proj, whole_if("mlp"))

    def task_layers(self) -> Dict[str, MultiTaskLoRALinear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiTaskLoRALinear)}

    def route_rows(self, tasks: torch.Tensor) -> None:
        """Each row's task index (into the tasks in the order given) for the next forward passes."""
        for layer in self.task_layers().values():
            layer.row_slots = tasks

    def reset_extra_parameters(self) -> None:
        """Every task's factors drawn from the random state `load_model` finds, as finetune/lora.py draws them
        from it for that task alone (the same layers in the same order), so a task starts where it would alone."""
        start = torch.get_rng_state()
        for name in self.task_configs:
            torch.set_rng_state(start)
            for layer in self.task_layers().values():
                if name in layer.task_loras:
                    layer.task_loras[name].init_factors()

    def task_state_dict(self, name: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A task's tensors out of the model's (trainable) `state_dict`, under the names of a LoRA file."""
        infix = f".{TASKS_KEY}.{name}."
        return {key.replace(infix, "."): t for key, t in state_dict.items() if infix in key}


class MultiTaskFinetune:
    """Several LoRAs in one run (finetune/multi_lora.py); see the module's docstring."""

    name, final_name, trains_every_weight, sharded_resume = "multi_lora", LoRAFinetune.final_name, False, False
    flag_defaults = LoRAFinetune.flag_defaults

    def __init__(self, tasks: List[Task]) -> None:
        self.tasks = tasks
        self.starts: List[int] = []  # where each task's examples begin in the training data (load_data)
        self.sizes: List[int] = []
        self.example_tokens: List[int] = []  # each training example's token count
        self.lengths: Dict[int, Tuple[int, ...]] = {}  # --group_by_length: each task's example lengths, once

    def configure(self, config: Config, run: Any) -> Dict[str, Any]:
        return {"tasks": {t.name: {"data_dir": str(Path(t.data_dir).resolve()), "lora": asdict(t.lora),
                                   "learning_rate": t.learning_rate} for t in self.tasks}}

    def default_out_dir(self) -> Path:
        return Path("out/multi_lora")

    def load_data(self, fabric: Any, paths: CheckpointPaths, data_dir: Path,
                  seed: int) -> Tuple[Tokenizer, List[training.Sample], List[training.Sample]]:
        """Every task's prepared data, checked against the model's tokenizer, in one training list (task after
        task: `batches` picks from each) and one validation list (interleaved); each example carries its task's
        index ("task"). `data_dir` (--data_dir) is not used."""
        fabric.seed_everything(seed)
        tokenizer = Tokenizer(paths.tokenizer)
        check_vocab(tokenizer, paths)
        train_data, val_splits = [], []
        for index, task in enumerate(self.tasks):
            try:
                task_train, task_val = load_prepared(task.data_dir, tokenizer)
                check_data_fits(task_train + task_val, paths.config.vocab_size, task.data_dir)
            except UserError as e:
                raise UserError(f"--task {task.name}: {e}") from None
            self.starts.append(len(train_data))
            self.sizes.append(len(task_train))
            train_data += [{**s, "task": index} for s in task_train]
            val_splits.append([{**s, "task": index} for s in task_val])
        # interleaved, so that validation's first --eval_iters micro-batches hold every task's examples
        val_data = [split[k] for k in range(max(map(len, val_splits))) for split in val_splits if k < len(split)]
        self.example_tokens = [len(s["input_ids"]) for s in train_data]
        return tokenizer, train_data, val_data

    def batches(self, config: training.TrainingConfig, iter_num: int, rank: int, world: int) -> List[int]:
        """Micro-batch `iter_num`: for each task the rows `batch_indices` picks from that task's data for a
        micro-batch of micro_batch_size / tasks (those finetune/lora.py picks alone), interleaved."""
        share = self.rows_per_task(config)
        per_task = []
        for t, (start, size) in enumerate(zip(self.starts, self.sizes)):
            if config.group_by_length and t not in self.lengths:  # as training.example_lengths gives them
                tokens = self.example_tokens[start : start + size]
                self.lengths[t] = tuple(min(n, config.max_seq_length) for n in tokens)
            rows = training.batch_indices(size, share, iter_num, rank, world, config.seed, self.lengths.get(t))
            per_task.append([start + i for i in rows])
        return [rows[k] for k in range(share) for rows in per_task]

    def rows_per_task(self, config: training.TrainingConfig) -> int:
        tasks = len(self.tasks)
        if config.packing:
            raise UserError("--packing is not supported when several LoRAs train at once: a packed row would mix "
                            "the examples of several tasks, and each row goes through one task's LoRA")
        for flag in ("micro_batch_size", "batch_size"):
            if getattr(config, flag) % tasks:
                raise UserError(f"--{flag} {getattr(config, flag)} must be a multiple of the number of tasks "
                                f"({tasks}): each task gets an equal share of every batch")
        return config.micro_batch_size // tasks

    def load(self, fabric: Any, paths: CheckpointPaths, dtype: torch.dtype) -> MultiTaskLLaMA:
        tasks = [(t.name, t.lora) for t in self.tasks]
        model = load_model(paths, load_device(fabric), dtype, MultiTaskLLaMA, tasks=tasks)
        for name, param in model.named_parameters():
            param.requires_grad = f".{TASKS_KEY}." in name
        fabric.print(f"{len(tasks)} LoRAs ({', '.join(f'{t.name} r={t.lora.r}' for t in self.tasks)}): "
                     f"{num_parameters(model, requires_grad=True):,} trainable of {num_parameters(model):,} parameters")
        return model

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """One AdamW group per task, with the task's own peak learning rate if it has one."""
        named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        groups = []
        for task in self.tasks:
            group: Dict[str, Any] = {"params": [p for n, p in named if f".{TASKS_KEY}.{task.name}." in n]}
            if task.learning_rate is not None:
                group["peak_lr"] = group["lr"] = task.learning_rate
            groups.append(group)
        return groups

    def saver(self, fabric: Any, model: nn.Module, paths: CheckpointPaths, data_dir: Path,
              out_dir: Path) -> Callable[[Path], None]:
        base_model = base_fingerprint(paths.weights)  # recorded in each file, as finetune/lora.py records it
        styles = {t.name: prompt_style_of_data(t.data_dir) for t in self.tasks}
        # each file as finetune/lora.py writes it: a LoRALLaMA of the task's config on the meta device names the
        # config (lora_state_dict takes it from the model) without holding any weight
        with torch.device("meta"):
            templates = {t.name: LoRALLaMA(paths.config, t.lora) for t in self.tasks}

        def save_tasks(path: Path) -> None:
            trainable = full_state_dict(model, trainable_only=True)  # under FSDP gathered from every rank
            if fabric.global_rank == 0:
                for task in self.tasks:
                    tensors = unwrap(model).task_state_dict(task.name, trainable)
                    checkpoint = lora_state_dict(templates[task.name], tensors, styles[task.name], base_model)
                    save_atomic(checkpoint, path.parent / task.name / path.name)
                fabric.print(f"Saved {len(self.tasks)} LoRA files to {path.parent}/<task>/{path.name}")

        return save_tasks


def parse_tasks(task: List[str], defaults: LoRAConfig, ranks: List[str], alphas: List[str], targets: List[str],
                learning_rates: List[str]) -> List[Task]:
    """The flags of finetune/multi_lora.py (--task NAME=DATA_DIR, and NAME=VALUE for each per-task setting) as
    Tasks; a setting a task is not given is the shared flag's (`defaults`)."""
    data_dirs = named_values("task", task)
    if not data_dirs:
        raise UserError("--task: name at least one task as NAME=DATA_DIR (repeat the flag for each task)")
    per_task = {flag: named_values(flag, values, data_dirs)
                for flag, values in (("task_lora_r", ranks), ("task_lora_alpha", alphas),
                                     ("task_lora_targets", targets), ("task_learning_rate", learning_rates))}
    tasks = []
    for name, data_dir in data_dirs.items():
        settings = asdict(defaults)
        if name in per_task["task_lora_r"]:
            settings["r"] = number("task_lora_r", name, per_task["task_lora_r"][name], int)
        if name in per_task["task_lora_alpha"]:
            settings["alpha"] = number("task_lora_alpha", name, per_task["task_lora_alpha"][name], float)
        if name in per_task["task_lora_targets"]:
            settings.update(parse_targets(name, per_task["task_lora_targets"][name]))
        lr = per_task["task_learning_rate"].get(name)
        lr = None if lr is None else number("task_learning_rate", name, lr, float)
        if lr is not None and not 0 < lr <= 1:
            raise UserError(f"--task_learning_rate {name}={lr}: expected a learning rate in (0, 1]")
        try:
            lora = LoRAConfig(**settings)
        except ValueError as e:
            raise UserError(f"--task {name}: lora_{e}") from None
        if lora.dora or lora.head:
            what = "DoRA (--lora_dora)" if lora.dora else "the output layer (--lora_head)"
            raise UserError(f"--task {name}: {what} is not supported when several LoRAs train at once; train that "
                            "task alone with finetune/lora.py")
        tasks.append(Task(name, Path(data_dir), lora, lr))
    return tasks


TARGETS = ("query", "key", "value", "projection", "mlp")


def parse_targets(name: str, value: str) -> Dict[str, bool]:
    chosen = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TARGETS]
    if unknown or not chosen:
        raise UserError(f"--task_lora_targets {name}={value}: expected a comma-separated list of "
                        f"{', '.join(TARGETS)}")
    return {t: t in chosen for t in TARGETS}


def named_values(flag: str, items: List[str], known: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """NAME=VALUE items as a dict; names checked (each once; for a per-task flag, a task's)."""
    values: Dict[str, str] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        what = "NAME=DATA_DIR" if known is None else "NAME=VALUE"
        if not sep or not name or not value:
            raise UserError(f"--{flag} {item!r}: expected {what}")
        if not TASK_NAME.fullmatch(name):
            raise UserError(f"--{flag} {item!r}: a task name is letters, digits, '-' and '_'")
        if name in values:
            raise UserError(f"--{flag} {item!r}: task {name!r} is given twice")
        if known is not None and name not in known:
            raise UserError(f"--{flag} {item!r}: no task {name!r} (tasks: {', '.join(known)})")
        values[name] = value
    return values


def number(flag: str, name: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"--{flag} {name}={value}: expected a {'whole ' if kind is int else ''}number") from None
