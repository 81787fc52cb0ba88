"""Run a TinyLLaVA Factory module with the compatibility fixes installed first.

    python -m switchkd_plugin.integrations.tinyllava.run \
        tinyllava.eval.model_vqa_pope --model-path ... [args]

The Factory's patched `train.py` loads this plugin before the Factory for `--distill switchkd`,
so that training needs no wrapper. Its other entry points (the eval modules that
`scripts/eval/*.sh` run with `python -m`) do not import on Python >= 3.11 or newer transformers
without the fixes: run them through this module instead of `python -m`. Run the Factory's own
training (`--distill none`) through it too, to give it the fixes (e.g. the LoRA recipe's save of
a tied language model):

    torchrun ... -m switchkd_plugin.integrations.tinyllava.run \
        tinyllava.train.train --distill none [args]
"""

from __future__ import annotations

import runpy
import sys

from switchkd_plugin.integrations.tinyllava import compat


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    compat.install()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
