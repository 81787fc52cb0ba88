"""Constants shared by the engine, the adapters, the test fixtures and the demo."""

import inspect

import transformers
from packaging import version

# The keyword `from_pretrained` takes the dtype under (renamed in transformers 4.56).
DTYPE_KWARG = (
    "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
)

# The keyword `Trainer` takes the tokenizer under (renamed `processing_class` in transformers 4.46).
TOKENIZER_KWARG = (
    "processing_class"
    if "processing_class" in inspect.signature(transformers.Trainer.__init__).parameters
    else "tokenizer"
)

# Label of a position that is not supervised (PyTorch's cross_entropy default ignore_index, and
# what transformers' and TinyLLaVA Factory's data pipelines write).
IGNORE_INDEX = -100
