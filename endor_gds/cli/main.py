"""``endor-gds`` command line: pack | split | inspect | verify | run | serve | profile-io | bench | demo.

Every command that reads a file prints the reader mode in effect. A bad argument, a bad file or a
failing disk (an :class:`~endor_gds.errors.EndorError`, an argparse error or an OS error) is
printed as one line on stderr with exit status 2 (``--debug`` shows the traceback); 1 means verify
found a bad segment, 130 an interrupt. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from endor_gds._version import __version__
from endor_gds.benchmarks import e2e, profile_io
from endor_gds.cli import run as runtime_cli
from endor_gds.container import EndorFile
from endor_gds.defaults import format_bytes
from endor_gds.errors import ArgumentError, EndorError
from endor_gds.packing.packer import pack
from endor_gds.packing.policy import CODECS
from endor_gds.packing.split import split
from endor_gds.serve import server as serve_cli

__all__ = ["main", "build_parser"]


# -- pack / inspect / verify ------------------------------------------------------------------


def cmd_pack(args) -> int:

    # Wanda's arguments are passed only with --prune wanda; pack() rejects --calib without it.
    wanda = dict(calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                 calib_device=args.calib_device) if args.prune == "wanda" else {}
    if args.sparsity is not None and args.prune == "none":  # it would be ignored: say so
        raise ArgumentError(f"--sparsity {args.sparsity} prunes only with --prune magnitude or --prune "
                            f"wanda; without --prune the weights are kept as they are")
    report = pack(args.src, args.dst, prune=args.prune,
                  sparsity=0.5 if args.sparsity is None else args.sparsity,
                  progress=not args.quiet, calib=args.calib, codec=args.codec, tp=args.tp, **wanda)
    print(f"wrote {report.dst}: {format_bytes(report.file_bytes)} from {format_bytes(report.source_bytes)} "
          f"({report.source_bytes / max(report.file_bytes, 1):.2f}x smaller), {report.tensors} tensors, "
          f"{report.layers} layers, {report.seconds:.1f} s ({report.mb_per_s:.0f} MB/s)"
          + (f", each layer split over {args.tp} tensor-parallel ranks" if args.tp else ""))
    return 0


def cmd_split(args) -> int:

    for path in split(args.file, args.out_dir):
        print(f"wrote {path} ({format_bytes(path.stat().st_size)})")
    return 0


def cmd_inspect(args) -> int:

    with EndorFile(args.file) as f:
        s = f.summary()
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    t = s["totals"]
    print(f"{s['path']}: format v{s['format_version']}, {s['architecture']}, "
          f"{len({layer['index'] for layer in s['layers']})} layers, {len(s['tensors'])} tensors, "
          f"{format_bytes(s['file_bytes'])}")
    prune = s.get("prune") or {}
    if prune.get("method") not in (None, "none"):
        print(f"pruned: {prune.get('method')} at sparsity {prune.get('sparsity')}")
        unrouted = prune.get("unrouted_experts") or []
        if unrouted:  # Wanda on a mixture of experts: these had no activations to score by
            shown = ", ".join(unrouted[:8]) + (f", ... ({len(unrouted) - 8} more)" if len(unrouted) > 8 else "")
            print(f"  {len(unrouted)} expert(s) no calibration token was routed to, pruned by magnitude: {shown}")
    elif (prune.get("detected_sparsity") or 0) >= 0.01:  # types checked at open (layout)
        span = prune.get("detected_sparsity_range")
        per_tensor = f" (per tensor {span[0]:.3f}..{span[1]:.3f})" if span else ""
        print(f"already pruned checkpoint: measured sparsity {prune['detected_sparsity']:.3f} of the "
              f"linear weights{per_tensor}; --tensors lists each one")
    if s["tensor_parallel"]:
        tp = s["tensor_parallel"]
        print(f"tensor parallel: packed for {tp['size']} ranks, holds rank(s) {tp['ranks']} "
              f"(pack {tp['pack_id']}); plan: "
              + ", ".join(f"{m} {style}" for m, style in tp["plan"].items()))
    if s["resident"]:
        print(f"resident extent: {s['resident']['tensors']} tensors, {format_bytes(s['resident']['length'])}")
    ranked = s["tensor_parallel"] is not None  # a column for the rank whose shard each extent holds
    print(f"{'layer':>5} " + (f"{'rank':>4} " if ranked else "")
          + f"{'offset':>14} {'length':>12} {'tensors':>7} {'density':>8} {'ratio':>6}")
    for layer in s["layers"]:
        print(f"{layer['index']:>5} " + (f"{layer['rank']:>4} " if ranked else "")
              + f"{layer['offset']:>14} {layer['length']:>12} {layer['tensors']:>7} {layer['density']:>8.3f} "
                f"{layer['ratio']:>6.3f}")
    if s["experts"]:  # one extent per expert: a routed expert is one read
        layers = ", ".join(f"{i}: {x['count']} x <= {format_bytes(x['largest_bytes'])}"
                           for i, x in s["experts"].items())
        print(f"expert extents by layer: {layers}")
    if args.tensors:
        print(f"{'tensor':<56} {'shape':<14} {'dtype':<5} {'encoding':<8} {'codec':<12} "
              f"{'density':>8} {'bits/el':>7} {'stored':>11}")
        for e in s["tensors"]:
            shape = "x".join(map(str, e["shape"]))
            codec = e["codec"] if e["encoding"] == "bitmap" or e["codec"] != "raw" else "-"
            if e["expdict"]:  # index width and escapes: what the dictionary costs
                codec += f" b{e['expdict']['index_bits']}"
            if e["exphuff"]:  # the longest exponent code
                codec += f" <={max(e['exphuff']['code_lengths'])}b"
            print(f"{e['name']:<56} {shape:<14} {e['dtype']:<5} {e['encoding']:<8} {codec:<12} "
                  f"{e['density']:>8.3f} {e['bits_per_element']:>7.3f} {format_bytes(e['stored_bytes']):>11}")
    encoded = ""
    if t["encoded_ratio"]:
        codecs = ", ".join(f"{n} {c} at {t['codec_bits_per_element'][c]:.3f}" for c, n in t["codecs"].items() if n)
        encoded = (f", encoded tensors {t['encoded_ratio']:.3f}x = {t['encoded_bits_per_element']:.3f} "
                   f"bits per element (tensors by codec, bits per element: {codecs})")
    print(f"total: dense {format_bytes(t['dense_bytes'])}, stored {format_bytes(t['stored_bytes'])}, "
          f"ratio {t['ratio']:.3f}x{encoded}")
    return 0


def cmd_verify(args) -> int:

    # The offline check lists every bad segment: CRCs are its job, not the open's (verify_reads
    # would stop at the first damaged tile table, before the listing).
    with EndorFile(args.file, verify_reads=False) as f:
        bad = list(f.verify())
        count = sum(len(e.segments) for e in f.tensors.values()) + len(f.files)
    for err in bad:
        print(f"FAIL {err}", file=sys.stderr)
    if bad:
        print(f"{args.file}: {len(bad)} of {count} segments fail their checksum", file=sys.stderr)
        return 1
    print(f"{args.file}: OK, {count} segments match their CRC-32C")
    return 0


# -- parser -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line (argparse prints the whole usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="endor-gds",
        description="Pack checkpoints into .endor files and run them with layers streamed from storage.")
    ap.add_argument("--version", action="version", version=f"endor_gds {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack a Hugging Face checkpoint folder into one .endor file")
    p.add_argument("src", help="folder with config.json and *.safetensors")
    p.add_argument("dst", help="output .endor file (written atomically)")
    p.add_argument("--prune", choices=("none", "magnitude", "wanda"), default="none")
    p.add_argument("--sparsity", type=float, default=None,
                   help="with --prune: fraction zeroed per output row (default 0.5)")
    p.add_argument("--calib", help="wanda: calibration text file (.txt) or token ids (.ids)")
    p.add_argument("--calib-samples", type=int, default=128, help="wanda: calibration sequences")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="wanda: tokens per sequence")
    p.add_argument("--calib-device", default="cpu",
                   help="wanda: torch device holding one layer + the activations (cpu, cuda, cuda:1)")
    p.add_argument("--codec", choices=CODECS, default="auto",
                   help="how linear weights' values are stored, all lossless: auto = per tensor the "
                        "smallest of dense, raw (format v1) and expdict (format v2, exponent dictionary), "
                        "or exphuff (format v3, Huffman-coded exponents, also without a bitmap) where it "
                        "saves 5%% more (on a CPU the fused product multiplies exphuff ~1.5x slower than "
                        "expdict); raw; expdict or exphuff (forced for every linear weight)")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="split every layer over N tensor-parallel ranks (the model's base_model_tp_plan): "
                        "one extent per rank, run with torchrun --nproc-per-node N (format v5)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("split", help="write one file per rank of a tensor-parallel file (for per-node drives)")
    p.add_argument("file", help="a file packed with --tp N")
    p.add_argument("--out-dir", default=None, help="folder for <name>.rank<r>.endor (default: beside the file)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("inspect", help="per-layer and total sizes, densities and ratios")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every segment's CRC-32C (exit 1 naming bad segments)")
    p.add_argument("file")
    p.set_defaults(func=cmd_verify)

    runtime_cli.register(sub)
    serve_cli.register(sub)
    profile_io.register(sub)
    e2e.register(sub)  # bench and demo

    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (EndorError, OSError) as exc:
        if args.debug:
            raise
        print(f"endor-gds {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"endor-gds {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
