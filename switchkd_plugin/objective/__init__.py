"""One batch -> the Switch-KD loss terms: the three pathways, the chunked loss stage, the
divergences, how the teacher is called, per-layer checkpointing, the non-finite diagnosis.
Imports adapters, losses and constants only: never config, training/, the Trainer or accelerate
(`tests/test_layout.py`). Its options come explicit (`engine.EngineOptions`)."""
