"""One rank of a tensor-parallel test run, started by ``torchrun`` (or by hand with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set): loads the file, generates greedily from the test prompts and
writes what the test checks to ``OUT/rank<r>.pt`` — or, when anything fails, the error's type and
message to ``OUT/rank<r>.json`` (exit 3).

    python tp_worker.py PATH OUT [--tier ssd|ram] [--die-rank R --die-step S] [--alone]

``--die-rank R --die-step S``: rank ``R`` ends its process abruptly (``os._exit``) at the start of
its forward step ``S``, as a crashed or killed rank would. ``--alone``: each process runs the
whole file (``process_group=None``) though a process group exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.reference import BATCH, BATCH_MASK, PROMPT  # noqa: E402

import endor_gds  # noqa: E402
from endor_gds.stream import parallel  # noqa: E402


def _generate(model, ids, mask=None):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("out")
    ap.add_argument("--tier", default="ssd")
    ap.add_argument("--die-rank", type=int, default=None)
    ap.add_argument("--die-step", type=int, default=None)
    ap.add_argument("--alone", action="store_true")
    args = ap.parse_args()
    tp = parallel.init_from_env("cpu")
    rank = tp.rank
    out = Path(args.out)
    t0 = time.monotonic()
    clean = False
    try:
        model = endor_gds.from_pretrained(args.path, device="cpu", tier=args.tier,
                                          process_group=None if args.alone else "auto")
        if args.die_rank == rank:
            steps = [0]

            def die(module, a):
                if steps[0] == args.die_step:
                    os._exit(17)
                steps[0] += 1

            model.register_forward_pre_hook(die)
        with torch.no_grad():
            logits = model(PROMPT).logits
            seq, gen_logits = _generate(model, PROMPT)
            batch_seq, batch_logits = _generate(model, BATCH, BATCH_MASK)
        summary = model.endor.summary()
        extents = sum(e.length for e in model.endor.file.layer_extents(model.endor.rank))
        torch.save({"logits": logits, "seq": seq, "gen_logits": gen_logits, "batch_seq": batch_seq,
                    "batch_logits": batch_logits, "summary": summary, "extent_bytes": extents},
                   out / f"rank{rank}.pt")
        model.endor.close()
        clean = True
    except Exception as exc:  # noqa: BLE001 - the test reads what each rank said
        (out / f"rank{rank}.json").write_text(json.dumps(
            {"type": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - t0}))
        return 3
    finally:
        parallel.shutdown(clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
