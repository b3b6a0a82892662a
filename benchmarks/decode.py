"""Decode/prefill benchmark of bf16, INT8 and INT4 at the ChatGLM-6B shape; the same as `glmkit bench`.

    python benchmarks/decode.py                 # full 28 layers (bf16 needs ~12 GB of RAM)
    python benchmarks/decode.py --layers 8      # quicker, less memory
    python benchmarks/decode.py --help

Prints one table: prefill tokens/s, decode tokens/s and peak RSS per precision beside the memory-bandwidth
roofline measured in the same run (see glmkit/evaluation/bench.py for what is measured and how).
"""

import sys

from glmkit.commands.bench import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
