"""``endor-gds serve`` in a subprocess on a free port, spoken to by the official ``openai`` client:
completions and chat, streamed and not, equal to the in-memory model's greedy tokens; concurrent
clients each get what their prompt gets alone; every bad input its status and OpenAI error body; a
client gone mid-stream frees its slot and changes no one else's tokens; a step that fails a checksum
fails its requests with a 500 naming it and the server goes on; SIGTERM lets a stream finish."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers
from reference import reference_model

import endor_gds
from endor_gds.benchmarks.models import build_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_POS = 128
PROMPTS = ["w5 w9 w22", "w7", "w11 w12 w13 w14 w15 w16", "w100 w3", "w42 w42 w42 w42", "w8 w9",
           "w200 w201 w202 w203 w204 w205 w206 w207 w208", "w17 w18 w19"]


def _http(method: str, url: str, body=None, raw: bytes | None = None, timeout: float = 60):
    """``(status, headers, text)`` of one plain HTTP request (the stdlib: no client of our own)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, path: Path, *args: str, ranks: int = 1):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        launch = [sys.executable] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        self.proc = subprocess.Popen([*launch, "-m", "endor_gds", "serve", str(path), "--device", "cpu",
                                      "--port", str(self.port), "--model-name", "tiny", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                if _http("GET", self.url + "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise TimeoutError("the server did not start")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = _http("GET", self.url + "/metrics")[2]
        return {ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln and not ln.startswith("#")}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    src = build_model(root / "ckpt", "llama", torch.float32, max_position_embeddings=MAX_POS)
    path = root / "tiny.endor"
    endor_gds.pack(src, path, prune="magnitude", progress=False)
    return path, transformers.AutoTokenizer.from_pretrained(src)


@pytest.fixture(scope="module")
def server(model_file):
    s = Server(model_file[0])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alone(model_file):
    """What the in-memory model gives each prompt alone, greedy: ids -> text."""
    path, tok = model_file
    ref = reference_model(path)

    def run(ids: list[int], n: int) -> str:
        ids_t = torch.tensor([ids])  # a mask of ones: token 0 (<unk>) is a word here, not padding
        with torch.no_grad():
            out = ref.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=2)
        return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)

    return run


def _ids(tok, text):
    return tok(text)["input_ids"]


def _four_at_once(server) -> list[str]:
    """The texts of the first four prompts, asked concurrently (one batch), greedy, 8 tokens each."""
    def ask(prompt):
        r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(ask, PROMPTS[:4]))


def test_completion_equals_the_model_alone(server, model_file, alone):
    tok = model_file[1]
    r = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == alone(_ids(tok, PROMPTS[0]), 12)
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason in ("length", "stop")
    streamed = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                stream=True)
    parts = [c.choices[0].text for c in streamed]
    assert "".join(parts) == r.choices[0].text and len(parts) >= 2


def test_a_stop_string_ends_the_text_before_it(server, model_file, alone):
    want = alone(_ids(model_file[1], PROMPTS[0]), 12).split(" ")
    stop = " " + want[3]  # the fourth word: the text ends after the third
    cut = " ".join(want[:want.index(want[3])])
    for stream in (False, True):
        r = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                             stop=[stop, "never-seen"], stream=stream)
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (cut, "stop")


def test_chat_streamed_and_not(server, model_file, alone):
    tok = model_file[1]
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    want = alone(list(ids), 10)
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                        temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_eight_concurrent_clients_each_get_their_prompt_alone(server, model_file, alone):
    tok = model_file[1]
    steps_before = server.metrics()["endor_forward_steps_total"]

    def ask(prompt):
        r = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, PROMPTS))
    assert got == [alone(_ids(tok, p), 16) for p in PROMPTS]
    # batched: 8 requests of 16 tokens took far fewer than 8 x 16 forward steps (one weight pass each)
    steps = server.metrics()["endor_forward_steps_total"] - steps_before
    assert steps < 8 * 16 / 2, steps


def test_tensor_parallel_serving_over_two_ranks(model_file, alone, tmp_path):
    """`torchrun --nproc-per-node 2 -m endor_gds serve` on a file packed with --tp 2: rank 0 listens,
    both ranks run each batched step (transformers' continuous batching, tensor-parallel); four
    concurrent greedy completions each equal the in-memory model's answer alone; SIGTERM to
    torchrun drains rank 0 and ends both ranks."""
    path, tok = model_file
    split = tmp_path / "tp2.endor"
    endor_gds.pack(path.parent / "ckpt", split, prune="magnitude", progress=False, tp=2)
    server = Server(split, ranks=2)
    try:
        assert _four_at_once(server) == [alone(_ids(tok, p), 8) for p in PROMPTS[:4]]
    finally:
        server.stop()
    err = server.proc.stderr.read()
    # (torchrun itself exits 1 on a signal, by design; its ranks end cleanly)
    assert "requests in flight finished" in err, err[-3000:]
    assert "TensorParallelError" not in err and "endor-gds serve: " in err, err[-3000:]


def test_tensor_parallel_serving_needs_divisible_kv_heads(model_file, tmp_path):
    """4 ranks over 2 key/value heads: `run` replicates them, transformers' paged cache cannot;
    every rank says so before listening."""
    path, _ = model_file
    split = tmp_path / "tp4.endor"
    endor_gds.pack(path.parent / "ckpt", split, prune="magnitude", progress=False, tp=4)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m",
                        "endor_gds", "serve", str(split), "--device", "cpu", "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "serving over 4 ranks needs num_key_value_heads (2) to divide among them" in r.stderr, r.stderr[-3000:]


def test_a_client_gone_mid_stream_frees_its_slot_and_changes_nothing_else(server, model_file, alone):
    tok = model_file[1]

    def full(prompt):
        return "".join(c.choices[0].text for c in server.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, stream=True))

    def leave_early():
        stream = server.client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=100,
                                                  temperature=0, stream=True)
        for i, _ in enumerate(stream):
            if i == 2:
                stream.close()  # the client goes away
                return i

    with ThreadPoolExecutor(3) as pool:
        a, gone, b = pool.submit(full, PROMPTS[1]), pool.submit(leave_early), pool.submit(full, PROMPTS[3])
        assert gone.result() == 2
        assert a.result() == alone(_ids(tok, PROMPTS[1]), 40) and b.result() == alone(_ids(tok, PROMPTS[3]), 40)
    deadline = time.monotonic() + 10
    while server.metrics()["endor_batch_size"] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metrics()["endor_batch_size"] == 0


BAD = [
    ({"model": "gpt-4", "prompt": "w5"}, 404, "model_not_found", "does not exist"),
    ({"model": "tiny", "prompt": "w5", "max_tokens": 0}, 400, None, "max_tokens must be >= 1, got 0"),
    ({"model": "tiny", "prompt": "w5", "max_tokens": -3}, 400, None, "max_tokens must be >= 1, got -3"),
    ({"model": "tiny", "prompt": " ".join(["w5"] * MAX_POS)}, 400, "context_length_exceeded", "maximum context length"),
    ({"model": "tiny", "prompt": "w5", "temperature": 7}, 400, None, "temperature"),
    ({"model": "tiny", "prompt": "w5", "seed": 3}, 400, None, "per-request seed is not supported"),
    ({"model": "tiny", "prompt": [5, 99999]}, 400, None, "token ids must be in"),
    ({"model": "tiny"}, 400, None, "prompt"),
    ({"model": "tiny", "prompt": "w5", "n": 2}, 400, None, "n must be 1"),
]


@pytest.mark.parametrize("body, status, code, message", BAD)
def test_bad_requests_get_their_status_and_an_openai_error_body(server, body, status, code, message):
    code_, _, text = _http("POST", server.url + "/v1/completions", body)
    assert code_ == status, text
    err = json.loads(text)["error"]
    assert message in err["message"] and err["code"] == code and err["type"]


def test_bad_json_and_the_openai_client_errors(server):
    status, _, text = _http("POST", server.url + "/v1/completions", raw=b'{"model": "tiny", "prompt": ')
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="nope", prompt="w5")
    with pytest.raises(openai.BadRequestError, match="max_tokens must be >= 1"):
        server.client.completions.create(model="tiny", prompt="w5", max_tokens=0)
    assert server.client.models.list().data[0].id == "tiny"


def test_metrics_in_prometheus_text(server):
    text = _http("GET", server.url + "/metrics")[2]
    for name in ("endor_tokens_generated_total", "endor_tokens_per_second", "endor_batch_size",
                 "endor_queue_length", "endor_bytes_per_step", "endor_forward_steps_total"):
        assert f"# TYPE {name} " in text
    assert 'reader_mode="posix-' in text


def test_a_full_queue_is_429_with_retry_after(model_file):
    s = Server(model_file[0], "--max-batch", "1", "--max-queue", "0")
    try:
        stream = s.client.completions.create(model="tiny", prompt="w5", max_tokens=100, temperature=0, stream=True)
        next(iter(stream))  # in the batch now, the only slot
        status, headers, text = _http("POST", s.url + "/v1/completions", {"model": "tiny", "prompt": "w6"})
        assert status == 429 and headers["retry-after"] == "1"
        assert "the server is busy" in json.loads(text)["error"]["message"]
        stream.close()
    finally:
        s.stop()


def test_a_failed_checksum_fails_that_step_with_500_and_the_server_goes_on(model_file, alone, tmp_path):
    path = tmp_path / "tiny.endor"
    path.write_bytes(model_file[0].read_bytes())
    s = Server(path)
    try:
        with endor_gds.open(path) as f:
            ext = f.layers[1]
        good = path.read_bytes()[ext.offset + 64: ext.offset + 128]
        with open(path, "r+b") as fh:  # damaged in place while the server runs
            fh.seek(ext.offset + 64)
            fh.write(bytes(b ^ 0x40 for b in good))
        body = {"model": "tiny", "prompt": "w5 w9", "max_tokens": 4}
        status, _, text = _http("POST", s.url + "/v1/completions", body)
        assert status == 500 and "ChecksumError" in json.loads(text)["error"]["message"], text
        with open(path, "r+b") as fh:
            fh.seek(ext.offset + 64)
            fh.write(good)
        r = s.client.completions.create(model="tiny", prompt="w5 w9", max_tokens=6, temperature=0)
        assert r.choices[0].text == alone(_ids(model_file[1], "w5 w9"), 6)
        assert s.metrics()["endor_requests_failed_total"] == 1
    finally:
        s.stop()


def test_sigterm_lets_the_stream_in_flight_finish(model_file):
    s = Server(model_file[0])
    stream = s.client.completions.create(model="tiny", prompt="w5", max_tokens=60, temperature=0, stream=True)
    it = iter(stream)
    first = next(it)
    s.proc.send_signal(signal.SIGTERM)
    rest = list(it)
    assert first.choices[0].text and rest and rest[-1].choices[0].finish_reason in ("length", "stop")
    assert s.proc.wait(timeout=60) == 0
    assert "Traceback" not in s.proc.stderr.read()


def test_a_request_larger_than_the_kv_cache_is_refused_and_small_ones_are_served(model_file, alone):
    s = Server(model_file[0], "--kv-cache", "64KiB")  # 1536 bytes per token here: 32 tokens of cache
    try:
        body = {"model": "tiny", "prompt": "w5 w9", "max_tokens": 40}
        status, _, text = _http("POST", s.url + "/v1/completions", body)
        err = json.loads(text)["error"]
        assert status == 400 and err["code"] == "context_length_exceeded" and "--kv-cache" in err["message"], text
        r = s.client.completions.create(model="tiny", prompt="w5 w9", max_tokens=8, temperature=0)
        assert r.choices[0].text == alone(_ids(model_file[1], "w5 w9"), 8)
    finally:
        s.stop()


def test_a_mixture_of_experts_serves_concurrent_clients_as_alone(tmp_path):
    """A qwen3_moe file behind the server: continuous batching runs its steps with the union of
    the batch's routed experts, and each of four concurrent clients gets its prompt's greedy text
    alone, as the in-memory model (eager experts) gives it."""
    src = build_model(tmp_path / "ckpt", "qwen3_moe", torch.float32, max_position_embeddings=MAX_POS)
    path = tmp_path / "moe.endor"
    endor_gds.pack(src, path, prune="magnitude", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ref = reference_model(path)

    def alone(prompt: str) -> str:
        ids = torch.tensor([_ids(tok, prompt)])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=2)
        return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    server = Server(path, "--expert-cache", "5")
    try:
        assert _four_at_once(server) == [alone(p) for p in PROMPTS[:4]]
    finally:
        server.stop()
