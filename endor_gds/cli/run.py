"""``endor-gds run``: generate text from an .endor file, streaming its layers, and print the stats.

Under ``torchrun`` (a file packed with ``--tp N``, ``torchrun --nproc-per-node N -m endor_gds run
FILE ...``) every rank starts the process group, loads its shards and runs the same generation;
rank 0 prints, with every rank's statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from endor_gds.errors import ArgumentError
from endor_gds.modeling import load_tokenizer
from endor_gds.stream import parallel
from endor_gds.stream.experts import add_expert_arguments, expert_options
from endor_gds.stream.runtime import from_pretrained

__all__ = ["register", "cmd_run"]


class PromptError(ArgumentError):
    """The prompt cannot be turned into token ids."""


def _prompt_ids(prompt: str, tokenizer):
    if tokenizer is not None:
        enc = tokenizer(prompt, return_tensors="pt")
        if enc["input_ids"].shape[1] == 0:
            raise PromptError(f"the tokenizer turned the prompt {prompt!r} into no tokens")
        return enc
    try:
        ids = [int(tok) for tok in prompt.split()]
    except ValueError:
        raise PromptError("this file embeds no tokenizer: give --tokenizer DIR, or a prompt of "
                          "whitespace-separated token ids") from None
    if not ids:
        raise PromptError("the prompt is empty")
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def _print_stats(s: dict, out) -> None:
    t = s["per_token"]
    print(f"reader {s['reader_mode']}, device {s['device']}, tier {s['tier']}, prefetch depth "
          f"{s['prefetch_depth']}, resident layers {len(s['resident_layers'])}, streamed layers "
          f"{s['streamed_layers']}, decoder {s['decoder']}", file=out)
    print(f"reader chosen: {s['reader_reason']}", file=out)
    print(f"checked reads: {s['checked_reads']}", file=out)
    print(f"fused product: {s['fused_product']}", file=out)
    print(f"per token: {t['s'] * 1e3:.1f} ms ({t['tokens_per_s']:.2f} tokens/s), "
          f"{t['bytes_read'] / 1e6:.1f} MB read at {t['gbps']:.2f} GB/s effective", file=out)
    print(f"  read {t['read_s'] * 1e3:.1f} ms, decode {t['decode_s'] * 1e3:.1f} ms, compute "
          f"{t['compute_s'] * 1e3:.1f} ms, stall {t['stall_s'] * 1e3:.1f} ms, overlap "
          f"{t['overlap'] * 100:.0f} %", file=out)
    x = s.get("experts")
    if x is not None:
        print(f"experts ({x['mode']}, cache {x['cache_experts']} experts, {x['cache_bytes'] / 1e6:.1f} MB, "
              f"prefetch {'on' if x['prefetch'] else 'off'}) per token: {t['experts_routed']:.1f} routed, "
              f"{t['experts_read']:.1f} read, {t['expert_hits']:.1f} cache hits, {t['experts_prefetched']:.1f} "
              f"read ahead of which {t['prefetch_hits']:.1f} routed", file=out)
    tp = s.get("tensor_parallel")
    if tp is not None:
        print(f"tensor parallel: {tp['size']} ranks ({tp['backend']}), per token and rank:", file=out)
        for r, x in enumerate(tp["ranks"]):
            print(f"  rank {r}: {x['bytes_read'] / 1e6:.1f} MB read, read {x['read_s'] * 1e3:.1f} ms, decode "
                  f"{x['decode_s'] * 1e3:.1f} ms, compute {x['compute_s'] * 1e3:.1f} ms, all-reduce "
                  f"{x['collective_s'] * 1e3:.1f} ms, {x['s'] * 1e3:.1f} ms in all ({x['file']})", file=out)


def cmd_run(args) -> int:
    with parallel.torchrun_group(args.device) as tp:
        return _run(args, quiet=tp is not None and tp.rank != 0)


def _run(args, quiet: bool) -> int:
    max_memory = args.max_memory
    model = from_pretrained(args.file, device=args.device, max_memory=max_memory, tier=args.tier,
                            prefetch_depth=args.prefetch_depth, io=args.io,
                            verify_reads=args.verify_reads, **expert_options(args))
    rt = model.endor
    try:
        tokenizer = load_tokenizer(rt.file, args.tokenizer)
        inputs = {k: v.to(rt.device) for k, v in _prompt_ids(args.prompt, tokenizer).items()}
        gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)
        if args.do_sample:
            gen.update(temperature=args.temperature, top_p=args.top_p)
        if tokenizer is None or tokenizer.pad_token_id is None:
            gen["pad_token_id"] = model.generation_config.eos_token_id or 0
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, **gen)
        wall = time.perf_counter() - t0
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
        summary = rt.summary()  # under torchrun, a collective: every rank's figures reach each
        summary["generate_s"] = wall
        if quiet:  # a tensor-parallel rank but the first: rank 0 prints for all
            return 0
        if args.json:
            print(json.dumps({"prompt": args.prompt, "text": text, "tokens": new, "stats": summary},
                             indent=1))
        else:
            print(text if text is not None else " ".join(map(str, new)))
            _print_stats(summary, sys.stdout)
    finally:
        rt.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="generate from an .endor file, streaming its layers")
    p.add_argument("file")
    p.add_argument("--prompt", required=True, help="text, or token ids when the file has no tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-memory", default=None, help="device budget, e.g. 20GiB (default: stream all layers)")
    p.add_argument("--tier", choices=("ssd", "ram"), default="ssd",
                   help="ssd: read layers from the file each token; ram: keep compressed extents in RAM")
    p.add_argument("--prefetch-depth", type=int, default=None, help="buffer sets (default 2)")
    p.add_argument("--io", choices=("auto", "kvikio", "posix-direct", "posix-buffered"), default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one in the file)")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify-reads", action=argparse.BooleanOptionalAction, default=None,
                   help="check every segment's CRC-32C as it is read (default: on, ENDOR_VERIFY_READS)")
    p.add_argument("--json", action="store_true", help="text, tokens and statistics as JSON")
    add_expert_arguments(p)
    p.set_defaults(func=cmd_run)
