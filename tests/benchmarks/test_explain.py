"""The sentences under the end-to-end table: a missed target is explained by the run's own figures."""

from endor_gds.benchmarks.explain import bottleneck, explain


def _variant(name, s, nbytes, read=None, decode=None, compute=None):
    stats = None if read is None else {"per_token": {"read_s": read, "decode_s": decode, "compute_s": compute}}
    return {"name": name, "s_per_token_median": s, "bytes_per_token": nbytes, "stats": stats}


def _report(pruned_times, v2_decode, targets, device="cpu"):
    variants = [_variant("accelerate-disk", 3.0, 2.0e9),
                _variant("endor-dense", 1.2, 2.0e9, 1.0, 0.0, 0.3),
                _variant("endor-pruned", 1.0, 1.2e9, *pruned_times),
                _variant("endor-pruned-v2", 1.1, 1.0e9, 0.5, v2_decode, 0.3)]
    return {"variants": variants, "system": {"cpus": 2}, "device": device, "sparsity": 0.5,
            "byte_ratio": 2.0 / 1.2, "byte_ratio_v2": 1.2, "speedup_vs_accelerate": 3.0, "speedup_vs_dense": 1.2,
            "floor_s": 0.4, "best_floor_s": 0.35, "best_read_gbps": None, "fio_gbps": None,
            "checked_cost": {"endor-pruned": 1.2}, "targets": targets}


def test_a_compute_bound_miss_names_the_stage_and_its_figures():
    rep = _report((0.6, 0.2, 0.9), 0.6, {"speedup_vs_dense >= 0.95 * byte_ratio": False,
                                         "time_over_best_floor <= 1.10": False})
    rep["best_read_gbps"] = 3.0
    text = "\n".join(explain(rep))
    assert "the dense file 2000 MB, the 50%-pruned file 1200 MB (1.67x fewer bytes)" in text
    assert "3.00x faster than Accelerate's disk offload" in text and "1.20x faster than streaming the dense" in text
    assert ("target speedup_vs_dense >= 0.95 * byte_ratio: MISSED - per token summed over the layers, read 600 ms, "
            "decode 200 ms, compute 900 ms: compute on this host's 2 CPU cores is the slowest stage") in text
    assert ("target time_over_best_floor <= 1.10: MISSED - at 3.00 GB/s (the best read of the run) the pruned "
            "bytes take 0.350 s, the token took 1.000 s") in text
    assert "set for a GPU host" in text


def test_a_read_bound_miss_says_the_disk_sets_the_pace_and_v2_names_its_decode():
    text = "\n".join(explain(_report((0.9, 0.2, 0.3), 0.6, {"speedup_vs_accelerate >= 2.5": False,
                                                            "speedup_v2_vs_v1 >= 0.95 * byte_ratio_v2": False,
                                                            "checked_cost <= 1.05 for every variant": False},
                                     device="cuda:0")))
    assert "reading is the slowest stage, so the disk sets the pace" in text
    assert "v2 reads 1.20x fewer bytes, but its decode and compute take 900 ms per token against v1's 500 ms" in text
    assert "endor-pruned took 1.20x as long with its CRC-32C checks on: the checks run on the host CPU" in text
    assert "set for a GPU host" not in text


def test_targets_without_a_figure_say_what_would_give_one():
    targets = {"checked_cost <= 1.05 for every variant": None, "time_over_floor <= 1.10": None,
               "speedup_vs_accelerate >= 2.5": True}
    lines = explain(_report((0.9, 0.2, 0.3), 0.1, targets))
    assert "  target checked_cost <= 1.05 for every variant: n/a - measured only with --unchecked" in lines[-3]
    assert "apt-get install fio" in lines[-2] and lines[-1] == "  target speedup_vs_accelerate >= 2.5: met"
    assert bottleneck({"name": "accelerate-disk"}) is None


def test_a_token_slower_than_its_slowest_stage_says_the_overlap_was_lost():
    rep = _report((0.6, 0.2, 0.3), 0.1, {"speedup_vs_dense >= 0.95 * byte_ratio": False})
    pruned = rep["variants"][2]
    pruned.update(s_per_token_median=1.0, s_per_token_min=0.5, s_per_token_max=1.2)
    text = "\n".join(explain(rep))
    assert ("per token summed over the layers, read 600 ms, decode 200 ms, compute 300 ms, but the token took "
            "1000 ms: the stages "
            "overlapped only in part (waits between them); its tokens took 0.500 to 1.200 s") in text


def test_reads_slower_than_the_disk_alone_are_named():
    rep = _report((0.6, 0.2, 0.3), 0.1, {"speedup_vs_dense >= 0.95 * byte_ratio": False})
    rep["best_read_gbps"] = 3.0  # the pruned file's 1.2 GB in 0.6 s is 2.0 GB/s
    rep["variants"][2]["s_per_token_median"] = 0.65
    text = "\n".join(explain(rep))
    assert "reading is the slowest stage, and it ran at 2.00 GB/s against 3.00 GB/s for the disk alone" in text
