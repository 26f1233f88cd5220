"""The packer's storage policy: for each linear weight, the smallest of dense, bitmap + raw values
and bitmap + expdict values (format v2), page padding included."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from endor_gds.codec.bitmap import MAX_SPARSE_ELEMS, DType, choose_encoding, stored_nbytes
from endor_gds.codec.expdict import LAYOUTS, best_expdict, exponent_histogram

__all__ = ["CODECS", "Storage", "choose_storage"]


CODECS = ("auto", "raw", "expdict")  # what the packer may be asked for (``pack(codec=...)``)


@dataclass(frozen=True)
class Storage:
    """How one tensor is stored: ``dense``, or ``bitmap`` with codec ``raw`` or ``expdict``."""

    encoding: str
    codec: str = "raw"
    expdict: object = None  # endor_gds.codec.expdict.ExpDict when codec == "expdict"


def choose_storage(dtype: DType, shape: tuple[int, ...], bits: np.ndarray, codec: str = "auto") -> Storage:
    """The storage of a linear weight whose flat bit patterns are ``bits``.

    ``codec="raw"``: format v1's rule (:func:`choose_encoding`). ``"expdict"``: bitmap + expdict
    for every tensor that may be bitmap-encoded, whatever the size (forcing it, for tests and
    comparisons). ``"auto"``: the smallest on disk, page padding included, of dense, bitmap + raw
    and bitmap + expdict (on a tie the simpler one: dense, then raw).
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    nnz = int(np.count_nonzero(bits))
    raw = Storage(choose_encoding(dtype, shape, nnz))
    n = int(bits.size)
    if codec == "raw" or dtype.name not in LAYOUTS or len(shape) < 2 or n == 0 or n > MAX_SPARSE_ELEMS:
        return raw
    hist = exponent_histogram(bits, LAYOUTS[dtype.name])
    hist[0] -= n - nnz  # the zeros (exponent field 0) are not values
    params, _ = best_expdict(hist, n, LAYOUTS[dtype.name])
    packed = Storage("bitmap", "expdict", params)
    if codec == "expdict":
        return packed
    size = {s: stored_nbytes(s.encoding, n, nnz, dtype.itemsize, s.expdict) for s in (raw, packed)}
    return packed if size[packed] < size[raw] else raw
