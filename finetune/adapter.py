"""Finetune LLaMA with LLaMA-Adapter (v1, or v2 with --adapter_version 2) on an instruction dataset (one GPU
in bf16, or several through Fabric).

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B
    python finetune/adapter.py --checkpoint_dir checkpoints/lit-llama/7B

Writes adapter-only checkpoints (a few MB), run.json, summary.json and metrics.csv to --out_dir (default
out/adapter/alpaca, or out/adapter_v2/alpaca with --adapter_version 2); see howto/finetune_adapter.md.
`--help` lists every flag: the adapter's below, the shared ones in lit_llama/args.py.
"""

import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.adapter import AdapterFinetune
from lit_llama.finetune import finetune_cli, finetune_from_python


def adapter(
    adapter_prompt_length: int = 10,
    adapter_start_layer: Optional[int] = None,
    adapter_version: int = 1,
    quantize: Optional[str] = None,
) -> AdapterFinetune:
    """Finetunes a pretrained checkpoint with LLaMA-Adapter. Defaults are the article's (7B on one GPU).

    Args:
        adapter_prompt_length: Learnable prompt vectors per adapted layer.
        adapter_start_layer: First layer with a prompt (0-based); the layers below keep plain attention. Default:
            2 (the article's), or the last layer of a model with fewer than 3 layers.
        adapter_version: 1 (LLaMA-Adapter) or 2 (LLaMA-Adapter v2: also a scale and bias on every linear
            layer of the blocks and trainable RMSNorm weights).
        quantize: nf4: store the frozen linear weights of the transformer blocks in 4-bit NormalFloat (about
            0.52 bytes per weight instead of 2 in bf16). One device only. Needs torchao.
    """
    return AdapterFinetune(adapter_prompt_length, adapter_start_layer, adapter_version, quantize)


def setup(**flags: Any) -> None:
    """`python finetune/adapter.py --flag value` from Python: `setup(flag=value)`."""
    finetune_from_python(adapter, flags, AdapterFinetune.flag_defaults)


if __name__ == "__main__":
    finetune_cli(adapter, AdapterFinetune.flag_defaults)
