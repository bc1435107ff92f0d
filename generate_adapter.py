"""The article's spelling: `python generate_adapter.py --adapter_path ... --pretrained_path .../lit-llama.pth`.
Runs generate/adapter.py with the same flags."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parent / "generate" / "adapter.py"), run_name="__main__")
