"""Where memory layers sit in the block stack (UltraMem §2.1, "split big memory and skip-layer").

A spec "a:b/c:d/..." declares one memory layer per `a:b` pair (0-indexed blocks): memory j reads the pre-FFN
normalised hidden state of block a and its output is added to the residual stream after block b has finished
(official code `mem_insert_way`). `a == b` puts the memory in parallel with block a's FFN. "every" is one memory
layer per block in parallel with its FFN (the official 'full', used by UltraMemV2).

Memory+ (`model.memory_plus.layers`) names the blocks that hold a memory layer instead: `memory_plus_blocks`.

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



MEMORY_PLUS_FIELD = "model.memory_plus.layers"


def memory_plus_blocks(spec: str, n_layers: int) -> list[int]:
    """'4,12,20' -> [4, 12, 20]; 'auto' -> 3 centred blocks. Raises ConfigError naming the field.

    auto: middle = n_layers // 2, stride s = max(1, n_layers // 3), {middle - s, middle, middle + s} clipped to
    [0, n_layers). It is Meta's placement only where Meta used it: 24 -> 4,12,20 (the 373M template, stride 8) and
    12 -> 2,6,10 (the paper's stride 4 of its 134m model). Elsewhere it extrapolates: 32 -> 6,16,26 where Meta's 7B
    config keeps 4,12,20 (write that explicitly); 1 -> 0; 2 -> 0,1; 3 -> 0,1,2 (every block); 4 and 5 -> 1,2,3;
    6 -> 1,3,5; 8 -> 2,4,6; 16 -> 3,8,13; 20 -> 4,10,16 (docs/families.md, "Memory+").
    """
    field = MEMORY_PLUS_FIELD
    if n_layers < 1:
        raise ConfigError(f"{field}: n_layers must be >= 1, got {n_layers}")
    if spec.strip() == "auto":
        mid, s = n_layers // 2, max(1, n_layers // 3)
        return sorted({i for i in (mid - s, mid, mid + s) if 0 <= i < n_layers})
    parts = [p.strip() for p in spec.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"{field}: cannot parse {spec!r}; expected 'auto' or comma-separated 0-indexed block "
                          f"indices (e.g. '4,12,20')")
    blocks = [int(p) for p in parts]
    bad = [b for b in blocks if b >= n_layers]
    if bad:
        raise ConfigError(f"{field}: block(s) {bad} in {spec!r} out of range; allowed: 0..{n_layers - 1}")
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{field}: {spec!r} repeats a block; each block holds at most one memory layer")
    return sorted(blocks)
