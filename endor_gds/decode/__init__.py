"""Stage 5, decoding: one thin wrapper per native decoder, ``cpu`` over ``csrc/endor_cpu.c`` and
``gpu`` over ``cuda/endor_decode.cu``; both bit-exact against :mod:`endor_gds.codec`."""
