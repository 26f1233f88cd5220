"""Stage 2, packing (``endor_gds.pack`` is the function that runs it): checkpoint folders read
tensor by tensor, pruning (magnitude, Wanda), the storage policy per tensor, and the packer that
writes one ``.endor`` file atomically."""
