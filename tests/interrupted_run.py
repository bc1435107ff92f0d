"""`python tests/interrupted_run.py ARGS` runs the script named by $INTERRUPT_SCRIPT with ARGS, as
`python SCRIPT ARGS` would, but stops when its training loop asks for the batch of iteration
$INTERRUPT_AT (0-based): a crash at a known point of a run.

Fabric starts the other processes of a multi-process run by running this same file again with the same
environment, so every rank stops at the same iteration, as a killed job would.
"""

import os
import runpy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import lit_llama.training as training  # noqa: E402

INTERRUPTED_EXIT_CODE = 3


def main() -> None:
    script, stop_at = REPO_ROOT / os.environ["INTERRUPT_SCRIPT"], int(os.environ["INTERRUPT_AT"])
    real_batch_indices = training.batch_indices

    def interrupting_batch_indices(n, batch, iter_num, *rest):
        if iter_num == stop_at:
            print(f"interrupted at iteration {iter_num}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(INTERRUPTED_EXIT_CODE)  # like a kill: no clean-up, nothing more written
        return real_batch_indices(n, batch, iter_num, *rest)

    training.batch_indices = interrupting_batch_indices
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
