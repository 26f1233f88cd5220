"""Run 101 decoding steps with a static KV cache and print memory figures (used by test_runtime).

python tests/memloop.py FILE.endor {endor|ref} [--trace]  →  one JSON line:
  hwm[step]: the process's peak RSS in bytes after steps 2, 20 and 100,
  kv[step]: bytes held by the KV cache, py_endor: net Python bytes allocated by endor_gds code
  between steps 2 and 100 (a long span, so that even a few bytes leaked per token add up past a
  page; only with --trace: tracemalloc's own bookkeeping moves the peak, so
  peaks are measured in runs without it), buffers: ids and sizes of the runtime's buffer sets.
"""

import gc
import inspect
import json
import sys
import tracemalloc

import torch
import transformers

import endor_gds


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(path: str, which: str, trace: bool) -> None:
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
    cache = transformers.StaticCache(config=model.config, max_cache_len=128)
    # transformers renamed past_key_values to cache; take whichever this version has
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([[1, 5, 9, 22, 7, 101, 3]])
    out = {"hwm": {}, "kv": {}, "buffers": {}, "py_endor": None}
    if trace:
        tracemalloc.start()
    with torch.no_grad():
        for step in range(101):
            logits = model(ids, use_cache=True, **{key: cache}).logits
            ids = logits[:, -1:].argmax(-1)
            if step in (2, 20, 100):
                out["hwm"][step] = hwm()
                out["kv"][step] = sum(t.nbytes for layer in cache.layers
                                      for t in (layer.keys, layer.values) if t is not None)
                out["buffers"][step] = buffers()
            if trace and step in (2, 100):
                gc.collect()
                only_ours = [tracemalloc.Filter(True, "*endor_gds*")]
                snap = tracemalloc.take_snapshot().filter_traces(only_ours)
                if step == 2:
                    first = snap
    if trace:
        out["py_endor"] = sum(s.size_diff for s in snap.compare_to(first, "filename"))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--trace" in sys.argv[3:])
