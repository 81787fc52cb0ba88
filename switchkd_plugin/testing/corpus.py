"""The words the tiny tokenizer is trained on, and the sentence templates of test conversations:
chat words, everyday English, colours, shapes, sides and numbers. The demo's shapes task uses
a few of them (its answers are single tokens because of this corpus); ``tiny_models`` keeps the
generic builders.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

# The system prompt of the Factory's qwen2 templates.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

COLOURS = (
    "red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "brown", "pink"
)  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "box", "line", "dot")
SIDES = ("left", "right", "top", "bottom", "middle", "centre")
NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)  # fmt: skip
# Everyday words so the BPE learns ~600 tokens: descriptions, positions, chat words.
WORD_LINES = """
a an the this that these those it its they them there here is are was were be been being has have
had do does did can could would should will may might must not and or but so because if then than
when where what which who whose why how all any both each few more most other some such only same
very just also still again once about above across after against along among around at before below
beneath beside beyond by down during for from into like near of off on onto out over past since
through to toward under until up upon with within without small large big tiny round sharp bright
dark light thin thick long short tall wide narrow empty full open closed new old first second third
last next previous inside outside between behind front back corner edge side background foreground
count number size position object objects item items picture photo image scene person people animal
cat dog bird fish horse car bus bike train boat plane tree flower house door window sky sun moon
cloud water river sea grass road street table chair cup plate book ball hat shirt shoe bag phone
clock lamp wall floor sign text word letter sure sorry hello thanks answer question user assistant
see look find show tell give take make know think say describe explain point hold stand sit walk run
"""
QUESTIONS = (
    "what colour is the {shape}?",
    "is there a {colour} {shape} in the image?",
    "which side is the {colour} {shape} on?",
    "how many shapes can you see?",
    "describe the picture, please.",
)
FACTS = (
    "the {colour} {shape} is on the {side}.",
    "there are {number} {colour} {shape}s.",
    "yes, a {colour} {shape} is at the {side}.",
    "no, the {shape} on the {side} is {colour}.",
)


def sentences() -> Iterator[str]:
    """A few hundred distinct words' worth of deterministic English sentences."""
    yield SYSTEM_PROMPT
    yield "USER: ASSISTANT: yes no maybe please thank you image picture photo shape colour color"
    yield " ".join(NUMBERS) + " 0 1 2 3 4 5 6 7 8 9 10 11 12"
    yield from WORD_LINES.strip().splitlines()
    for colour, shape, side in itertools.product(COLOURS, SHAPES, SIDES):
        number = NUMBERS[(len(colour) + len(shape) + len(side)) % len(NUMBERS)]
        slots = {"colour": colour, "shape": shape, "side": side, "number": number}
        yield " ".join(t.format(**slots) for t in QUESTIONS + FACTS)
