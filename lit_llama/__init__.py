"""lit_llama: the package under every script. A map, top to bottom (imports point down, never up):

  scripts      finetune/*.py, generate/*.py, scripts/*.py, serve.py: flags (jsonargparse), then one call below
  entry        finetune.py (flags -> settings -> processes -> fit), generation.py, convert.py (foreign formats;
               gguf.py and gguf_tokenizer.py for llama.cpp files)
  methods      lora.py, adapter.py (subclass the model, own file formats; a new method: a class with the
               `finetune.Method` fields in its module, and a 50-line finetune/<name>.py), multi_lora.py
  the loop     training.py (batches, loss, fit, validate, metrics); run_dir.py (lock, run.json, resume state)
  around it    args.py (shared flags, each described once), distributed.py (Fabric, strategy, precision),
               data.py and prompts.py (a new prompt style: one entry in prompts.PROMPT_STYLES), quantize.py
  base         model.py (the model; a new family: Config fields, not a new file), tokenizer.py,
               checkpoint.py (paths, safe loading, each of our formats' reader beside its writer),
               disk.py (atomic writes), cli.py (UserError, run_cli, flag checks)
"""

from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer

__all__ = ["Config", "LLaMA", "Tokenizer"]
