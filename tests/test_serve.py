"""``metapeft serve``: the adapter bank and the sampler in process, then the server as a
real process on a loopback port, talked to with the ``openai`` client and httpx.

Every call has a timeout; the servers are stopped at the end of the module."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402
from serve_helpers import (  # noqa: E402
    ServerProcess,
    free_port,
    metric,
    metric_samples,
    save_adapter,
    save_model,
)

from metapeft.bench import serving  # noqa: E402
from metapeft.lm import LoRASpec  # noqa: E402
from metapeft.lm.gguf import models_dir  # noqa: E402
from metapeft.nn import use_fast_layers  # noqa: E402
from metapeft.serve.bank import AdapterBank, BankedLinear  # noqa: E402
from metapeft.serve.sampling import find_stop, sample  # noqa: E402

pytestmark = pytest.mark.integration

BASE = "tiny"  # --served-model-name
PROMPTS = ["the cat sat on the mat", "hello world", "one, two, three", "abc=cba; xyz="]
CONTEXT = 4096  # --max-model-len of the main server
TIMEOUT = 60.0  # seconds, for any one HTTP call


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The model, the served adapters, runtime adapters under a lora root, and broken ones."""
    root = tmp_path_factory.mktemp("serve")
    model = save_model(root / "model")
    lora_root = root / "runtime"
    q_and_v = ("self_attn.q_proj", "self_attn.v_proj")
    f = SimpleNamespace(
        root=root,
        model=model,
        lora_root=lora_root,
        alpha=save_adapter(model, root / "alpha", LoRASpec(4, 8.0, keys=q_and_v), seed=1),
        beta=save_adapter(model, root / "beta", LoRASpec(8, 8.0, num_layers=1), seed=2),
        gamma=save_adapter(
            model, lora_root / "gamma", LoRASpec(2, 4.0, keys=("mlp.down_proj",)), seed=3
        ),
        delta=save_adapter(
            model, lora_root / "delta", LoRASpec(4, 4.0, keys=("self_attn.q_proj",)), seed=4
        ),
        foreign=save_adapter(
            save_model(root / "other", hidden_size=32), lora_root / "foreign", LoRASpec(4), seed=5
        ),
        big=save_adapter(
            model, lora_root / "big", LoRASpec(32, 32.0, keys=("self_attn.q_proj",)), seed=6
        ),
        broken=save_adapter(model, lora_root / "broken", LoRASpec(4), seed=7),
    )
    (f.broken / "adapters.safetensors").unlink()
    return f


@pytest.fixture(scope="module")
def reference(files):
    """``mlx_lm.generate`` on the model with an adapter loaded by ``mlx_lm.load``."""
    loaded = {}

    def generate(adapter: str | None, prompt: str | list[int], max_tokens: int) -> str:
        if adapter not in loaded:
            path = None if adapter is None else str(getattr(files, adapter))
            loaded[adapter] = mlx_lm.load(str(files.model), adapter_path=path)
        model, tokenizer = loaded[adapter]
        return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)

    return generate


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    """The main server: two adapters, runtime loading under the lora root."""
    log = tmp_path_factory.mktemp("logs") / "main.log"
    args = [
        "--model", str(files.model),
        "--served-model-name", BASE,
        "--lora-modules", f"alpha={files.alpha}", f"beta={files.beta}",
        "--max-batch-size", "8",
        "--max-queue", "64",
        "--max-loras", "4",
        "--max-lora-rank", "16",
        "--max-model-len", str(CONTEXT),
        "--allow-runtime-lora",
        "--lora-root", str(files.lora_root),
        "--log-level", "warning",
    ]  # fmt: skip
    with ServerProcess(args, log) as proc:
        yield proc


def client(server, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT
    )


def post(server, path: str, body, headers=None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=TIMEOUT)


def post_all(server, bodies: list[dict], path: str = "/v1/completions") -> list[httpx.Response]:
    """The requests sent at once."""

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:
            return await asyncio.gather(*(c.post(path, json=b) for b in bodies))

    return asyncio.run(run())


def greedy(model: str, prompt: str, max_tokens: int = 24, **extra) -> dict:
    return dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    """An error in OpenAI's shape, with the status, param and words expected."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


# --------------------------------------------------------------------- in process


@pytest.mark.parametrize(("model_type", "bits"), [("llama", None), ("llama", 4), ("qwen2", None)])
def test_banked_layers_give_each_row_its_own_adapter(files, tmp_path, model_type, bits):
    """One forward pass over rows with the base model and two adapters equals mlx-lm's
    model with each adapter loaded, row by row; so does a batch sharing one adapter.
    Also on a 4-bit model (mlx-lm's QLoRA layers) and on Qwen2 (biases)."""
    folder, paths = files.model, [files.alpha, files.beta]
    if (model_type, bits) != ("llama", None):
        folder = save_model(tmp_path / "model", model_type, quantize_bits=bits)
        paths = [
            save_adapter(folder, tmp_path / "alpha", LoRASpec(4, 8.0), seed=1),
            save_adapter(folder, tmp_path / "beta", LoRASpec(8, 8.0, num_layers=1), seed=2),
        ]
    model, _ = mlx_lm.load(str(folder))
    bank = AdapterBank(use_fast_layers(model), max_loras=2, max_rank=16)
    alpha, beta = bank.load("alpha", paths[0]), bank.load("beta", paths[1])
    tokens = mx.array([[5, 9, 12, 30, 7], [8, 8, 21, 4, 40], [33, 6, 15, 9, 11]])
    expected = [
        mlx_lm.load(str(folder), adapter_path=path)[0](tokens[i : i + 1])[0]
        for i, path in enumerate([None, str(paths[0]), str(paths[1])])
    ]
    bank.use([0, alpha.slot, beta.slot])
    got = model(tokens)
    for i in range(3):
        assert mx.allclose(got[i], expected[i], atol=1e-4), f"row {i}"
    assert not mx.allclose(expected[1], expected[2], atol=1e-2)
    bank.use([beta.slot] * 3)
    beta_model = mlx_lm.load(str(folder), adapter_path=str(paths[1]))[0]
    assert mx.allclose(model(tokens), beta_model(tokens), atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_banked_linear_pads_ranks_and_folds_scales(quantized):
    """Two adapters of ranks 2 and 3 in a rank-4 bank: each row gets
    ``base(x) + scale * (x @ a) @ b`` of its own adapter; slot 0 is the base."""
    base = nn.Linear(64, 32)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    rows = SimpleNamespace(slots=mx.array([2, 0, 1]), same=None)
    layer = BankedLinear(base, rows, slots=3, rank=4)
    adapters = {1: (mx.random.normal((64, 2)), mx.random.normal((2, 32)), 0.5)}
    adapters[2] = (mx.random.normal((64, 3)), mx.random.normal((3, 32)), 2.0)
    for slot, (a, b, scale) in adapters.items():
        layer.lora_a[slot, :, : a.shape[1]] = a
        layer.lora_b[slot, : a.shape[1]] = scale * b
    x = mx.random.normal((3, 5, 64))
    got = layer(x)
    for i, slot in enumerate([2, 0, 1]):
        want = base(x[i])
        if slot:
            a, b, scale = adapters[slot]
            want = want + scale * (x[i] @ a) @ b
        assert mx.allclose(got[i], want, atol=1e-3, rtol=1e-4), f"row {i}, slot {slot}"


def test_sample_greedy_rows_seeded_rows_and_top_p():
    logits = mx.random.normal((4, 50))
    key = mx.random.key(7)
    tokens = sample(logits, [0.0, 1.0, 1.0, 0.8], [1.0, 1.0, 1e-9, 0.5], [None, key, key, key])
    argmax = mx.argmax(logits, axis=-1)
    assert tokens[0].item() == argmax[0].item()
    assert tokens[2].item() == argmax[2].item()  # a tiny nucleus holds the top token only
    again = sample(logits[1:2], [1.0], [1.0], [key])
    assert again.item() == tokens[1].item()  # a row's draw depends on its key alone
    draws = {sample(logits[1:2], [1.0], [1.0], [mx.random.key(s)]).item() for s in range(20)}
    assert len(draws) > 1
    assert find_stop("abc. def.", (".", "de"), 0) == 3
    assert find_stop("abc. def.", ("x",), 0) is None


@pytest.mark.parametrize("impl", serving.IMPLS)
def test_the_serving_benchmark_generates_every_token(impl):
    assert serving.decode("tiny", impl, streams=3, tokens=5)() == 15


# --------------------------------------------------------------------- the server


@pytest.mark.parametrize("adapter", [None, "alpha", "beta"])
def test_greedy_output_equals_mlx_lm_generate(server, reference, adapter):
    api = client(server)
    name = BASE if adapter is None else adapter
    for prompt in PROMPTS:
        out = api.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
        assert out.choices[0].text == reference(adapter, prompt, 24), prompt
    if adapter is not None:
        assert any(reference(adapter, p, 24) != reference(None, p, 24) for p in PROMPTS)


def test_chat_greedy_output_equals_mlx_lm_generate_on_the_template(server, files, reference):
    api = client(server)
    messages = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hi"}]
    tokenizer = mlx_lm.load(str(files.model))[1]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    for adapter in (None, "beta"):
        out = api.chat.completions.create(
            model=adapter or BASE, messages=messages, max_tokens=24, temperature=0
        )
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == reference(adapter, prompt, 24)


def test_a_batch_mixing_adapters_equals_the_requests_one_by_one(server):
    bodies = [greedy(m, p, 32) for p in PROMPTS for m in (BASE, "alpha", "beta")]
    one_by_one = [text_of(post(server, "/v1/completions", b)) for b in bodies]
    before = metric_samples(server.url)
    together = [text_of(r) for r in post_all(server, bodies)]
    after = metric_samples(server.url)
    assert together == one_by_one
    # Decode steps with more than 4 rows mixed adapters: each model has only 4 requests.
    name = "metapeft_decode_batch_size"
    steps = metric(after, f"{name}_count") - metric(before, f"{name}_count")
    small = metric(after, f"{name}_bucket", le="4.0") - metric(before, f"{name}_bucket", le="4.0")
    assert steps - small > 0, "no decode step held more than 4 requests"


def test_streaming_and_non_streaming_agree(server):
    api = client(server)
    for name in (BASE, "alpha", "beta"):
        whole = api.completions.create(model=name, prompt=PROMPTS[0], max_tokens=20, temperature=0)
        chunks = list(
            api.completions.create(
                model=name,
                prompt=PROMPTS[0],
                max_tokens=20,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        ends = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert ends[-1] == whole.choices[0].finish_reason and not any(ends[:-1])
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = api.chat.completions.create(
        model="alpha", messages=messages, max_tokens=20, temperature=0
    )
    stream = api.chat.completions.create(
        model="alpha", messages=messages, max_tokens=20, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content


def test_stop_strings_end_the_text(server):
    full = text_of(post(server, "/v1/completions", greedy("beta", PROMPTS[0], 24)))
    assert len(full) >= 4, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    body = greedy("beta", PROMPTS[0], 24, stop=["never there", stop])
    response = post(server, "/v1/completions", body)
    assert text_of(response) == expected
    assert response.json()["choices"][0]["finish_reason"] == "stop"
    chunks = client(server).completions.create(**body, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(server):
    body = dict(model="beta", prompt=PROMPTS[2], max_tokens=24, temperature=1.0, seed=1234)
    alone = text_of(post(server, "/v1/completions", body))
    assert text_of(post(server, "/v1/completions", body)) == alone
    others = [greedy(m, p) for p in PROMPTS for m in (BASE, "alpha")]
    in_batch = post_all(server, [body, *others])
    assert text_of(in_batch[0]) == alone
    drawn = {text_of(post(server, "/v1/completions", body | {"seed": s})) for s in range(4)}
    assert len(drawn) > 1, "four seeds drew the same text"
    nucleus = body | {"top_p": 1e-9}
    assert text_of(post(server, "/v1/completions", nucleus)) == text_of(
        post(server, "/v1/completions", greedy("beta", PROMPTS[2]))
    )


def test_runtime_adapter_load_and_unload(server, files, reference):
    def load(name, path):
        return post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})

    def unload(name):
        return post(server, "/v1/unload_lora_adapter", {"lora_name": name})

    def models():
        return {
            m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).json()["data"]
        }

    assert load("gamma", files.gamma).status_code == 200
    assert "gamma" in models()
    assert text_of(post(server, "/v1/completions", greedy("gamma", PROMPTS[0]))) == reference(
        "gamma", PROMPTS[0], 24
    )
    assert_error(load("gamma", files.gamma), 400, "lora_name", "gamma", "already")
    assert unload("gamma").status_code == 200
    assert "gamma" not in models()
    assert_error(post(server, "/v1/completions", greedy("gamma", "hi")), 404, "model", "'gamma'")
    assert_error(unload("gamma"), 404, "lora_name", "gamma")
    # gamma's slot is reused by an adapter on other modules: nothing of gamma is left.
    assert load("d1", files.delta).status_code == 200
    assert load("d2", files.delta).status_code == 200
    for name in ("d1", "d2"):
        out = text_of(post(server, "/v1/completions", greedy(name, PROMPTS[1])))
        assert out == reference("delta", PROMPTS[1], 24), name
    assert_error(load("full", files.gamma), 400, "lora_path", "slots", "--max-loras")
    for name in ("d1", "d2"):
        assert unload(name).status_code == 200

    assert_error(load("out", files.alpha), 403, "lora_path", "--lora-root")
    assert_error(load("foreign", files.foreign), 400, "lora_path", "does not fit", "shape")
    assert_error(load("big", files.big), 400, "lora_path", "rank 32", "--max-lora-rank")
    assert_error(load("broken", files.broken), 400, "lora_path", "adapters.safetensors")
    assert_error(load("nowhere", files.lora_root / "nowhere"), 400, "lora_path", "missing")
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
    assert models() == {BASE, "alpha", "beta"}


BAD_REQUESTS = [
    ({"model": "nope", "prompt": "hi"}, 404, "model", ["'nope'"]),
    ({"model": BASE}, 400, "prompt", ["prompt", "required"]),
    ({"prompt": "hi"}, 400, "model", ["model", "required"]),
    ({"model": BASE, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ["max_tokens"]),
    ({"model": BASE, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens", ["max_tokens"]),
    ({"model": BASE, "prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens", [str(CONTEXT)]),
    ({"model": BASE, "prompt": "x" * CONTEXT}, 400, "prompt", ["--max-model-len"]),
    ({"model": BASE, "prompt": "hi", "temperature": -1}, 400, "temperature", ["temperature"]),
    ({"model": BASE, "prompt": "hi", "temperature": 7}, 400, "temperature", ["temperature"]),
    ({"model": BASE, "prompt": "hi", "temperature": "hot"}, 400, "temperature", ["temperature"]),
    ({"model": BASE, "prompt": "hi", "top_p": 0}, 400, "top_p", ["top_p"]),
    ({"model": BASE, "prompt": "hi", "stop": ["a"] * 5}, 400, "stop", ["at most 4"]),
    ({"model": BASE, "prompt": "hi", "n": 2}, 400, "n", ["n"]),
    ({"model": BASE, "prompt": "hi", "logprobs": 2}, 400, "logprobs", ["Unsupported"]),
    ({"model": BASE, "prompt": ""}, 400, "prompt", ["empty"]),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD_REQUESTS)
def test_bad_completion_requests_get_openai_errors(server, body, status, param, words):
    assert_error(post(server, "/v1/completions", body), status, param, *words)


def test_bad_bodies_and_chat_requests_get_openai_errors(server):
    url = f"{server.url}/v1/chat/completions"
    for raw in (b'{"model": "tiny",', b"[1, 2]", b"not json"):
        response = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert_error(response, 400, None)
    assert_error(post(server, "/v1/chat/completions", {"model": BASE, "messages": []}), 400,
                 "messages", "messages")  # fmt: skip
    one = [{"role": "user", "content": "hi"}]
    both = {"model": BASE, "messages": one, "max_tokens": 4, "max_completion_tokens": 4}
    assert_error(post(server, "/v1/chat/completions", both), 400, "max_completion_tokens")
    wrong_role = {"model": BASE, "messages": [{"role": "robot", "content": "hi"}]}
    assert_error(post(server, "/v1/chat/completions", wrong_role), 400, "messages")
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200


def test_metrics_count_what_was_sent(server):
    before = metric_samples(server.url)
    sent = {"": 1, "alpha": 3, "beta": 2}
    usage = Counter()
    for adapter, n in sent.items():
        for i in range(n):
            body = greedy(adapter or BASE, PROMPTS[i], 10 + i)
            if adapter == "beta":  # streamed
                chunks = client(server).completions.create(
                    **body, stream=True, stream_options={"include_usage": True}
                )
                counts = [c.usage for c in chunks if c.usage][0].model_dump()
            else:
                counts = post(server, "/v1/completions", body).json()["usage"]
            usage[(adapter, "prompt")] += counts["prompt_tokens"]
            usage[(adapter, "completion")] += counts["completion_tokens"]
    post(server, "/v1/completions", {"model": "nope", "prompt": "hi"})
    after = metric_samples(server.url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    for adapter, n in sent.items():
        ended = sum(
            delta("metapeft_requests_total", adapter=adapter, status=s) for s in ("stop", "length")
        )
        assert ended == n, adapter
        generated = usage[(adapter, "completion")]
        assert delta("metapeft_generation_tokens_total", adapter=adapter) == generated
        assert delta("metapeft_prompt_tokens_total", adapter=adapter) == usage[(adapter, "prompt")]
        ttft = "metapeft_time_to_first_token_seconds_count"
        assert delta(ttft, adapter=adapter) == n
        itl = "metapeft_inter_token_latency_seconds_count"
        assert delta(itl, adapter=adapter) == generated - n
    assert delta("metapeft_rejected_requests_total", code="404") == 1
    assert metric(after, "metapeft_running_requests") == 0
    assert metric(after, "metapeft_waiting_requests") == 0
    assert metric(after, "metapeft_adapters_loaded") == 2


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot_and_cache(server, stream):
    before = metric_samples(server.url)
    body = greedy(BASE, PROMPTS[0], CONTEXT - 64, stream=stream)
    if stream:  # read three chunks, then close
        url = f"{server.url}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as r:
            assert r.status_code == 200
            received = 0
            for line in r.iter_lines():
                received += line.startswith("data: {")
                if received == 3:
                    break
    else:  # give up waiting for the whole answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = metric_samples(server.url)
        if metric(after, "metapeft_running_requests") == 0:
            break
        time.sleep(0.05)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("metapeft_requests_total", adapter="", status="cancelled") == 1
    assert metric(after, "metapeft_running_requests") == 0
    assert metric(after, "metapeft_kv_cache_bytes") == 0
    assert delta("metapeft_generation_tokens_total", adapter="") < CONTEXT - 64


def test_500_requests_from_32_clients(server):
    """A load test: no error but deliberate 429/503, and the resident memory at the end
    within 10% of what it was after the first 250 requests (by then MLX's buffer cache
    has seen the largest batches; a leak would grow with the second 250)."""
    import psutil

    process = psutil.Process(server.pid)
    models = (BASE, "alpha", "beta")
    bodies = [
        dict(
            model=models[i % 3],
            prompt=PROMPTS[i % 4] + str(i),
            max_tokens=8,
            temperature=0.7,
            seed=i,
            stream=i % 4 == 0,
        )
        for i in range(500)
    ]
    statuses: Counter = Counter()
    rss = {}

    async def run():
        todo = iter(bodies)
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as c:

            async def worker():
                for body in todo:
                    if body["stream"]:
                        async with c.stream("POST", "/v1/completions", json=body) as r:
                            text = "".join([line async for line in r.aiter_lines()])
                            ok = r.status_code != 200 or text.endswith("data: [DONE]")
                    else:
                        r = await c.post("/v1/completions", json=body)
                        ok = True
                    statuses[r.status_code if ok else "truncated stream"] += 1
                    if sum(statuses.values()) == 250:
                        rss["after 250"] = process.memory_info().rss

            await asyncio.gather(*(worker() for _ in range(32)))

    start = time.monotonic()
    asyncio.run(asyncio.wait_for(run(), timeout=300))
    took = time.monotonic() - start
    rss["end"] = process.memory_info().rss
    errors = {s: n for s, n in statuses.items() if s not in (200, 429, 503)}
    assert not errors, statuses
    assert sum(statuses.values()) == 500
    assert rss["end"] <= 1.10 * rss["after 250"], (rss, took)


# --------------------------------------------------------------------- other servers


def test_api_key_guards_v1_and_runtime_loading_is_off_by_default(files, tmp_path):
    key = "sekrit-key"
    args = ["--model", str(files.model), "--served-model-name", BASE, "--max-model-len", "256",
            "--lora-modules", f"alpha={files.alpha}", "--api-key", key]  # fmt: skip
    with ServerProcess(args, tmp_path / "log") as locked:
        url = locked.url
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            response = httpx.get(f"{url}/v1/models", headers=headers, timeout=TIMEOUT)
            assert_error(response, 401, None, "Authorization")
        no_key = post(locked, "/v1/completions", greedy(BASE, "hi"))
        assert_error(no_key, 401, None)
        api = client(locked, api_key=key)
        assert {m.id for m in api.models.list()} == {BASE, "alpha"}
        assert api.completions.create(model="alpha", prompt="hi", max_tokens=4).choices
        with pytest.raises(openai.AuthenticationError):
            client(locked, api_key="wrong").models.list()
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=TIMEOUT).status_code == 200
        auth = {"Authorization": f"Bearer {key}"}
        body = {"lora_name": "gamma", "lora_path": str(files.gamma)}
        refused = post(locked, "/v1/load_lora_adapter", body, headers=auth)
        assert_error(refused, 403, None, "--allow-runtime-lora")
        refused = post(locked, "/v1/unload_lora_adapter", {"lora_name": "alpha"}, headers=auth)
        assert_error(refused, 403, None, "--allow-runtime-lora")


def test_more_requests_than_the_queue_holds_get_503_with_retry_after(files, tmp_path):
    args = ["--model", str(files.model), "--served-model-name", BASE, "--max-model-len", "4096",
            "--max-batch-size", "1", "--max-queue", "1"]  # fmt: skip
    with ServerProcess(args, tmp_path / "log") as small:
        responses = post_all(small, [greedy(BASE, PROMPTS[0], 500) for _ in range(6)])
        codes = Counter(r.status_code for r in responses)
        # Only the first is sure of a row: the second may find it still waiting.
        assert set(codes) == {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert_error(r, 503, None, "overloaded")
        assert httpx.get(f"{small.url}/health", timeout=TIMEOUT).status_code == 200


def test_an_adapter_that_does_not_fit_stops_the_server_at_startup(files):
    command = [sys.executable, "-m", "metapeft.serve", "--model", str(files.model),
               "--max-model-len", "256", "--lora-modules", f"big={files.big}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "big=" in done.stderr and "rank 32" in done.stderr and "--max-lora-rank" in done.stderr


SMOLLM2 = models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real_model
@pytest.mark.skipif(
    not SMOLLM2.is_file(), reason=f"{SMOLLM2} not fetched (experiments/fetch_smollm2.py)"
)
def test_a_gguf_model_is_served_with_its_chat_template(tmp_path):
    args = ["--model", str(SMOLLM2), "--served-model-name", "smollm2"]
    with ServerProcess(args, tmp_path / "log") as real:
        api = client(real)
        out = api.completions.create(
            model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert "Paris" in out.choices[0].text
        chat = api.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in chat.choices[0].message.content


@pytest.mark.slow
def test_the_docker_image_serves_an_adapter(files, reference, tmp_path):
    """Builds the Dockerfile's image and serves the tiny model and one adapter from it."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    if subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no Docker daemon is running")
    root = Path(__file__).resolve().parent.parent
    tag = "metapeft-serve-test"
    subprocess.run([docker, "build", "-t", tag, str(root)], check=True, timeout=3600)
    port = free_port()
    run = [docker, "run", "--detach", "--rm", "-p", f"127.0.0.1:{port}:8000",
           "-v", f"{files.root}:/models:ro", tag, "--model", "/models/model",
           "--served-model-name", BASE, "--max-model-len", "256",
           "--lora-modules", "alpha=/models/alpha"]  # fmt: skip
    container = subprocess.run(run, check=True, capture_output=True, text=True, timeout=120)
    container_id = container.stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        body = greedy("alpha", PROMPTS[0])
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
        assert text_of(response) == reference("alpha", PROMPTS[0], 24)
    finally:
        subprocess.run([docker, "stop", container_id], capture_output=True, timeout=60)
