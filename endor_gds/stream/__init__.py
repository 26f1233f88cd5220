"""Stage 6, streaming: the plan of each layer, the prefetch pipeline, the CPU and CUDA backends
behind it, and the runtime that attaches it all to an ordinary transformers model."""
