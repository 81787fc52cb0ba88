"""Test helpers for on-policy generation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def eos_ending_first_early(
    first: Sequence[int], others: Iterable[int], max_new: int
) -> tuple[int, int]:
    """A token to use as EOS so that one greedy response stops early and the others do not.

    Args:
        first: the response to stop early, generated greedily without any EOS.
        others: every token of the other responses, generated the same way.
        max_new: the `max_new_tokens` they were generated with.

    Returns:
        (token, length): a token `first` reaches before its last position that appears
        neither earlier in it nor in `others`, and `first`'s length when it stops there (EOS
        included); the other responses still run to `max_new` tokens.
    """
    first, others = list(first), set(others)
    for position, token in enumerate(first[: max_new - 1]):
        if token not in first[:position] and token not in others:
            return token, position + 1
    raise AssertionError(f"no token ends {first} early and is absent from {others}")
