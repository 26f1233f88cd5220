"""The packer's storage policy: for each linear weight, the smallest of dense, bitmap + raw values
and bitmap + expdict values (format v2), page padding included, or exphuff (format v3) where it is
clearly smaller (EXPHUFF_MIN_SAVING)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from endor_gds.codec.bitmap import MAX_SPARSE_ELEMS, DType, choose_encoding, stored_nbytes
from endor_gds.codec.expdict import LAYOUTS, best_expdict, exponent_histogram
from endor_gds.codec.exphuff import best_exphuff

__all__ = ["CODECS", "EXPHUFF_MIN_SAVING", "Storage", "choose_storage"]


CODECS = ("auto", "raw", "expdict", "exphuff")  # what the packer may be asked for (``pack(codec=...)``)
# Under "auto", exphuff is taken only when it is at least this much smaller than the best of the
# others: on a CPU host the fused product (decode/fused.py) rebuilds an exphuff tile's values at
# ~1.5x the cost of an expdict tile's. Measured on a 50 %-pruned bf16 TinyLlama in RAM, 2 cores
# (Intel Xeon VM): expdict 0.296 s/token, exphuff 0.444 fused (0.693 decoded), for a file 2.7 %
# smaller (docs/performance.md). Pruned weights gain 3-4 % from exphuff and keep expdict;
# unpruned ones gain 11-14 % and take it.
EXPHUFF_MIN_SAVING = 0.05


@dataclass(frozen=True)
class Storage:
    """How one tensor is stored: ``dense`` or ``bitmap``, its values with codec ``raw``, ``expdict``
    (bitmap only) or ``exphuff`` (either)."""

    encoding: str
    codec: str = "raw"
    expdict: object = None  # endor_gds.codec.expdict.ExpDict when codec == "expdict"
    exphuff: object = None  # endor_gds.codec.exphuff.ExpHuff (bound to the values) when "exphuff"

    @property
    def params(self):
        return self.expdict if self.expdict is not None else self.exphuff

    def nbytes(self, n: int, nnz: int, itemsize: int) -> int:
        """Bytes on disk, page padding and the parameters' share of the manifest included."""
        extra = len(self.expdict.exponents) if self.expdict is not None else \
            len(self.exphuff.lengths) if self.exphuff is not None else 0
        return stored_nbytes(self.encoding, n, nnz, itemsize, self.params) + extra


def choose_storage(dtype: DType, shape: tuple[int, ...], bits: np.ndarray, codec: str = "auto") -> Storage:
    """The storage of a linear weight whose flat bit patterns are ``bits``.

    ``codec="raw"``: format v1's rule (:func:`choose_encoding`). ``"expdict"``: bitmap + expdict
    for every tensor that may be bitmap-encoded, whatever the size; ``"exphuff"``: exphuff for
    every such tensor, dense or bitmap, whichever is smaller (forcing a codec, for tests and
    comparisons). ``"auto"``: the smallest on disk, page padding and parameters included, of dense,
    bitmap + raw and bitmap + expdict (on a tie the simpler, in that order), unless exphuff, dense or
    bitmap, is smaller than that by :data:`EXPHUFF_MIN_SAVING` or more.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    nnz = int(np.count_nonzero(bits))
    raw = Storage(choose_encoding(dtype, shape, nnz))
    n = int(bits.size)
    if codec == "raw" or dtype.name not in LAYOUTS or len(shape) < 2 or n == 0 or n > MAX_SPARSE_ELEMS:
        return raw
    layout = LAYOUTS[dtype.name]
    every = exponent_histogram(bits, layout)  # every element's exponent: a zero has exponent 0
    hist = every.copy()
    hist[0] -= n - nnz  # the non-zeros' exponents
    expdict = Storage("bitmap", "expdict", expdict=best_expdict(hist, n, layout)[0])
    if codec == "expdict":
        return expdict
    huffs = [Storage("dense", "exphuff", exphuff=best_exphuff(every, layout)),
             Storage("bitmap", "exphuff", exphuff=best_exphuff(hist, layout))]
    size = {s: s.nbytes(n, nnz, dtype.itemsize) for s in (raw, expdict, *huffs)}
    huff = min(huffs, key=size.get)  # the first of the smallest: the simpler on a tie
    if codec == "exphuff":
        return huff
    best = min((raw, expdict), key=size.get)
    return huff if size[huff] <= (1 - EXPHUFF_MIN_SAVING) * size[best] else best
