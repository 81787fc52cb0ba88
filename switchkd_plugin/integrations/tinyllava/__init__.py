"""TinyLLaVA Factory: `--distill switchkd` (train), the runner that installs the compatibility
fixes (run), those fixes (compat), and the patch to the Factory's train.py (patch)."""
