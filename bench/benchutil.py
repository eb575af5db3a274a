"""Shared by the benchmark scripts: the order in which variants are interleaved."""


def rotation(names: list, rep: int) -> list:
    """The order of repetition ``rep``: rotated by one each repetition, reversed every other cycle.

    Every variant thus runs at every position and after each of its two neighbours; the order is the
    same on every rank (the collectives of the variants must line up).
    """
    shift = rep % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if (rep // len(names)) % 2 else order
