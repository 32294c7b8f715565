"""Where memory layers sit in the block stack (UltraMem §2.1, "split big memory and skip-layer").

A spec "a:b/c:d/..." declares one memory layer per `a:b` pair (0-indexed blocks): memory j reads the pre-FFN
normalised hidden state of block a and its output is added to the residual stream after block b has finished
(official code `mem_insert_way`). `a == b` puts the memory in parallel with block a's FFN. "every" is one memory
layer per block in parallel with its FFN (the official 'full', used by UltraMemV2).

Pure Python: `ultramem.config` validates specs with it, so it imports neither torch nor the config (only errors).
"""

from __future__ import annotations

from ultramem.errors import ConfigError

FIELD = "model.memory.layers"


def parse_layers(spec: str, n_layers: int) -> list[tuple[int, int]]:
    """'2:5/6:9' -> [(2, 5), (6, 9)]; 'every' -> [(0, 0), (1, 1), ...]. Raises ConfigError naming the field."""
    if spec == "every":
        return [(i, i) for i in range(n_layers)]
    pairs = []
    for part in spec.split("/"):
        pieces = part.split(":")
        if len(pieces) != 2 or not all(p.strip().isdigit() for p in pieces):
            raise ConfigError(f"{FIELD}: cannot parse {part!r} in {spec!r}; expected 'every' or 'a:b/c:d' with "
                              f"0-indexed blocks a <= b (e.g. '2:5/6:9')")
        a, b = (int(p) for p in pieces)
        if not 0 <= a <= b < n_layers:
            raise ConfigError(f"{FIELD}: pair {part!r} in {spec!r} needs 0 <= a <= b < n_layers ({n_layers})")
        pairs.append((a, b))
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"{FIELD}: {spec!r} repeats a pair; each memory layer needs its own a:b")
    return pairs

