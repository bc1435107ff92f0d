"""The old name of scripts/convert_peft_checkpoint.py (see scripts/README.md): runs it with the same flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

from lit_llama.cli import run_renamed_script

run_renamed_script("import_peft.py", "convert_peft_checkpoint.py")
