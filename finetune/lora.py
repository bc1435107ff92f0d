"""Finetune LLaMA with LoRA on an instruction dataset (one GPU in bf16, or several through Fabric).

    python scripts/prepare_alpaca.py --checkpoint_dir checkpoints/lit-llama/7B
    python finetune/lora.py --checkpoint_dir checkpoints/lit-llama/7B

Writes LoRA-only checkpoints (a few MB), run.json, summary.json and metrics.csv to --out_dir; see
howto/finetune_lora.md. `--help` lists every flag: LoRA's below, the shared ones in lit_llama/args.py.
"""

import sys
from pathlib import Path
from typing import Any, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.cli import UserError, normalize_repeated_flag
from lit_llama.finetune import finetune_cli, finetune_from_python
from lit_llama.lora import LoRAConfig, LoRAFinetune
from lit_llama.lora_tree import TreeLoRAFinetune


def lora(
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    lora_rslora: bool = False,
    lora_dora: bool = False,
    quantize: Optional[str] = None,
    parent_lora: List[Path] = [],
) -> LoRAFinetune:
    """Finetunes a pretrained checkpoint with LoRA. Defaults are the article's (7B on one 24 GB GPU).

    Args:
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; updates are scaled by alpha / r.
        lora_dropout: Dropout on the LoRA branch's input.
        lora_query: Adapt the attention query projection.
        lora_key: Adapt the attention key projection.
        lora_value: Adapt the attention value projection.
        lora_projection: Adapt the attention output projection.
        lora_mlp: Adapt the three MLP projections.
        lora_head: Adapt the output layer. Refused for a model with tied input/output embeddings (SmolLM2,
            Llama 3.2, Qwen2.5 up to 3B): merged, it would change the input embedding too.
        lora_rslora: Rank-stabilised LoRA: scale updates by alpha / sqrt(r) instead of alpha / r (larger ranks
            then learn as fast as small ones).
        lora_dora: DoRA: also train a magnitude per output row of each adapted layer; the LoRA update then only
            changes the weight's direction. Somewhat slower steps; merges like LoRA.
        quantize: nf4: store the frozen linear weights of the transformer blocks in 4-bit NormalFloat (QLoRA;
            about 0.52 bytes per weight instead of 2 in bf16). On several devices FSDP shards it (not with --strategy
            ddp or --cpu_offload). Needs torchao.
        parent_lora: A LoRA tree (howto/lora_tree.md): the LoRA files of this node's ancestors, root first; repeat
            the flag for each (--parent_lora language.pth --parent_lora domain.pth). They are merged into the
            frozen base, and the new file records them (path and SHA-256): generation, serving and export then
            compose the whole path from the leaf alone.
    """
    try:
        config = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                            value=lora_value, projection=lora_projection, mlp=lora_mlp, head=lora_head,
                            rslora=lora_rslora, dora=lora_dora)
    except ValueError as e:
        raise UserError(f"--lora_{e}")  # LoRAConfig's messages start with the field's (= the flag's) name
    return TreeLoRAFinetune(config, quantize, parent_lora) if parent_lora else LoRAFinetune(config, quantize)


def setup(**flags: Any) -> None:
    """`python finetune/lora.py --flag value` from Python: `setup(flag=value)`."""
    finetune_from_python(lora, flags, LoRAFinetune.flag_defaults)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *normalize_repeated_flag(sys.argv[1:], "--parent_lora")]
    finetune_cli(lora, LoRAFinetune.flag_defaults)
