"""Finetune every weight of LLaMA on an instruction dataset (FSDP2 over several GPUs, or one device).

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B
    python finetune/full.py --checkpoint_dir checkpoints/lit-llama/7B --devices 4

Writes full checkpoints (as large as the base model), lit_config.json, tokenizer.model, run.json, summary.json
and metrics.csv to --out_dir, so `python generate/full.py --checkpoint_path OUT_DIR/lit-llama-full-finetuned.pth`
needs nothing else; see howto/finetune_full.md. `--help` lists every flag: full finetuning's below, the shared
ones in lit_llama/args.py.
"""

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.finetune import FullFinetune, finetune_cli, finetune_from_python


def full(state_dict_type: str = "full") -> FullFinetune:
    """Finetunes every weight of a pretrained checkpoint. bf16-true halves the memory, but bf16 weights round
    away most updates of a learning rate this small: the default on a GPU is bf16-mixed.

    Args:
        state_dict_type: With FSDP: full (each checkpoint one file, gathered on rank 0) or sharded (a folder
            with one file per process: faster to write, no gathering; generate/full.py reads both; the resume
            state is sharded the same way).
    """
    return FullFinetune(state_dict_type)


def setup(**flags: Any) -> None:
    """`python finetune/full.py --flag value` from Python: `setup(flag=value)`."""
    finetune_from_python(full, flags, FullFinetune.flag_defaults)


if __name__ == "__main__":
    finetune_cli(full, FullFinetune.flag_defaults)
