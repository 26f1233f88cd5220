"""Stage 4, reading: extents of a file into memory (posix-direct, posix-buffered, KvikIO with GDS
or in compat mode), the aligned and pinned host buffers they land in, and the page cache."""
