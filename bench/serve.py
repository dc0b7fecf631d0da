"""Benchmark: serving speed of one 4-bit base with LoRA adapters, plain `generate` vs our engine.

    .venv/bin/python bench/serve.py --tiny              # CPU, tiny base (~2 min on 2 cores)
    .venv/bin/python bench/serve.py --shape llama-7b    # GPU: 7B-shaped random NF4 base + rank-64 adapters
    .venv/bin/python bench/serve.py --base smollm2      # CPU: a real model (any local folder) in nf4, bf16, fp32, q8

Writes bench/results/serve-<device>-<date>.json (device: cpu, or the GPU's name), with --base
serve-cpu-<base>-<date>.json.

`--base PATH|smollm2` (a model folder, a .gguf file or a short name from `chatbuild.bases`) runs, for
each `--quant` precision in turn (default nf4 bf16 fp32 q8, as `chatbuild serve --quant` loads them):
the base's memory (its weights' bytes, the process's resident memory after loading; for q8 also its
int8 copy), plain `generate` at batch 1 (for q8 that is fp32's: transformers' forward does not use the
int8 copy), and for each `--decoders` (default fast hf, as `chatbuild serve --decoder`; q8 runs in the
fast one only) the engine at batch 1 and through the HTTP API at 1, 8 and 32 clients (continuous
batching only), with rank-8 random adapters a and b as below; then `goals`: each engine against
plain `generate` in NF4. Defaults: 32 new tokens, 3 trials.
A real model emits EOS, so a reply may end before `max_tokens`: tok/s counts the tokens made.

The model: a base with random weights in NF4 (double quantization), with two random LoRA adapters
(A and B both random, so they change every output) made in memory with PEFT; requests rotate over
adapter a, adapter b and the bare base, so batches mix adapters. Random weights rarely emit EOS, so
replies run to `max_tokens`. `--tiny` builds the tiny base with random weights (`chatbuild tiny-base
--pretrain-steps 0`) into .chatbuild/bench/ and uses rank-8 adapters in fp32 on CPU; `--shape` builds
the named shape directly in 4 bits on the GPU (`chatbuild.shapes.build_random_4bit`, bf16 compute)
with rank-64 adapters and the tiny base's tokenizer (prompt ids only; the GPU machine has no hub).
THE GPU VARIANT HAS NOT BEEN RUN YET (written on a CPU-only machine): expect to fix small things.

What is measured, in one run on the same model object:
1. plain HF: `model.generate` greedy, batch 1, adapter a active: time to first token (generate with
   one new token) and decode tok/s ((N-1) tokens / (time for N - time for 1)), median of `--trials`;
2. our engine, in process, batch 1: the same two figures through `HFEngine.stream`;
3. through the real HTTP API (`serve.app.create_app` under uvicorn in a thread on loopback, load from
   httpx async streaming clients in the main thread), with 1, 8, 32, 64 concurrent clients each
   sending `--requests-per-client` streamed requests: aggregate tok/s (completion tokens from the
   usage event / wall time), p50/p95 time to first token and request latency, p50 inter-token time.
   Done twice: `max_batch=1` (one reply at a time; the engine before continuous batching interleaved
   concurrent replies token by token at batch 1, so it had this aggregate tok/s with a shorter time to
   first token) and `max_batch` = the most clients (continuous batching).
The server, the clients and the decode thread share one Python process (and GIL) on purpose: it is
the deployment shape, and on 2 CPU cores the load generator's cost is part of what is measured.
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]
CONCURRENCY = (1, 8, 32, 64)


# ── the model ───────────────────────────────────────────────────────────────────────────────
def tiny_model(rank: int):
    """The tiny base (random weights) in NF4 on CPU, with adapters a and b; and its tokenizer."""
    from chatbuild.modeling import load_base_model, load_tokenizer
    from pipelines.tiny_base import TinyBaseSpec, build_tiny_base

    path = REPO / ".chatbuild" / "bench" / "tiny-base-random"
    if not (path / "config.json").is_file():
        build_tiny_base(path, TinyBaseSpec(pretrain_steps=0), force=True, log=lambda *_: None)
    model = load_base_model(str(path), None, "nf4", True, "float32", "cpu", False)
    return with_adapters(model, rank), load_tokenizer(str(path)), path.name


def shape_model(shape: str, rank: int):
    """A `shape` model built in NF4 on the GPU, with adapters a and b; the tiny tokenizer."""
    import torch

    from chatbuild.modeling import load_tokenizer
    from chatbuild.shapes import build_random_4bit
    from pipelines.tiny_base import TinyBaseSpec, build_tiny_base

    path = REPO / ".chatbuild" / "bench" / "tiny-base-random"
    if not (path / "config.json").is_file():
        build_tiny_base(path, TinyBaseSpec(pretrain_steps=0), force=True, log=lambda *_: None)
    model = build_random_4bit(shape, device="cuda", compute_dtype=torch.bfloat16)
    model.config.use_cache = True  # build_random_4bit is set up for training
    return with_adapters(model, rank), load_tokenizer(str(path)), shape


def with_adapters(model, rank: int):
    """Two random LoRA adapters on all linear layers (A and B random, B scaled up as in the tests'
    run folders, so each adapter visibly changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = get_peft_model(model, config, adapter_name="a")
    model.add_adapter("b", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    model.set_adapter("a")
    return model.eval()


# ── 1. plain HF generate ───────────────────────────────────────────────────────────────────
def plain_generate(model, ids: list[int], new_tokens: int, trials: int) -> dict:
    import torch

    x = torch.tensor([ids], device=next(model.parameters()).device)

    def timed(n):
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            # use_cache: chatbuild's loader turns the config's off (training); a plain user's model has it on
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0, use_cache=True)
        sync()
        return time.perf_counter() - start

    timed(4)  # warm-up
    firsts = [timed(1) for _ in range(trials)]
    fulls = [timed(new_tokens) for _ in range(trials)]
    ttft, full = statistics.median(firsts), statistics.median(fulls)
    return {"ttft_s": round(ttft, 4), "decode_tok_s": round((new_tokens - 1) / (full - ttft), 1),
            "tokens": new_tokens}


# ── 2. our engine, in process ───────────────────────────────────────────────────────────────
def engine_batch1(engine, new_tokens: int, trials: int) -> dict:
    from chatbuild.engines import GenerationParams

    params = GenerationParams(temperature=0, max_new_tokens=new_tokens)

    def once():
        start = time.perf_counter()
        first = None
        for chunk in engine.stream(PROMPT, params, "a"):
            if first is None and chunk.completion_tokens:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - start, end - first, chunk.completion_tokens

    once()  # warm-up
    runs = [once() for _ in range(trials)]
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median((r[2] - 1) / r[1] for r in runs)
    return {"ttft_s": round(ttft, 4), "decode_tok_s": round(decode, 1), "tokens": runs[-1][2]}


# ── 3. through the HTTP API ─────────────────────────────────────────────────────────────────
class Server:
    """`create_app(engine)` under uvicorn in a thread, on a free loopback port."""

    def __init__(self, engine, max_clients: int, max_tokens: int):
        import socket

        import uvicorn

        from serve.app import create_app
        from serve.settings import Settings

        settings = Settings(max_running=max_clients, queue_size=max_clients, max_new_tokens=max_tokens)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, settings, ui=False), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


async def one_request(client, url: str, model: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {"start": start, "end": end, "ttft": (arrivals[0] if arrivals else end) - start, "tokens": tokens,
            "gap": statistics.median(gaps) if gaps else None}


async def load(url: str, models: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def user(i):
            return [await one_request(client, url, models[(i + k) % len(models)], max_tokens)
                    for k in range(per_client)]

        results = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results]
    latencies = [r["end"] - r["start"] for r in results]
    gaps = [r["gap"] for r in results if r["gap"] is not None]
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "aggregate_tok_s": round(tokens / wall, 1),
            "ttft_p50_s": round(percentile(ttfts, 50), 4), "ttft_p95_s": round(percentile(ttfts, 95), 4),
            "latency_p50_s": round(percentile(latencies, 50), 4), "latency_p95_s": round(percentile(latencies, 95), 4),
            "inter_token_p50_s": round(statistics.median(gaps), 5) if gaps else None}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def http_sweep(engine, clients_list: list[int], max_tokens: int, per_client: int, log) -> list[dict]:
    models = engine.models()  # a, b, the bare base: batches mix adapters
    rows = []
    with Server(engine, max(clients_list), max_tokens) as url:
        asyncio.run(load(url, models, 1, 1, 4))  # warm-up
        for clients in clients_list:
            before = engine.batch_sizes.copy()
            row = asyncio.run(load(url, models, clients, per_client, max_tokens))
            steps = engine.batch_sizes - before
            row["decode_steps"] = sum(steps.values())
            row["mean_batch"] = round(sum(k * v for k, v in steps.items()) / max(1, sum(steps.values())), 2)
            log(f"  {clients:3d} clients: {row['aggregate_tok_s']:8.1f} tok/s, ttft p50 {row['ttft_p50_s']:.3f}s "
                f"p95 {row['ttft_p95_s']:.3f}s, latency p50 {row['latency_p50_s']:.2f}s, mean batch {row['mean_batch']}")
            rows.append(row)
    return rows


# ── the run ─────────────────────────────────────────────────────────────────────────────────
def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)), "cpus_total": os.cpu_count(),
            "platform": platform.platform(), "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "fastapi", "uvicorn", "httpx", "chatbuild"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="CPU: the tiny base with random weights")
    which.add_argument("--shape", help="GPU: a named shape from chatbuild.shapes, e.g. llama-7b")
    which.add_argument("--base", help="CPU: a local model folder, a .gguf file or smollm2, at each --quant")
    p.add_argument("--quant", nargs="+", default=["nf4", "bf16", "fp32", "q8"],
                   help="with --base: the serving precisions to compare (nf4, bf16, fp32, q8)")
    p.add_argument("--decoders", nargs="+", default=["fast", "hf"], choices=("fast", "hf"),
                   help="with --base: the engine's decoders to compare (default fast hf)")
    p.add_argument("--rank", type=int, help="LoRA rank of the adapters (8 tiny and base, 64 shape)")
    p.add_argument("--max-tokens", type=int, help="new tokens per request (32 tiny and base, 128 shape)")
    p.add_argument("--clients", type=int, nargs="+", help="concurrent clients to try (default 1 8 32 64; base 1 8 32)")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is steadier on a busy machine)")
    p.add_argument("--out", type=Path, help="result file (default bench/results/serve-<device>[-<base>]-<date>.json)")
    args = p.parse_args()

    import torch

    from chatbuild.engines.hf import PRECISIONS

    for precision in args.quant:
        if precision not in PRECISIONS:
            p.error(f"--quant: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    args.rank = args.rank or (64 if args.shape else 8)
    args.max_tokens = args.max_tokens or (128 if args.shape else 32)
    args.clients = args.clients or ([1, 8, 32] if args.base else list(CONCURRENCY))
    started = time.perf_counter()
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "versions": versions(), "adapter_rank": args.rank, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests_per_client,
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    if args.base:
        device, label = "cpu", base_label(args.base)
        result.update(precisions(args, log))
    else:
        device = "cpu" if args.tiny else torch.cuda.get_device_name(0).lower().replace("nvidia ", "").split()[0]
        label = None
        result.update(synthetic(args, device, log))
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - started, 1)
    stem = "-".join(["serve", device, *([label] if label else []), datetime.date.today().isoformat()])
    out = args.out or REPO / "bench" / "results" / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out} in {result['total_s']} s")
    return 0


def synthetic(args, device: str, log) -> dict:
    """--tiny / --shape: a random base, plain generate vs the engine one reply at a time and batched."""
    from chatbuild.engines.hf import HFEngine
    from chatbuild.templates import ChatFormat, prompt_ids

    model, tokenizer, name = tiny_model(args.rank) if args.tiny else shape_model(args.shape, args.rank)
    ids = prompt_ids(ChatFormat(), tokenizer, PROMPT)
    log(f"{name} on {device}: prompt {len(ids)} tokens, {args.max_tokens} new tokens per request, "
        f"adapters rank {args.rank}")
    result = {"model": name, "prompt_tokens": len(ids)}
    result["plain_generate_batch1"] = plain_generate(model, ids, args.max_tokens, args.trials)
    log(f"plain generate, batch 1: {result['plain_generate_batch1']}")

    result["http"] = {}
    for label, max_batch in (("one_at_a_time", 1), ("continuous_batching", max(2, *args.clients))):
        engine = HFEngine.from_model(model, tokenizer, name, adapters={"a": "a", "b": "b"}, max_batch=max_batch)
        if label == "continuous_batching":
            result["engine_batch1"] = engine_batch1(engine, args.max_tokens, args.trials)
            log(f"engine, batch 1: {result['engine_batch1']}")
        log(f"HTTP, max_batch={max_batch}:")
        result["http"][label] = {"max_batch": max_batch,
                                 "by_clients": http_sweep(engine, args.clients, args.max_tokens,
                                                          args.requests_per_client, log)}
        engine.close()  # drops the engine's hold on the model; the next engine serves the same object

    one, many = result["http"]["one_at_a_time"]["by_clients"], result["http"]["continuous_batching"]["by_clients"]
    result["speedup_aggregate"] = {str(a["clients"]): round(b["aggregate_tok_s"] / a["aggregate_tok_s"], 2)
                                   for a, b in zip(one, many, strict=True)}
    log(f"speedup (aggregate tok/s, batching vs one at a time): {result['speedup_aggregate']}")
    return result


# ── --base: a real model at each serving precision ──────────────────────────────────────────
def base_label(base: str) -> str:
    """The result file's name for a base: its short name, or its folder's name in lower case."""
    from chatbuild.bases import SHORT_NAMES

    return base if base in SHORT_NAMES else Path(base).name.lower().removesuffix(".gguf")


def precisions(args, log) -> dict:
    """--base: for each precision, the base loaded that way (with adapters a and b), plain generate vs
    the engine at batch 1 and through the API at each client count, and the memory it takes."""
    import gc

    from chatbuild.bases import resolve_base
    from chatbuild.engines.hf import HFEngine
    from chatbuild.modeling import load_tokenizer
    from chatbuild.templates import ChatFormat, prompt_ids

    path = resolve_base(args.base)
    tokenizer = load_tokenizer(path)
    ids = prompt_ids(ChatFormat(), tokenizer, PROMPT)
    name = Path(path).name
    log(f"{name} on cpu: prompt {len(ids)} tokens, {args.max_tokens} new tokens per request, "
        f"adapters rank {args.rank}, precisions {' '.join(args.quant)}")
    result = {"model": name, "base": args.base, "prompt_tokens": len(ids), "by_precision": {}}
    for precision in args.quant:
        row = result["by_precision"][precision] = load_at(path, precision, args.rank)
        model = row.pop("model")
        log(f"{precision}: weights {row['weights_mb']} MB, resident {row['rss_mb']} MB, loaded in {row['load_s']} s")
        row["plain_generate_batch1"] = plain_generate(model, ids, args.max_tokens, args.trials)
        log(f"  plain generate, batch 1: {row['plain_generate_batch1']}")
        row["by_decoder"] = {}
        for decoder in args.decoders:
            if precision == "q8" and decoder != "fast":
                log(f"  q8 runs in the fast decoder only: no {decoder} decoder")
                continue
            engine = HFEngine.from_model(model, tokenizer, name, adapters={"a": "a", "b": "b"},
                                         max_batch=max(2, *args.clients), decoder=decoder, q8=precision == "q8")
            if precision == "q8":  # the int8 copy beside the fp32 weights
                copy = sum(t.numel() * t.element_size() for w in engine._decoder._packed.values() if w
                           for t in (w.values, w.scales))
                row["q8_copy_mb"] = round(copy / 2**20, 1)
                row["rss_mb"] = round(resident_bytes() / 2**20, 1)
                log(f"  q8: int8 copy {row['q8_copy_mb']} MB, resident now {row['rss_mb']} MB")
            run = row["by_decoder"][decoder] = {"decoder": engine.decoder}
            run["engine_batch1"] = engine_batch1(engine, args.max_tokens, args.trials)
            run["engine_vs_plain_decode"] = round(run["engine_batch1"]["decode_tok_s"]
                                                  / row["plain_generate_batch1"]["decode_tok_s"], 2)
            log(f"  engine ({engine.decoder} decoder), batch 1: {run['engine_batch1']} "
                f"({run['engine_vs_plain_decode']}x plain)")
            run["http"] = http_sweep(engine, args.clients, args.max_tokens, args.requests_per_client, log)
            engine.close()
            del engine
        del model
        gc.collect()
    result["goals"] = goals(result)
    log(f"goals: {json.dumps(result['goals'])}")
    return result


def goals(result: dict) -> dict:
    """Issue 22's targets, read off this run: each engine (precision x decoder) against plain `generate`
    on the base in NF4 (the baseline the targets name), at batch 1, 8 and 32 clients."""
    rows = result["by_precision"]
    baseline = rows.get("nf4", {}).get("plain_generate_batch1", {}).get("decode_tok_s")
    out = {"baseline": "plain generate, nf4, batch 1", "baseline_decode_tok_s": baseline, "engines": {}}
    for precision, row in rows.items():
        for decoder, run in row["by_decoder"].items():
            by_clients = {r["clients"]: r for r in run["http"]}
            entry = {"batch1_vs_nf4_plain": baseline and round(run["engine_batch1"]["decode_tok_s"] / baseline, 2)}
            for clients in (8, 32):
                if clients in by_clients:
                    entry[f"tok_s_at_{clients}"] = by_clients[clients]["aggregate_tok_s"]
                    entry[f"ttft_p95_at_{clients}"] = by_clients[clients]["ttft_p95_s"]
            entry["met"] = {"batch1 >= 3x": bool(baseline) and entry["batch1_vs_nf4_plain"] >= 3,
                            "8 streams >= 100 tok/s": entry.get("tok_s_at_8", 0) >= 100,
                            "32 streams >= 150 tok/s, p95 ttft < 3 s": entry.get("tok_s_at_32", 0) >= 150
                            and entry.get("ttft_p95_at_32", 99) < 3}
            out["engines"][f"{precision}/{decoder}"] = entry
    return out


def load_at(path: str, precision: str, rank: int) -> dict:
    """The base at `path` loaded at `precision` on CPU with adapters a and b; its weights' bytes, the
    process's resident memory after loading, and the load time."""
    from chatbuild.engines.hf import PRECISIONS
    from chatbuild.modeling import load_base_model

    quant, dtype = PRECISIONS[precision]
    start = time.perf_counter()
    model = load_base_model(path, None, quant, True, dtype, "cpu", False)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    model = with_adapters(model, rank)
    return {"model": model, "load_s": round(time.perf_counter() - start, 1), "weights_mb": round(weights / 2**20, 1),
            "rss_mb": round(resident_bytes() / 2**20, 1)}


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
