"""``python -m lightning_llama_fp8.cli``: the ``llama-fp8`` command (as ``torchrun -m`` starts it)."""

import sys

from lightning_llama_fp8.cli import main

if __name__ == "__main__":
    sys.exit(main())
