"""The article's spelling: `python generate_lora.py --lora_path ... --pretrained_path .../lit-llama.pth`.
Runs generate/lora.py with the same flags."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parent / "generate" / "lora.py"), run_name="__main__")
