"""Merge and combine adapters: `chatbuild merge`.

    chatbuild merge runs/my-run --out merged/my-run                    # 16-bit HF checkpoint
    chatbuild merge runs/my-run --out merged/my-run-nf4 --requantize nf4
    chatbuild merge --adapters runs/a runs/b --weights 0.7 0.3 --out runs/a-b   # a new run folder
    chatbuild merge --adapters runs/a runs/b --weights 0.7 0.3 --out merged/a-b --merge-into-base

Merging happens in 16 bits: the base is reloaded unquantized (bf16 by default) and the adapter is
added to those weights. Merging into the 4-bit weights would round the update away into NF4's
16 levels; `--requantize nf4` quantizes the merged 16-bit model afterwards, once, if you want a
4-bit checkpoint.

Combining adapters (trained on the same base) uses peft's `add_weighted_adapter`. The default
combination, "cat", concatenates the LoRA factors scaled by sqrt(weight), so the combined update is
exactly Σ weight_i · ΔW_i (its rank is the sum of the ranks); "linear" averages the factors
themselves (same rank, approximate). The result is a run folder, servable like any other.

Merging is idempotent: the output records what it was made from (`chatbuild_merge.json`); asking
for the same merge again finds it done and changes nothing.
"""

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from chatbuild.bases import resolve_base
from chatbuild.config import save_config
from chatbuild.errors import UserError
from chatbuild.runs import ADAPTER_FILES, load_run

COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear")


def adapter_digest(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / "adapter" / ADAPTER_FILES[1]).read_bytes()).hexdigest()


def _already_done(out: Path, recipe: dict) -> bool:
    marker = out / "chatbuild_merge.json"
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()) == recipe


def _prepare_out(out: Path, recipe: dict, overwrite: bool) -> bool:
    """True when the work is already there. Refuses to replace an unrelated folder."""
    if _already_done(out, recipe):
        print(f"merge: {out} already holds this merge; nothing to do")
        return True
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty and holds a different result; pass --overwrite to replace it")
        shutil.rmtree(out)
    return False


def merge_run(run_path: str | Path, out: str | Path, dtype: str = "bfloat16", requantize: str | None = None,
              overwrite: bool = False, log=print) -> Path:
    """The run's adapter merged into its base reloaded in 16 bits, saved as a standard HF checkpoint.
    `log` gets the closing line (a caller merging into a scratch folder passes its own)."""
    import torch
    from peft import PeftModel

    from chatbuild.modeling import load_base_model, load_tokenizer

    run, out = load_run(run_path), Path(out)
    recipe = {"kind": "merge", "run": str(run.path), "adapter_sha256": adapter_digest(run.path), "base": run.base,
              "revision": run.config.model.revision, "dtype": dtype, "requantize": requantize}
    if _prepare_out(out, recipe, overwrite):
        return out
    m = run.config.model
    base = load_base_model(resolve_base(m.base), m.revision, quant="none", double_quant=False, compute_dtype=dtype,
                           trust_remote_code=m.trust_remote_code)
    merged = PeftModel.from_pretrained(base, run.adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    tokenizer = load_tokenizer(str(run.tokenizer_dir))
    target = out if requantize is None else out.with_name(out.name + ".16bit-tmp")
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    if requantize is not None:
        from transformers import AutoModelForCausalLM

        from chatbuild.modeling import quantization_config, resolve_dtype

        q = quantization_config(requantize, True, resolve_dtype("auto"))
        model = AutoModelForCausalLM.from_pretrained(target, quantization_config=q, dtype=torch.float32 if not torch.cuda.is_available() else None)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        shutil.rmtree(target)
    run.chat_format.save(out / "chat_format.json")
    (out / "chatbuild_merge.json").write_text(json.dumps(recipe, indent=2) + "\n")
    log(f"merge: wrote {out}")
    return out


def combine_adapters(run_paths: list[str], weights: list[float], out: str | Path, combination: str = "cat",
                     merge_into_base: bool = False, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """A weighted combination of several adapters trained on one base, as a new run folder (or, with
    merge_into_base, merged into the 16-bit base)."""
    from peft import PeftModel

    from chatbuild.modeling import load_base_model

    if len(run_paths) < 2:
        raise UserError("--adapters needs at least two runs to combine")
    if len(weights) != len(run_paths):
        raise UserError(f"--weights has {len(weights)} values for {len(run_paths)} adapters")
    if combination not in COMBINATIONS:
        raise UserError(f'--combination "{combination}" is not one of {", ".join(COMBINATIONS)}')
    runs, out = [load_run(p) for p in run_paths], Path(out)
    bases = {(r.base, r.config.model.revision) for r in runs}
    if len(bases) > 1:
        raise UserError("adapters can only be combined when trained on the same base; got " +
                        ", ".join(f"{r.path.name}: {r.base}" for r in runs))
    recipe = {"kind": "combine", "runs": [str(r.path) for r in runs], "adapter_sha256": [adapter_digest(r.path) for r in runs],
              "weights": weights, "combination": combination, "merge_into_base": merge_into_base, "dtype": dtype}
    if _prepare_out(out, recipe, overwrite):
        return out
    m = runs[0].config.model
    base = load_base_model(resolve_base(m.base), m.revision, quant="none", double_quant=False, compute_dtype=dtype,
                           trust_remote_code=m.trust_remote_code)
    names = [f"a{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, runs[0].adapter_dir, adapter_name=names[0])
    for name, r in zip(names[1:], runs[1:]):
        model.load_adapter(r.adapter_dir, adapter_name=name)
    try:
        model.add_weighted_adapter(names, weights, adapter_name="combined", combination_type=combination,
                                   density=0.5 if combination in ("ties", "dare_linear") else None)
    except ValueError as e:
        raise UserError(f"peft could not combine these adapters with '{combination}': {e}") from None
    model.set_adapter("combined")
    for name in names:
        model.delete_adapter(name)
    out.mkdir(parents=True, exist_ok=True)
    if merge_into_base:
        merged = model.merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
        shutil.copytree(runs[0].tokenizer_dir, out, dirs_exist_ok=True)
        runs[0].chat_format.save(out / "chat_format.json")
    else:
        # A run folder (chatbuild.runs): adapter/, config.yaml, README.md, tokenizer/ and, last as a
        # fine-tune writes it, chat_format.json, the file that makes it a finished run.
        model.save_pretrained(out / "_peft", safe_serialization=True)
        (out / "_peft" / "combined").rename(out / "adapter")
        shutil.rmtree(out / "_peft")
        cfg = replace(runs[0].config, name=out.name, output_dir=str(out))
        save_config(cfg, out / "config.yaml")
        (out / "README.md").write_text(
            f"# {out.name}\n\nA weighted combination ({combination}) of LoRA adapters on `{runs[0].base}`:\n\n"
            + "".join(f"- `{r.path}` × {w}\n" for r, w in zip(runs, weights)) + "\nMade by `chatbuild merge --adapters`.\n")
        shutil.copytree(runs[0].tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
        runs[0].chat_format.save(out / "chat_format.json")
    (out / "chatbuild_merge.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"merge: wrote {out}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="the run folder whose adapter to merge into its base")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--adapters", nargs="+", metavar="RUN", help="combine these runs' adapters instead")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (with --adapters)")
    p.add_argument("--combination", default="cat", choices=COMBINATIONS, help="how to combine adapters (default: cat, exact)")
    p.add_argument("--merge-into-base", action="store_true", help="with --adapters: write a merged model, not an adapter")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="16-bit merge dtype (default bfloat16)")
    p.add_argument("--requantize", choices=("nf4", "fp4", "int8"), help="quantize the merged model and save it in 4/8 bits")
    p.add_argument("--overwrite", action="store_true", help="replace a different result already in --out")


def run(args: argparse.Namespace) -> int:
    if args.adapters:
        if args.run:
            raise UserError("give either RUN or --adapters, not both")
        combine_adapters(args.adapters, args.weights or [1.0 / len(args.adapters)] * len(args.adapters), args.out,
                         args.combination, args.merge_into_base, args.dtype, args.overwrite)
    elif args.run:
        if args.weights:
            raise UserError("--weights only applies with --adapters")
        merge_run(args.run, args.out, args.dtype, args.requantize, args.overwrite)
    else:
        raise UserError("give a RUN to merge, or --adapters RUN RUN ... to combine")
    return 0


if __name__ == "__main__":
    from chatbuild.cli import main

    raise SystemExit(main(["merge", *sys.argv[1:]]))
