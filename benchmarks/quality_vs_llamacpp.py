"""llmc's quantized quality against llama.cpp's, on the golden models, with llama.cpp's own protocol.

For each model and text:
- llama.cpp: the checkpoint converted to GGUF F32 by llama.cpp's converter (through the peer
  harness's gguf_convert.py), quantized by `llama-quantize` (Q4_0, Q4_K_M, Q5_K_M, Q8_0, and the
  same with an importance matrix from `llama-imatrix` on the model's calibration text), scored by
  `llama-perplexity -c CTX --kl-divergence` against the F32 model's logits (`--kl-divergence-base`);
- llmc: `llmc.quantize` recipes (`RECIPES`, and `--target-size` at the bytes of Q4_0 and Q4_K_M),
  scored by `llmc.bench.quality(protocol_name="llama-perplexity")` against the float checkpoint:
  llama-perplexity's chunks (BOS first, the second half of each chunk scored).

Both tokenize the text into the same ids (checked with `llama-tokenize`: the count of ids that
differ is printed, and the two float perplexities agree), so KLD, top-1 agreement and the
perplexity ratio compare directly. stories260K's tokenizer folds runs of spaces as its
sentencepiece model says and llama.cpp's does not, so the texts have such runs folded first.
Bytes: "bytes" is the file (the GGUF also holds the vocabulary; llmc's safetensors files their
headers, the tokenizer being a file of its own), "tensor bytes" the tensors alone. llmc is within
a llama.cpp type's bytes when both of its numbers are.

Texts: `main` is the issue's protocol: the last 150,000 characters of the TinyStories validation
sample for stories260K, golden/stdlib-llama/validation.txt (held out from its training) for
stdlib-llama; `unused`: the first 150,000 characters of WikiText-2's test split, which no test and
no calibration reads.

    .venv/bin/python benchmarks/quality_vs_llamacpp.py                    # both models, both texts
    .venv/bin/python benchmarks/quality_vs_llamacpp.py --models stories260K --texts main --json q.json

Where things come from: llama.cpp built by the peer harness (`<peers>/setup.sh`; `llama-imatrix`
is built here from the same tree when missing), GGUFs and llama.cpp's logits under --work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_llamacpp import ensure_llama_cpp, llama_paths, log, peers_python, run  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
MODELS = {"stories260K": ROOT / "golden" / "stories260K", "stdlib-llama": ROOT / "golden" / "stdlib-llama"}
CALIBRATION = {"stories260K": ROOT / "golden" / "tinystories_valid_head.txt",
               "stdlib-llama": ROOT / "golden" / "stdlib-llama" / "calibration.txt"}
LLAMA_TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0")
# label -> llmc quantize options (recipe_from_options keywords); targets at llama.cpp's sizes are added per model
RECIPES: dict[str, dict[str, Any]] = {
    "w8a16 gptq": {"scheme": "w8a16", "algo": "gptq"},
    "w4a16 g32 gptq --symmetric --observer minmax": {"scheme": "w4a16", "algo": "gptq", "group_size": 32,
                                                     "asymmetric": False, "observer": "minmax"},   # the old defaults
    "w4a16 g32 gptq": {"scheme": "w4a16", "algo": "gptq", "group_size": 32},                      # asymmetric, mse
    "w4a16 g32 gptq --two-level-scales": {"scheme": "w4a16", "algo": "gptq", "group_size": 32,
                                          "two_level_scales": True},
    "--profile int4-auto (--target-bpw 5.25)": {"scheme": "w4a16", "algo": "gptq", "target_bpw": 5.25},
}
CALIB = {"calib_samples": 64, "calib_seqlen": 256}


def texts(work: Path, model: str, which: list[str]) -> dict[str, Path]:
    out = {}
    for name in which:
        path = work / f"text-{model}-{name}.txt"
        if name == "main" and model == "stories260K":
            body = (DATA / "eval" / "tinystories_valid_sample.txt").read_text(encoding="utf-8")[-150_000:]
        elif name == "main":
            body = (ROOT / "golden" / "stdlib-llama" / "validation.txt").read_text(encoding="utf-8")
        else:
            body = (DATA / "eval" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:150_000]
        # no space at either end: llama.cpp's tokenizer puts its own word start before the first
        # word however the text begins, where stories260K's tokenizer strips leading spaces
        path.write_text(fold_spaces(model, body).strip() + "\n", encoding="utf-8")
        out[name] = path
    return out


def tokenizer(model: str):
    """The model's own tokenizer (tokenizer.json)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(MODELS[model] / "tokenizer.json"))


def fold_spaces(model: str, body: str) -> str:
    """The text with runs of spaces made one when the model's tokenizer folds them (sentencepiece's
    remove_extra_whitespaces, which stories260K's tokenizer.json keeps and llama.cpp's tokenizer
    does not): then both tools read the same ids. A tokenizer that keeps spaces (code) keeps them."""
    tk = tokenizer(model)
    if tk.encode("a  b", add_special_tokens=False).ids == tk.encode("a b", add_special_tokens=False).ids:
        return re.sub(" {2,}", " ", body)
    return body


def same_ids(bin_dir: Path, model: str, f32: Path, text: Path) -> tuple[int, int]:
    """(tokens where llama.cpp's and llmc's ids differ, tokens): 0 is what the comparison needs."""
    import difflib
    tool = ensure_tool(bin_dir, "llama-tokenize")
    out = run([tool, "-m", f32, "-f", text, "--ids", "--log-disable", "--no-escape"],   # as llama-perplexity reads it
              timeout=3600).stdout
    theirs = json.loads(out.strip().splitlines()[-1])
    tk = tokenizer(model)
    bos = theirs[:1] if theirs and theirs[0] == tk.token_to_id("<s>") else []
    ours = bos + tk.encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    if ours == theirs:
        return 0, len(ours)
    ops = difflib.SequenceMatcher(None, theirs, ours, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in ops if op != "equal"), len(ours)


def gguf_f32(work: Path, model: str) -> Path:
    out = work / f"{model}-f32.gguf"
    if not out.exists():
        src = next(Path(os.environ.get("PEERS_BUILD", "/tmp/peers-build")).glob("llama-cpp-python-*/vendor/llama.cpp"))
        log(f"converting {model} to GGUF F32")
        tmp = out.with_suffix(".tmp")
        run([peers_python(), ROOT.parent / "shared" / "peers" / "gguf_convert.py", src, MODELS[model],
             "--outtype", "f32", "--outfile", tmp], timeout=3600)
        tmp.rename(out)
    return out


def ensure_tool(bin_dir: Path, name: str) -> Path:
    """A llama.cpp tool the peer harness does not build (llama-imatrix, llama-tokenize), built from its tree."""
    tool = bin_dir / name
    if not tool.exists():
        log(f"building {name}")
        run(["cmake", "--build", bin_dir.parent, "--target", name, "-j", str(os.cpu_count() or 2)], timeout=3600)
    return tool


def imatrix(bin_dir: Path, work: Path, model: str, f32: Path, ctx: int) -> Path:
    out = work / f"{model}-imatrix.gguf"
    if not out.exists():
        log(f"llama-imatrix {model}")
        run([ensure_tool(bin_dir, "llama-imatrix"), "-m", f32, "-f", CALIBRATION[model], "-c", str(ctx), "-o", out,
             "--no-ppl"], timeout=3600)
    return out


def llama_quantize(bin_dir: Path, work: Path, model: str, f32: Path, qtype: str, imat: Path | None) -> Path:
    out = work / f"{model}-{qtype.lower()}{'-imatrix' if imat else ''}.gguf"
    if not out.exists():
        run([bin_dir / "llama-quantize", *(["--imatrix", imat] if imat else []), f32, out, qtype, "2"], timeout=3600)
    return out


def tensor_bytes(gguf: Path) -> int:
    """The bytes of a GGUF's tensors (the file less its header, vocabulary and alignment)."""
    code = ("import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); "
            "print(sum(int(t.n_bytes) for t in r.tensors))")
    return int(run([peers_python(), "-c", code, gguf]).stdout.strip())


def llama_perplexity(bin_dir: Path, gguf: Path, text: Path, ctx: int, base: Path, make_base: bool) -> dict:
    args = [bin_dir / "llama-perplexity", "-m", gguf, "-f", text, "-c", str(ctx), "-b", str(ctx), "-t", "2",
            "--no-repack",                    # its repacked Q4_0 crashes on these small shapes (segfault)
            "--kl-divergence-base", base]
    if not make_base:
        args.append("--kl-divergence")
    log_file = base.with_name(f"{gguf.stem}-{text.stem}.log")    # its log through a pipe loses the last lines
    log_file.unlink(missing_ok=True)
    out = run([*args, "--log-file", log_file], timeout=3600)
    # its closing statistics can be lost at exit (an asynchronous logger), so read the running
    # values after the last chunk, which are the final ones
    for _ in range(50):
        log_text = log_file.read_text() + out.stdout
        rows = ROW.findall(log_text) if not make_base else PROGRESS.findall(log_text)
        if rows:
            break
        time.sleep(0.2)
    if not rows:
        raise RuntimeError(f"no results in llama-perplexity's log {log_file}")
    if make_base:                                    # [1]3.8165,[2]3.7361,...: the running perplexity
        chunk, ppl = rows[-1]
        return {"chunks": int(chunk), "ppl": float(ppl)}
    chunk, ppl, ln_ratio, kld, same_top = rows[-1]
    return {"chunks": int(chunk), "kld": float(kld), "top1": float(same_top) / 100, "ppl": float(ppl),
            "ppl_base": float(ppl) / math.exp(float(ln_ratio))}


PM = r"\s*±\s*[0-9.]+"
# chunk, PPL(Q), ln(PPL(Q)/PPL(base)), KLD, delta-p RMS (%), same top (%), each with its +-
ROW = re.compile(r"^\s*(\d+)\s+([0-9.]+)" + PM + r"\s+([-0-9.]+)" + PM + r"\s+([0-9.]+)" + PM + r"\s+[0-9.]+" + PM
                 + r"\s*%\s+([0-9.]+)" + PM + r"\s*%", re.M)
PROGRESS = re.compile(r"\[(\d+)\]([0-9.]+)")


def llmc_side(model: str, text: Path, ctx: int, work: Path, label: str, options: dict) -> dict:
    from llmc.bench.quality import quality
    from llmc.checkpoint import ITEMSIZE, WeightStore
    from llmc.quantized.scheme import recipe_from_options
    from llmc.quantizer import quantize

    out = work / f"llmc-{model}-{re.sub(r'[^A-Za-z0-9]+', '-', label).strip('-')}"
    if not out.exists():
        opts = {**CALIB, **options}
        quantize(MODELS[model], out, recipe_from_options(opts.pop("scheme"), **opts), calib=CALIBRATION[model],
                 force=True)
    r = quality(out, MODELS[model], text, seqlen=ctx, protocol_name="llama-perplexity")
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    store = WeightStore.open(out)
    tensors = sum(math.prod(store.shape(n)) * ITEMSIZE[store.dtype(n)] for n in store.names())
    return {"tool": "llmc", "recipe": label, "kld": r.kl_divergence, "top1": r.top1_agreement,
            "ppl_ratio": r.perplexity / r.reference_perplexity, "bytes": size, "tensor_bytes": tensors,
            "ppl_base": r.reference_perplexity, "chunks": r.windows}


def measure(model: str, text_name: str, text: Path, args, bin_dir: Path) -> list[dict]:
    work = args.work
    f32 = gguf_f32(work, model)
    base = work / f"{model}-{text_name}.kld"
    b = llama_perplexity(bin_dir, f32, text, args.ctx, base, make_base=True)
    differ, tokens = same_ids(bin_dir, model, f32, text)
    rows = [{"tool": "float", "recipe": "llama.cpp F32", "kld": 0.0, "top1": 1.0, "ppl_ratio": 1.0,
             "bytes": f32.stat().st_size, "tensor_bytes": tensor_bytes(f32), "ppl_base": b["ppl"],
             "chunks": b["chunks"], "tokens": tokens, "ids_differ": differ}]
    imat = imatrix(bin_dir, work, model, f32, args.ctx) if not args.no_imatrix else None
    for qtype in LLAMA_TYPES:
        for im in ([None, imat] if imat is not None else [None]):
            gguf = llama_quantize(bin_dir, work, model, f32, qtype, im)
            r = llama_perplexity(bin_dir, gguf, text, args.ctx, base, make_base=False)
            rows.append({"tool": "llama.cpp", "recipe": qtype + (" imatrix" if im else ""), "kld": r["kld"],
                         # against the F32 run's perplexity: the base logits llama-perplexity saves are
                         # compressed, and its own ratio inherits their error (up to 8% on WikiText)
                         "top1": r["top1"], "ppl_ratio": r["ppl"] / b["ppl"], "bytes": gguf.stat().st_size,
                         "tensor_bytes": tensor_bytes(gguf), "ppl_base": r["ppl_base"], "chunks": r["chunks"]})
            log(f"{model} {text_name} {rows[-1]['recipe']}: KLD {r['kld']:.5f}")
    recipes = dict(RECIPES)
    for qtype in ("Q4_0", "Q4_K_M"):       # llmc's tensors within llama.cpp's tensors' bytes
        limit = next(r["tensor_bytes"] for r in rows if r["recipe"] == qtype)
        recipes[f"w4a16 gptq --target-size {qtype}"] = {"scheme": "w4a16", "algo": "gptq", "target_size": limit}
    for label, options in recipes.items():
        rows.append(llmc_side(model, text, args.ctx, work, label, options))
        log(f"{model} {text_name} llmc {label}: KLD {rows[-1]['kld']:.5f}, {rows[-1]['bytes']:,} bytes")
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for qtype, factor in (("Q4_K_M", 1.0), ("Q4_0", 0.5)):
        ref = next(r for r in rows if r["recipe"] == qtype)
        fits = [r for r in rows if r["tool"] == "llmc" and r["bytes"] <= ref["bytes"]
                and r["tensor_bytes"] <= ref["tensor_bytes"]]
        best = min(fits, key=lambda r: r["kld"], default=None)
        if best is None:
            out.append(f"no llmc recipe within {qtype}'s bytes")
            continue
        ok = best["kld"] <= factor * ref["kld"]
        out.append(f"{'PASS' if ok else 'FAIL'}: llmc '{best['recipe']}' KLD {best['kld']:.5f} "
                   f"{'<=' if ok else '>'} {factor:g} x {qtype}'s {ref['kld']:.5f}, within its bytes "
                   f"(file {best['bytes']:,} <= {ref['bytes']:,}, tensors {best['tensor_bytes']:,} <= "
                   f"{ref['tensor_bytes']:,})")
    return out


def print_table(model: str, text_name: str, rows: list[dict]) -> None:
    f = rows[0]
    print(f"\n### {model}, text `{text_name}`\n\n{f['tokens']:,} tokens ({f['ids_differ']} differ between the two "
          f"tokenizers), {f['chunks']} chunks; float perplexity {f['ppl_base']:.4f} (llama.cpp), "
          f"{next(r['ppl_base'] for r in rows if r['tool'] == 'llmc'):.4f} (llmc)\n")
    print("| tool | recipe | KLD | top-1 | PPL ratio | bytes | tensor bytes |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: r["bytes"]):
        tb = f"{r['tensor_bytes']:,}" if r["tensor_bytes"] is not None else ""
        print(f"| {r['tool']} | {r['recipe']} | {r['kld']:.5f} | {100 * r['top1']:.2f}% | {r['ppl_ratio']:.4f} | "
              f"{r['bytes']:,} | {tb} |")
    print()
    for line in verdicts(rows):
        print(f"- {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--texts", default="main,unused", help="main, unused or both")
    p.add_argument("--ctx", type=int, default=256, help="llama-perplexity -c (and llmc's chunk length)")
    p.add_argument("--work", type=Path, default=None, help="where GGUFs and llmc models go (default: a temp dir)")
    p.add_argument("--no-imatrix", action="store_true", help="skip llama.cpp's importance-matrix variants")
    p.add_argument("--json", type=Path, default=None, help="write every row here")
    args = p.parse_args()
    args.work = args.work or Path(tempfile.mkdtemp(prefix="llmc-quality-"))
    args.work.mkdir(parents=True, exist_ok=True)
    bin_dir, _ = llama_paths(ROOT.parent / "shared" / "peers")
    ensure_llama_cpp(ROOT.parent / "shared" / "peers", bin_dir)
    results: dict[str, Any] = {}
    for model in args.models.split(","):
        if model not in MODELS:
            sys.exit(f"error: unknown model {model!r}; known: {', '.join(MODELS)}")
        for text_name, text in texts(args.work, model, args.texts.split(",")).items():
            rows = measure(model, text_name, text, args, bin_dir)
            results[f"{model}/{text_name}"] = rows
            print_table(model, text_name, rows)
            sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    try:
        main()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        sys.exit(f"error: {e}")
