"""Stage 1, the codec: how one tensor is stored (bitmap, values, tile offsets; the expdict value
codec of format v2), in plain numpy, written to be read. The fast decoders are tested against it."""
