"""lit_llama: the package under every script. A map, top to bottom (imports point down, never up):

  scripts      finetune/*.py, generate/*.py, scripts/*.py, serve.py: flags (jsonargparse), then calls below
  entry        finetune.py (flags -> settings -> processes -> fit), generation.py, serving.py (serve.py's
               batching worker and web server), runs.py (finished run folders read back for comparisons),
               evaluation.py (lm-eval's LM over a model, perplexity; its offline tasks in eval_tasks/)
  methods      lora.py, adapter.py (subclass the model and own their file formats; a new method is a class
               with the `finetune.Method` fields in its module plus a short finetune/<name>.py), lora_tree.py
               (LoRA trees: nodes on top of their ancestors, paths composed), multi_lora.py, multi_task.py
               (several LoRAs trained in one run, on multi_lora.py's stacked layer)
  the loop     training.py (batches, loss, fit, validate, metrics); run_dir.py (lock, run.json, resume state)
  around it    args.py (shared flags, each described once), distributed.py (Fabric, strategy, precision),
               data.py, chat_data.py and prompts.py (a new prompt style: one entry in prompts.PROMPT_STYLES),
               quantize.py
  formats      checkpoint.py (our formats: paths, safe loading, each reader beside its writer), convert.py
               (Hugging Face, Meta, Lit-LLaMA names and layouts), peft.py, gguf.py and gguf_tokenizer.py
  base         model.py (a new model family: Config fields, not a new file), packed_attention.py (--packing's
               per-example attention: variable-length flash attention on GPUs, SDPA per example elsewhere),
               tokenizer.py (SentencePiece and tokenizer.json behind one interface), disk.py (atomic writes),
               cli.py (UserError, run_cli, checks)
"""

from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer

__all__ = ["Config", "LLaMA", "Tokenizer"]
