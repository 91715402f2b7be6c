"""MinHash-LSH near-duplicate removal over word n-gram shingles, shared by `filter` and `ingest`.

`word_shingles` lowercases and splits a text on whitespace and takes its word n-grams (the whole
text as one shingle when it has fewer than n words); `NearDuplicates` keeps an LSH index of the
items seen so far, in order: an item whose estimated Jaccard similarity with an earlier kept item
is above the threshold is a near duplicate of it, otherwise it joins the index.
"""

from __future__ import annotations


def word_shingles(text: str, n: int) -> list[bytes]:
    """Sorted, distinct word n-grams of `text` (lowercased, split on whitespace), as bytes."""
    words = text.lower().split()
    grams = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
    return sorted(g.encode() for g in grams)


class NearDuplicates:
    """A MinHash-LSH index (datasketch): `twin(key, shingles)` answers an earlier near-duplicate's key,
    or None after adding the item to the index."""

    def __init__(self, threshold: float, num_perm: int, seed: int):
        from datasketch import MinHashLSH

        self.num_perm, self.seed = num_perm, seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def twin(self, key, shingles: list[bytes]):
        """The smallest key of the earlier kept items this one nearly duplicates, or None (then it is kept)."""
        from datasketch import MinHash

        mh = MinHash(num_perm=self.num_perm, seed=self.seed)
        mh.update_batch(shingles)
        twins = self.lsh.query(mh)
        if twins:
            return min(twins)
        self.lsh.insert(key, mh)
        return None
