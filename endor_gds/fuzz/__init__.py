"""On top of everything, the fuzzers' engines and oracles: damaged .endor files (fuzzlib, fuzzcheck) and damaged source
checkpoints (ckptfuzz). The CI runs a fixed seed of each (tests/fuzz/); bench/fuzz_*.py run long
campaigns. Shipped in the package so that the campaign scripts import only the installed package."""
