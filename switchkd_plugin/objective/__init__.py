"""One batch -> the Switch-KD loss terms: the three pathways, the chunked loss stage, the
divergences, how the teacher is called, per-layer checkpointing. Imports adapters, losses,
config and constants only: never the Trainer or accelerate."""
