"""How many sequences of each kind a stage gets and which: bin packing of the short kinds,
the mixture's shares as exact counts, seeded choices (repeating a kind only when it has too
few), and the stats that say what was packed and dropped."""

from __future__ import annotations

import random
from fractions import Fraction

from longctx.config import Mixture
from longctx.pack.spill import Spilled
from longctx.synth.tables import count_reasons

KINDS = ("long", "long_output", "short")
REASONS = ("too_long", "under_filled")
HISTOGRAM_BINS = 8


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each item in the first bin with room (every length <= capacity).
    A max-tree over the bins' free room finds that bin in O(log n)."""
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [capacity] * (2 * size)  # leaves: bins (unused ones are empty, full room)
    bins: list[list[int]] = []
    for item, n in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(item)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def kind_shares(mixture: Mixture) -> dict[str, Fraction]:
    """Exact shares (decimal as written), so counts do not depend on float rounding."""
    return {k: Fraction(repr(float(getattr(mixture, k)))) for k in KINDS}


def largest_remainder(n: int, shares: dict[str, Fraction]) -> dict[str, int]:
    """Integer counts summing to n in proportion to shares (ties: KINDS order)."""
    total = sum(shares.values())
    quotas = {k: n * s / total for k, s in shares.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    rest = n - sum(counts.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - counts[k]), KINDS.index(k)))[:rest]:
        counts[k] += 1
    return counts


def plan_counts(shares: dict[str, Fraction], available: dict[str, int],
                sequences: int | None) -> dict[str, int]:
    """Sequences per kind: `sequences` at the shares, or (None) the most that repeat none.
    Kinds without a share or without sequences are left out, the rest renormalised."""
    used = {k: s for k, s in shares.items() if s > 0 and available[k] > 0}
    if not used:
        return dict.fromkeys(KINDS, 0)

    def fits(n: int) -> bool:
        return all(c <= available[k] for k, c in largest_remainder(n, used).items())

    if sequences is None:
        total = sum(used.values())
        n = min(int(available[k] * total / s) for k, s in used.items())
        while n > 0 and not fits(n):
            n -= 1
        while n < sum(available.values()) and fits(n + 1):
            n += 1
        sequences = n
    counts = dict.fromkeys(KINDS, 0)
    counts.update(largest_remainder(sequences, used))
    return counts


def choose(count: int, available: int, rng: random.Random) -> list[int]:
    """`count` of `available` sequences: passes of fresh seeded shuffles, repeats only when
    there are too few."""
    order: list[int] = []
    while len(order) < count:
        perm = list(range(available))
        rng.shuffle(perm)
        order += perm
    return order[:count]


def why_none(info: dict, capacity: int) -> str:
    dropped = count_reasons(info["reasons"], REASONS)
    if not info["available_samples"]:
        return "no samples in its input"
    parts = [f"{n} {reason}" for reason, n in dropped.items() if n]
    return f"all {info['available_samples']} samples dropped ({', '.join(parts)}; " \
           f"nothing fits {capacity} tokens)"


def stage_stats(stage: int, length: int, capacity: dict[str, int], shares: dict[str, Fraction],
           counts: dict[str, int], available: dict[str, int],
           made: dict[str, tuple[list[Spilled], dict]],
           rows: list[tuple[str, list[Spilled]]]) -> dict:
    """Everything packed and dropped; no timings, so a rerun writes the same bytes."""
    used = {k: s for k, s in shares.items() if counts[k] > 0}
    norm = sum(used.values())
    kinds = {}
    for kind in KINDS:
        mine = [samples for k, samples in rows if k == kind]
        kinds[kind] = {
            "available_samples": made[kind][1]["available_samples"],
            "dropped": count_reasons(made[kind][1]["reasons"], REASONS),
            "packed_sequences": available[kind],
            "sequence_tokens": capacity[kind],
            "sequences": counts[kind],
            "repeats": max(0, counts[kind] - available[kind]),
            "samples": sum(len(s) for s in mine),
            "tokens": sum(len(x) for s in mine for x in s),
            "learnt_tokens": sum(x.learnt for s in mine for x in s),
        }
    sizes = [sum(len(x) for x in samples) for _, samples in rows]
    histogram = [0] * HISTOGRAM_BINS
    for n in sizes:
        histogram[(n * HISTOGRAM_BINS - 1) // length] += 1
    tokens = sum(sizes)
    documents = made["long"][1].get("documents", {"whole": 0, "cut": 0, "filled": 0,
                                                  "samples_filled": 0})
    return {
        "stage": stage, "length": length, "sequences": len(rows),
        "mixture": {k: round(float(used[k] / norm), 6) if k in used else 0.0 for k in KINDS},
        "kinds": kinds, "long_documents": documents,
        "tokens": tokens, "learnt_tokens": sum(v["learnt_tokens"] for v in kinds.values()),
        "padding_fraction": round(1 - tokens / (len(rows) * length), 6),
        "mean_fill": round(sum(sizes) / len(sizes) / length, 6),
        "length_histogram": [{"upto": _edge(length, i), "sequences": histogram[i]}
                             for i in range(HISTOGRAM_BINS)],
    }


def _edge(length: int, i: int) -> int | float:
    edge = Fraction(length * (i + 1), HISTOGRAM_BINS)
    return int(edge) if edge.denominator == 1 else round(float(edge), 2)

