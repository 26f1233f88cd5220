"""The packer's storage policy: for each linear weight, the smallest of dense, bitmap + raw values
and bitmap + expdict values (format v2), page padding included."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from endor_gds.codec.bitmap import MAX_SPARSE_ELEMS, DType, choose_encoding, stored_nbytes
from endor_gds.codec.expdict import LAYOUTS, best_expdict, exponent_histogram
from endor_gds.codec.exphuff import best_exphuff

__all__ = ["CODECS", "Storage", "choose_storage"]


CODECS = ("auto", "raw", "expdict", "exphuff")  # what the packer may be asked for (``pack(codec=...)``)


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
    bitmap + raw, bitmap + expdict, exphuff dense and bitmap + exphuff (on a tie the simpler, in
    that order).
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
    options = ([] if codec == "exphuff" else [raw, expdict]) + huffs
    size = [s.nbytes(n, nnz, dtype.itemsize) for s in options]
    return options[size.index(min(size))]  # the first of the smallest: the simplest
