"""Constants shared by the engine, the adapters, the test fixtures and the demo."""

# Label of a position that is not supervised (PyTorch's cross_entropy default ignore_index, and
# what transformers' and TinyLLaVA Factory's data pipelines write).
IGNORE_INDEX = -100
