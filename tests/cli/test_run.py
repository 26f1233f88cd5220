"""``endor-gds run``: embedded tokenizer, --tokenizer, token-id prompts, --json stats."""

import json

import torch
import transformers
from reference import reference_model

import endor_gds
from endor_gds.benchmarks.models import build_model
from endor_gds.cli.main import main as cli_main


def test_run_with_embedded_tokenizer_matches_in_memory_model(packed, model_dir, capsys):
    path = packed("llama", torch.float16, prune="magnitude")
    prompt = "w5 w9 w22 w7"
    assert cli_main(["run", str(path), "--prompt", prompt, "--max-new-tokens", "5", "--device", "cpu",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the same prompt through the checkpoint's own tokenizer and the in-memory model

    tok = transformers.AutoTokenizer.from_pretrained(model_dir("llama", torch.float16))
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        ref = reference_model(path).generate(**ids, max_new_tokens=5, do_sample=False)
    assert out["tokens"] == ref[0, ids["input_ids"].shape[1]:].tolist()
    assert out["text"] == tok.decode(out["tokens"], skip_special_tokens=True)
    stats = out["stats"]
    assert stats["reader_mode"] in ("posix-direct", "posix-buffered") and stats["steps"] == 5
    for key in ("s", "bytes_read", "read_s", "decode_s", "compute_s", "stall_s", "overlap", "gbps"):
        assert key in stats["per_token"]


def test_run_human_output_and_tokenizer_dir(packed, model_dir, capsys):
    path = packed("mistral", torch.float16, prune="magnitude")
    assert cli_main(["run", str(path), "--prompt", "w3 w4", "--max-new-tokens", "3", "--device", "cpu",
                     "--tokenizer", str(model_dir("mistral", torch.float16)), "--tier", "ram",
                     "--prefetch-depth", "3"]) == 0
    text = capsys.readouterr().out
    assert "reader posix-" in text and "tier ram" in text and "prefetch depth 3" in text
    assert "tokens/s" in text and "overlap" in text


def test_run_without_tokenizer_takes_token_ids(tmp_path, capsys):
    src = build_model(tmp_path / "m", "opt", tokenizer=False)
    dst = tmp_path / "m.endor"
    endor_gds.pack(src, dst, prune="magnitude", progress=False)
    assert cli_main(["run", str(dst), "--prompt", "5 9 22", "--max-new-tokens", "4", "--device", "cpu",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] is None and len(out["tokens"]) == 4
    assert cli_main(["run", str(dst), "--prompt", "hello world", "--device", "cpu"]) != 0
    assert "no tokenizer" in capsys.readouterr().err
