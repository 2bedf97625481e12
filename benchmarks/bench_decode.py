"""Decode speed of the `hf` backend's two decode paths against HF `generate`, side by side in one run.

    python benchmarks/bench_decode.py [--sizes 135m,7b] [--batch-sizes 1,64] [--new-tokens 128]
        [--prompt-len 64] [--layers N] [--device auto] [--dtype auto] [--compile] [--repeats 3]
        [--json benchmarks/results/decode_<device>_<sizes>.json]

    smoke run on a CPU: python benchmarks/bench_decode.py --sizes 135m --layers 2 --batch-sizes 1,4 --new-tokens 8

Models are random-weight Llamas of two real shapes, built in place on the target device (no weight
init pass, then a normal(0, 0.02) fill; norms at 1): "135m" = SmolLM2-135M (hidden 576, 30 layers,
9 heads / 3 kv heads, MLP 1536, vocab 49152, tied embeddings) and "7b" = Llama-2-7B (hidden 4096,
32 layers, 32 heads, MLP 11008, vocab 32000). `--layers N` keeps only N layers (for a CPU run of
the 7B shape); the output says so. Weights are random, so only speed is meaningful.

For every size and batch size, the same prompts (random token ids, `--prompt-len` each, no padding),
greedy, exactly `--new-tokens` new tokens (no eos stop):

1. baseline: HF `model.generate` with its defaults (dynamic cache), `max_new_tokens = min_new_tokens = N`;
2. ours, dynamic: `HFBackend` decode loop with `static_cache=off` (DynamicCache, rows dropped when done);
3. ours, static: `static_cache=on` with `compile=on` on CUDA (CUDA graphs) or with `--compile` on
   CPU, else the static cache uncompiled.

Ours is timed at the batch level (`HFBackend._generate_batch`: no chat template, no tokenizer), the
baseline at `generate`. Decode ms/step = (time(N new tokens) - time(1 new token)) / (N - 1), so the
prefill is excluded; tokens/s = batch * 1000 / ms_per_step. Each method is warmed up with both
lengths first; the warm-up time over the steady time (compilation, CUDA-graph capture) is reported
as `warmup_extra_s`, not counted. Times are medians of `--repeats` (the two lengths alternate),
with torch.cuda.synchronize() around them on CUDA; on a loaded CPU use more repeats. `same_as_hf` counts rows whose tokens equal the baseline's (expected all in
float32; bf16 rounding differs between batched kernels, so random-weight rows may diverge).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from constitutional.backends.base import GenerationParams
from constitutional.backends.hf import HFBackend, resolve_dtype

SHAPES = {
    "135m": dict(  # SmolLM2-135M
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "7b": dict(  # Llama-2-7B
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}


def build_model(size: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama of a real shape, allocated directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    shape = dict(SHAPES[size])
    if layers:
        shape["num_hidden_layers"] = layers
    cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device), no_init_weights():
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # uninitialised memory: fill every tensor
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if shape["tie_word_embeddings"]:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def simple_tokenizer():
    """Special tokens only: the benchmark feeds token ids, the backend needs eos/pad ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def hf_generate(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
            max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].tolist()


def ours(backend: HFBackend, prompts: list[list[int]], n: int) -> list[list[int]]:
    batch = [(i, ids, i) for i, ids in enumerate(prompts)]
    with torch.no_grad():
        return [ids for ids, _ in backend._generate_batch((), batch, GenerationParams(max_new_tokens=n, temperature=0))]


def measure(run, n: int, repeats: int, device) -> dict:
    """Decode ms/step from time(n) - time(1), after a warm-up of both lengths; the two lengths are timed
    in alternation and the medians taken, so that drift in the machine's load hits both alike."""
    _, warm_n = timed(lambda: run(n), device)
    timed(lambda: run(1), device)
    t1s, tns = [], []
    for _ in range(repeats):
        t1s.append(timed(lambda: run(1), device)[1])
        out, t = timed(lambda: run(n), device)
        tns.append(t)
    t1, tn = statistics.median(t1s), statistics.median(tns)
    assert all(len(ids) == n for ids in out), "a row stopped early"
    ms = (tn - t1) * 1000 / (n - 1)
    return {
        "first_token_ms": round(t1 * 1000, 2), "total_ms": round(tn * 1000, 2), "ms_per_step": round(ms, 3),
        "warmup_extra_s": round(max(0.0, warm_n - tn), 2), "tokens": out,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="135m,7b", help="comma-separated: " + ",".join(SHAPES))
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--layers", type=int, help="keep only this many layers (e.g. the 7B shape on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where supported), bfloat16, float16, float32")
    ap.add_argument("--compile", action="store_true", help="on CPU: compile the static decode step (always on for CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", help="where to write the results (default benchmarks/results/decode_<cuda|cpu>_<sizes>.json)")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (ms/step is a difference of two lengths)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    compile_static = cuda or args.compile
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if unknown := [s for s in sizes if s not in SHAPES]:
        ap.error(f"unknown sizes {unknown}; use {', '.join(SHAPES)}")
    import transformers

    static_name = "ours_static_compiled" if compile_static else "ours_static"
    methods = ["hf_generate", "ours_dynamic", static_name]
    res = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(dtype).replace("torch.", ""), "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
        "repeats": args.repeats, "layers": args.layers, "static_compiled": compile_static,
        "methods": {
            "hf_generate": "transformers generate, defaults (DynamicCache), greedy, max_new_tokens=min_new_tokens=N",
            "ours_dynamic": "HFBackend static_cache=off",
            static_name: f"HFBackend static_cache=on compile={'on' if compile_static else 'off'}"
            + (" (reduce-overhead: CUDA graphs)" if cuda else ""),
        },
        "results": [],
    }
    print(f"device={res['device']} dtype={res['dtype']} torch={torch.__version__} transformers={transformers.__version__} "
          f"new_tokens={args.new_tokens} prompt_len={args.prompt_len} repeats={args.repeats}")
    tok = simple_tokenizer()
    for size in sizes:
        t0 = time.perf_counter()
        model = build_model(size, args.layers, device, dtype)
        layers = model.config.num_hidden_layers
        params = sum(p.numel() for p in model.parameters())
        print(f"\n[{size}] {layers} layers{' (cut from ' + str(SHAPES[size]['num_hidden_layers']) + ')' if args.layers else ''}, "
              f"{params / 1e6:.0f}M parameters, built in {time.perf_counter() - t0:.1f}s")
        for B in batch_sizes:
            gen = torch.Generator().manual_seed(B)
            prompts = torch.randint(4, model.config.vocab_size, (B, args.prompt_len), generator=gen)
            rows = prompts.tolist()
            backends = {
                "ours_dynamic": HFBackend.from_model(model, tok, name=size, batch_size=B, prefix_cache=False, static_cache="off"),
                static_name: HFBackend.from_model(model, tok, name=size, batch_size=B, prefix_cache=False, static_cache="on",
                                                  compile="on" if compile_static else "off"),
            }
            for b in backends.values():
                b.eos_ids = set()  # forced length: no eos stop
            runs = {"hf_generate": lambda n, p=prompts.to(device), mdl=model: hf_generate(mdl, p, n)}
            runs.update({k: (lambda n, b=b: ours(b, rows, n)) for k, b in backends.items()})
            row = {"size": size, "layers": layers, "params_m": round(params / 1e6, 1), "batch": B}
            for m in methods:
                r = measure(runs[m], args.new_tokens, args.repeats, device)
                r["tokens_per_s"] = round(B * 1000 / r["ms_per_step"], 1) if r["ms_per_step"] > 0 else None
                row[m] = r
            tokens = {m: row[m].pop("tokens") for m in methods}
            for m in methods:
                row[m]["same_as_hf"] = f"{sum(a == b for a, b in zip(tokens[m], tokens['hf_generate']))}/{B}"
                ms = row[m]["ms_per_step"]
                row[m]["speedup_vs_hf"] = round(row["hf_generate"]["ms_per_step"] / ms, 2) if ms > 0 and row["hf_generate"]["ms_per_step"] > 0 else None
            res["results"].append(row)
            print(f"  batch {B}:")
            print(f"    {'method':<22} {'ms/step':>9} {'tok/s':>10} {'vs HF':>7} {'1st tok ms':>11} {'warm-up+ s':>11} {'same as HF':>11}")
            for m in methods:
                r = row[m]
                tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"  # none when load noise beat the signal
                ratio = f"{r['speedup_vs_hf']:.2f}x" if r["speedup_vs_hf"] else "-"
                print(f"    {m:<22} {r['ms_per_step']:>9.3f} {tps:>10} {ratio:>7} "
                      f"{r['first_token_ms']:>11.1f} {r['warmup_extra_s']:>11.2f} {r['same_as_hf']:>11}")
            del backends, runs
        del model
        if cuda:
            torch.cuda.empty_cache()
    out = Path(args.json) if args.json else Path(__file__).resolve().parent / "results" / f"decode_{device.type}_{args.sizes.replace(',', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
