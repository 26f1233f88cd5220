"""What an end-to-end report shows, in words: the lines printed under the demo's and bench's table.

A reader who has not seen the project gets the bytes each variant reads, the speedups, and for a
target missed on this host, why, from the run's own per-token figures (how long reading, decoding
and computing took): a figure below its target with no reason reads as a bug.
"""

from __future__ import annotations

__all__ = ["explain", "bottleneck"]

STAGES = ("read", "decode", "compute")


def _ms(per_token: dict, stage: str) -> float:
    return per_token.get(f"{stage}_s", 0.0) * 1e3


def bottleneck(variant: dict) -> tuple[str, dict[str, float]] | None:
    """``(slowest stage, {stage: ms per token})`` of a streaming variant, or None for Accelerate.

    The three stages run at once (reads and decodes of the next layers behind this layer's compute),
    so the slowest one sets the time per token."""
    per_token = ((variant.get("stats") or {}).get("per_token")) or None
    if per_token is None:
        return None
    ms = {stage: _ms(per_token, stage) for stage in STAGES}
    return max(ms, key=ms.get), ms


def _why_slow(variant: dict, cpus: int | None, device: str, disk_gbps: float | None = None) -> str:
    b = bottleneck(variant)
    if b is None:
        return ""
    stage, ms = b
    # summed over the layers: reads (and decodes) of neighbouring layers overlap, so a sum may
    # exceed the token's own time
    parts = "summed over the layers, " + ", ".join(f"{s} {ms[s]:.0f} ms" for s in STAGES)
    wall = variant["s_per_token_median"] * 1e3
    if wall > 1.15 * ms[stage]:  # no one stage accounts for the time: overlap lost, or a noisy run
        lo, hi = variant.get("s_per_token_min"), variant.get("s_per_token_max")
        spread = f"; its tokens took {lo:.3f} to {hi:.3f} s (a wide spread: run more --rounds)" \
            if lo and hi and hi > 1.3 * lo else ""
        return (f"per token {parts}, but the token took {wall:.0f} ms: the stages overlapped only in "
                f"part (waits between them){spread}")
    if stage == "read":
        gbps = variant["bytes_per_token"] / (ms["read"] / 1e3) / 1e9 if ms["read"] else None
        if gbps and disk_gbps and gbps < 0.9 * disk_gbps:
            return (f"per token {parts}: reading is the slowest stage, and it ran at {gbps:.2f} GB/s "
                    f"against {disk_gbps:.2f} GB/s for the disk alone: the reads slowed while decode "
                    f"and compute ran beside them (shared cores, or the disk's speed drifting)")
        return f"per token {parts}: reading is the slowest stage, so the disk sets the pace"
    where = f"this host's {cpus} CPU cores" if device == "cpu" and cpus else device
    return (f"per token {parts}: {stage} on {where} is the slowest stage, not the disk, so fewer "
            f"bytes read shorten only the read")


# Why a target has no figure: the run left out what it compares.
NOT_RUN = {  # the first key a target's name starts with
    "speedup_vs_accelerate >= 5 (mixture": "a mixture-of-experts config only (--config qwen3-moe-5b)",
    "routed experts": "a mixture-of-experts config with --all-experts (every expert read, interleaved)",
    "checked_cost": "measured only with --unchecked (each streaming variant run again with checks off)",
    "speedup_vs_accelerate": "needs the Accelerate run (left out by --no-accelerate)",
    "time_over_floor": "needs fio's reference read speed (apt-get install fio)",
    "speedup_v2_vs_v1": "needs the format v2 variant (left out by --no-v2)",
    "speedup_v3_vs_v1": "needs the format v3 variant (run with --v3)",
}


def _times(r: float) -> str:
    return f"{r:.2f}x faster than" if r >= 1 else f"{1 / r:.2f}x slower than"


def explain(rep: dict) -> list[str]:
    """Plain sentences for ``rep`` (a report of :func:`endor_gds.benchmarks.e2e.make_report`)."""
    by = {v["name"]: v for v in rep["variants"]}
    dense, pruned, v2 = by.get("endor-dense"), by.get("endor-pruned"), by.get("endor-pruned-v2")
    v3 = by.get("endor-dense-v3")
    acc = by.get("accelerate-disk")
    cpus, device = rep["system"].get("cpus"), rep["device"]
    size = lambda v: f"{v['bytes_per_token'] / 1e6:.{1 if v['bytes_per_token'] < 1e8 else 0}f} MB"  # noqa: E731 - as the table
    lines = []
    if dense and pruned:
        s = (f"Each token reads every streamed layer once: the dense file {size(dense)}, the "
             f"{rep['sparsity']:.0%}-pruned file {size(pruned)} ({rep['byte_ratio']:.2f}x fewer bytes)")
        if v2:
            s += (f", and in format v2 (exponent dictionary, the same weights bit for bit) "
                  f"{size(v2)} ({dense['bytes_per_token'] / v2['bytes_per_token']:.2f}x fewer)")
        if v3:
            s += (f"; the unpruned model in format v3 (Huffman-coded exponents, the same weights bit "
                  f"for bit) {size(v3)} ({rep['byte_ratio_v3']:.2f}x fewer than the dense file)")
        lines.append(s + ".")
    if pruned:
        s = f"Streaming the pruned file took {pruned['s_per_token_median']:.3f} s per token"
        if acc:
            s += (f": {_times(rep['speedup_vs_accelerate'])} Accelerate's disk offload of the "
                  f"dense checkpoint ({acc['s_per_token_median']:.3f} s)")
        if dense:
            s += f"{', and' if acc else ':'} {_times(rep['speedup_vs_dense'])} streaming the dense file"
        lines.append(s + ".")
    reasons = _target_reasons(rep, by, cpus, device)
    missed = [name for name, ok in rep["targets"].items() if ok is False]
    if missed and device == "cpu":
        lines.append("The targets (docs/design.md) are set for a GPU host with NVMe; on a CPU-only host "
                     "the decode runs on the same cores as the model's compute.")
    for name, ok in rep["targets"].items():
        if ok is None:
            why = next((text for key, text in NOT_RUN.items() if name.startswith(key)), "not measured")
            lines.append(f"  target {name}: n/a - {why}")
        else:
            why = reasons.get(name, "") if not ok else ""
            lines.append(f"  target {name}: {'met' if ok else 'MISSED'}" + (f" - {why}" if why else ""))
    return lines


def _target_reasons(rep: dict, by: dict, cpus, device: str) -> dict[str, str]:
    """For each target, the run's own figures that explain a miss."""
    pruned, v2, v3 = by.get("endor-pruned"), by.get("endor-pruned-v2"), by.get("endor-dense-v3")
    dense = by.get("endor-dense")
    disk = rep.get("best_read_gbps")
    slow = _why_slow(pruned, cpus, device, disk) if pruned else ""
    out = {}
    for name in rep["targets"]:
        if name.startswith("checked_cost"):
            worst = max(rep.get("checked_cost", {}).items(), key=lambda kv: kv[1], default=None)
            if worst:
                out[name] = (f"{worst[0]} took {worst[1]:.2f}x as long with its CRC-32C checks on: "
                             + (f"the checks run on the same {cpus} CPU cores as decode and compute"
                                if device == "cpu" else "the checks run on the host CPU"))
        elif name.startswith(("speedup_v2_vs_v1", "speedup_v3_vs_v1")):
            # decode and compute together: the CPU fused product decodes inside the matmul
            old, new, tag = (pruned, v2, "v2") if name.startswith("speedup_v2") else (dense, v3, "v3")
            if not (old and new):
                continue
            d1, d2 = (sum(_ms((v.get("stats") or {}).get("per_token", {}), stage) for stage in ("decode", "compute"))
                      for v in (old, new))
            out[name] = (f"{tag} reads {rep['byte_ratio_' + tag]:.2f}x fewer bytes, but its decode and compute "
                         f"take {d2:.0f} ms per token against v1's {d1:.0f} ms" if d2 > d1
                         else _why_slow(new, cpus, device, disk))
        elif name.startswith("time_over"):
            floor = rep["best_floor_s"] if "best" in name else rep["floor_s"]
            speed = rep.get("best_read_gbps") if "best" in name else rep.get("fio_gbps")
            if floor and speed and pruned:
                out[name] = (f"at {speed:.2f} GB/s ({'the best read of the run' if 'best' in name else 'fio'}) "
                             f"the pruned bytes take {floor:.3f} s, the token took "
                             f"{pruned['s_per_token_median']:.3f} s; {slow}")
        else:
            out[name] = slow
    return out
