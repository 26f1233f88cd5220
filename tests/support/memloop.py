"""Run 101 (or N + 1) decoding steps with a static KV cache; print memory figures (for test_runtime).

python tests/support/memloop.py FILE.endor {endor|ref} [--trace] [--steps N]  →  one JSON line:
  hwm[step]: the process's peak RSS in bytes after steps 2, 20 and 100,
  rss[step]: its current RSS after those steps and after every eighth of N steps (default 100;
  a long run shows whether a growth keeps going or levels off, docs/performance.md),
  kv[step]: bytes held by the KV cache, py_endor: net Python bytes allocated by endor_gds code
  between steps 20 and 100 (a long span, so that even a few bytes leaked per token add up past a
  page; from step 20, when the memos kept per layer and buffer set are all built; each snapshot
  taken with the prefetches in flight waited out, so that what they hold at that instant — futures,
  a piece counter, a queued job — is the same in both; only with --trace: tracemalloc's own
  bookkeeping moves the peak, so peaks are measured in runs without it), buffers: ids and sizes of
  the runtime's buffer sets.
"""

import ctypes
import gc
import inspect
import json
import sys
import tracemalloc

import torch
import transformers

import endor_gds


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes the C heap has handed out and not taken back (glibc ``mallinfo2``: small blocks in use
    plus mmap-ed large ones): what a native leak grows, whether or not its pages are resident. A
    kernel that pages cold memory out on its own (DAMON's ``pageout`` scheme on some VMs) moves
    RSS and its peak both ways, so those are not the measure of a leak there."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def proc_status(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM, VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def settle(model) -> None:
    """Wait out the prefetches in flight (a read and decode the next token's first layers started)."""
    pipeline = getattr(getattr(model, "endor", None), "pipeline", None)
    for job in list(pipeline._pending) if pipeline is not None else ():
        job.ready.result()


def main(path: str, which: str, trace: bool, steps: int) -> None:
    if which == "ref":
        with endor_gds.open(path) as f:
            cfg = transformers.AutoConfig.for_model(**f.config)
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
            model.load_state_dict({k: f.read_tensor(k) for k in model.state_dict()})
        buffers = lambda: []  # noqa: E731
    else:
        model = endor_gds.from_pretrained(path, device="cpu")
        be = model.endor.backend
        buffers = lambda: [(id(b), b.nbytes) for b in be._staging + be._arena if b is not None]  # noqa: E731
    cache = transformers.StaticCache(config=model.config, max_cache_len=max(128, steps + 16))
    # transformers renamed past_key_values to cache; take whichever this version has
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([[1, 5, 9, 22, 7, 101, 3]])
    out = {"hwm": {}, "rss": {}, "heap": {}, "kv": {}, "buffers": {}, "py_endor": None}
    marks = {2, 20, 100} | {steps * i // 8 for i in range(1, 9)}
    if trace:
        tracemalloc.start()
    with torch.no_grad():
        for step in range(max(steps, 100) + 1):
            logits = model(ids, use_cache=True, **{key: cache}).logits
            ids = logits[:, -1:].argmax(-1)
            if step in marks:
                out["rss"][step] = proc_status("VmRSS")
            if step in (2, 20, 100):
                out["hwm"][step] = proc_status("VmHWM")
                out["heap"][step] = heap_in_use()
                out["kv"][step] = sum(t.nbytes for layer in cache.layers
                                      for t in (layer.keys, layer.values) if t is not None)
                out["buffers"][step] = buffers()
            if trace and step in (20, 100):
                settle(model)
                gc.collect()
                only_ours = [tracemalloc.Filter(True, "*endor_gds*")]
                snap = tracemalloc.take_snapshot().filter_traces(only_ours)
                if step == 20:
                    first = snap
    if trace:
        out["py_endor"] = sum(s.size_diff for s in snap.compare_to(first, "filename"))
    print(json.dumps(out))


if __name__ == "__main__":
    flags = sys.argv[3:]
    main(sys.argv[1], sys.argv[2], "--trace" in flags,
         int(flags[flags.index("--steps") + 1]) if "--steps" in flags else 100)
