"""ImageNet class orders, derived from the synset lists that timm ships (no download).

The official Swin 22K head (21,841 outputs) does not use timm's sorted fall11 order. It is Google's
sorted list of 21,843 synsets (`imagenet21k_goog_synsets.txt`) with its two classes that have no images in
fall11 (n03931044, n09859684) overwritten by the last two synsets of that list, which is then cut to 21,841.
The 22K->1K head mapping selects, for each ImageNet-1K class in sorted wnid order, its row in that head.
One 1K class, n04399382 ("teddy, teddy bear"), is absent from fall11; the official mapping points it to
the 22K synset whose lemmas contain its first lemma "teddy" (n03013580), and so do we.
tests/test_checkpoint.py checks the result against the official `map22kto1k.txt`.
"""
from __future__ import annotations

from functools import lru_cache

from .compat import timm_info_text

NUM_22K = 21841


def _synsets(name: str) -> list[str]:
    return timm_info_text(name).split()


@lru_cache(maxsize=None)
def _lemmas() -> dict[str, list[str]]:
    text = timm_info_text("imagenet_synset_to_lemma.txt")
    out = {}
    for line in text.splitlines():
        wnid, _, lemmas = line.partition("\t")
        out[wnid] = [x.strip() for x in lemmas.split(",")]
    return out


@lru_cache(maxsize=None)
def imagenet22k_official_order() -> tuple[str, ...]:
    """The 21,841 wnids in the order of the official Swin 22K classifier rows."""
    goog = _synsets("imagenet21k_goog_synsets.txt")
    fall11 = set(_synsets("imagenet22k_synsets.txt"))
    empty = [i for i, w in enumerate(goog) if w not in fall11]
    if len(goog) - len(empty) != NUM_22K:
        raise RuntimeError(f"timm's synset lists changed: {len(goog)} goog synsets, {len(empty)} empty")
    order = list(goog)
    for slot, wnid in zip(empty, goog[NUM_22K:]):
        order[slot] = wnid
    return tuple(order[:NUM_22K])


@lru_cache(maxsize=None)
def imagenet22k_sorted_order() -> tuple[str, ...]:
    """The 21,841 fall11 wnids sorted: timm's and the public imagenet-22k-wds label order."""
    return tuple(_synsets("imagenet22k_synsets.txt"))


@lru_cache(maxsize=None)
def imagenet1k_order() -> tuple[str, ...]:
    return tuple(_synsets("imagenet_synsets.txt"))


@lru_cache(maxsize=None)
def map22k_to_1k() -> tuple[int, ...]:
    """For each of the 1,000 ImageNet-1K classes, its row in the official 22K classifier."""
    order = imagenet22k_official_order()
    row = {w: i for i, w in enumerate(order)}
    lemmas = _lemmas()
    out = []
    for wnid in imagenet1k_order():
        if wnid not in row:
            name = lemmas[wnid][0]
            hits = [w for w in order if name in lemmas.get(w, ())]
            if len(hits) != 1:
                raise RuntimeError(f"1K class {wnid} ({name}) has {len(hits)} lemma matches in 22K")
            wnid = hits[0]
        out.append(row[wnid])
    return tuple(out)
