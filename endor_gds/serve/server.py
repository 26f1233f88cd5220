"""``endor-gds serve FILE``: load the file as a streaming model and serve it over HTTP (uvicorn).

The model is loaded before the port is bound, so a bad file or argument is one line and exit
status 2 before anything listens. uvicorn handles Ctrl-C and SIGTERM: it stops accepting, lets the
requests in flight finish, then the batching loop and the runtime are closed.

Under ``torchrun`` (a file packed with ``--tp N``: ``torchrun --nproc-per-node N -m endor_gds serve
FILE``) every rank loads its shards and joins the batching loop; rank 0 alone listens, and the
others follow its steps until it stops (Ctrl-C or SIGTERM to torchrun reach every rank: the others
wait for rank 0 to drain).
"""

from __future__ import annotations

import os
import signal
import sys

from endor_gds.defaults import format_bytes, parse_bytes
from endor_gds.errors import MissingDependencyError
from endor_gds.modeling import load_tokenizer
from endor_gds.stream import parallel
from endor_gds.stream.experts import add_expert_arguments, expert_options
from endor_gds.stream.runtime import from_pretrained

__all__ = ["register", "cmd_serve"]


def _import_server():
    try:
        import uvicorn  # noqa: PLC0415 - the serve extra: only this command needs it

        from endor_gds.serve.app import create_app  # noqa: PLC0415 - imports fastapi (the serve extra)
    except ImportError as exc:
        raise MissingDependencyError(f"endor-gds serve needs fastapi and uvicorn ({exc.name} is missing): "
                                     f"pip install 'endor_gds[serve]'") from None
    return uvicorn, create_app


def cmd_serve(args) -> int:
    with parallel.torchrun_group(args.device) as tp:
        return _serve(args, follower=tp is not None and tp.rank != 0)


def _serve(args, follower: bool) -> int:
    from endor_gds.serve.engine import Engine  # noqa: PLC0415 - imports transformers' batching

    uvicorn, create_app = _import_server()
    kv_cache = parse_bytes(args.kv_cache)  # a bad value is named before the model is loaded
    model = from_pretrained(args.file, device=args.device, max_memory=args.max_memory, tier=args.tier,
                            prefetch_depth=args.prefetch_depth, io=args.io, **expert_options(args))
    rt = model.endor
    engine = None
    try:
        tokenizer = load_tokenizer(rt.file, args.tokenizer)
        eos = model.generation_config.eos_token_id
        first_eos = eos[0] if isinstance(eos, list) else eos
        pad = (tokenizer.pad_token_id if tokenizer is not None else None) or first_eos or 0
        engine = Engine(model, eos_token_id=eos, pad_token_id=pad, max_batch=args.max_batch,
                        max_queue=args.max_queue, seed=args.seed, kv_cache_bytes=kv_cache)
        if follower:  # a tensor-parallel rank but the first: its steps are rank 0's, until rank 0 stops
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda signum, frame: None)
            engine.follow()
            return 0
        name = args.model_name or os.path.splitext(os.path.basename(args.file))[0]
        app = create_app(engine, tokenizer, name, rt)
        print(f"endor-gds serve: {name} ({rt.file.architecture}, reader {rt.mode}, device {rt.device}, tier "
              f"{rt.tier}) at http://{args.host}:{args.port}/v1, batch up to {args.max_batch}, queue "
              f"{args.max_queue}, KV cache {format_bytes(engine.kv_cache_bytes)} ({engine.cache_tokens} tokens)",
              file=sys.stderr, flush=True)
        # uvicorn drains on SIGINT / SIGTERM, then raises the signal again under the handlers it
        # found: these note it, so a drained server exits 0 instead of dying of its own signal
        stopped_by = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: stopped_by.append(signal.Signals(signum).name))
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=args.drain_seconds)
        print(f"endor-gds serve: stopped ({', '.join(stopped_by) or 'shut down'}), requests in flight finished",
              file=sys.stderr, flush=True)
    finally:
        if engine is not None:
            engine.close()
        rt.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; concurrent requests share each weight pass")
    p.add_argument("file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: the file's name)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-memory", default=None, help="device budget, e.g. 20GiB (default: stream all layers)")
    p.add_argument("--tier", choices=("ssd", "ram"), default="ssd")
    p.add_argument("--prefetch-depth", type=int, default=None)
    p.add_argument("--io", choices=("auto", "kvikio", "posix-direct", "posix-buffered"), default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one in the file)")
    add_expert_arguments(p)
    p.add_argument("--max-batch", type=int, default=32, help="requests generating at once (one step serves all)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting; beyond it: 429 with Retry-After")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (shared by the batch)")
    p.add_argument("--kv-cache", default="2GiB", help="KV cache shared by the batch, outside --max-memory "
                   "(default 2GiB); requests wait for pages when it is full")
    p.add_argument("--drain-seconds", type=int, default=30, help="on Ctrl-C / SIGTERM, how long requests in "
                   "flight may take to finish")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)
