#!/usr/bin/env python3
"""Make golden/stdlib-llama: a small real Llama trained from scratch on the Python standard library.

Reproduce it (from the repository root; about five minutes on two CPU cores):

    .venv/bin/pip install sentencepiece protobuf
    .venv/bin/python golden/make_stdlib_llama.py --out golden/stdlib-llama

`sentencepiece` and `protobuf` are needed by this script only (to train the tokenizer and to
convert it for `tokenizers`); llmc itself does not depend on them. The script also uses torch and
transformers, which llmc's environment already has.

What it does, deterministically (same interpreter, library versions and thread count give a
byte-identical model.safetensors):

1. Corpus: every `*.py` under the running interpreter's stdlib directory
   (`sysconfig.get_paths()["stdlib"]`) except those under `test/`, `tests/`, `idlelib/`
   (which covers `lib2to3/tests`) and `site-packages/`, sorted by relative path and decoded as
   UTF-8 with errors="replace". A file goes to validation when the sha256 of its relative path,
   read as a big-endian integer, is 0 mod 20 (about 5%); the rest is training text. The corpus
   differs between Python versions, so TRAINING.json records the version and the list hashes.
2. Tokenizer: SentencePiece BPE, 4096 pieces, byte fallback, trained on the training files'
   non-blank lines with whitespace kept verbatim (identity normalization, no dummy prefix), single
   threaded; converted to tokenizer.json with transformers' SentencePiece extractor and checked
   against SentencePiece id for id on the validation text and on edge cases.
3. Model: LlamaForCausalLM, hidden 256, 4 layers, 4 heads / 2 KV heads, SwiGLU 688, vocab 4096,
   untied embeddings, trained in fp32 with AdamW (peak lr 3e-3, linear warmup, cosine decay to
   10%, weight decay 0.1 on matrices, gradient clipping 1.0) on 256-token windows drawn by a seeded
   torch.Generator from the training stream (files joined with EOS). Every window is fed as
   BOS + its first 255 tokens and scored on all 256. The run stops after --steps steps (never on
   time), and the weights are saved as fp16.
4. Evaluation: validation perplexity of the saved fp16 weights computed in fp32, on the
   validation text tokenized without special tokens, cut into non-overlapping 256-token windows,
   each fed as BOS + window[:-1] so that every text token is scored exactly once; also on the
   first 16384 tokens of validation.txt (same protocol; quick enough for unit tests).

Output (built in a temporary directory beside --out, then renamed into place): config.json,
generation_config.json, model.safetensors, tokenizer.model, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, calibration.txt (whole training files in order, up to 64 KiB),
validation.txt (whole validation files in order, up to 64 KiB) and TRAINING.json (the record).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import shutil
import signal
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SEQ_LEN = 256
BATCH = 8
PEAK_LR = 3e-3
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.1
VOCAB_SIZE = 4096
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VAL_MODULUS = 20                       # 1 in 20 files (~5%) is validation
EXCERPT_BYTES = 64 * 1024
QUICK_VAL_TOKENS = 16384
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
DEFAULT_STEPS = 680                    # ~0.43 s a step on 2 idle cores: just under 300 s
DEFAULT_MAX_SECONDS = 300.0
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "calibration.txt", "validation.txt")

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
    initializer_range=0.02, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
)

SPM_OPTIONS = dict(
    model_type="bpe", vocab_size=VOCAB_SIZE, byte_fallback=True,
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    split_by_whitespace=True, allow_whitespace_only_pieces=True, split_digits=False,
    character_coverage=0.9995, max_sentencepiece_length=16, max_sentence_length=4192,
    input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
)

# Edge cases for the tokenizer check, beyond the validation lines.
EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\n", "\t", "\t\tx = 1", "    return self", "        ",
    "def f():\n\n    pass\n", "  leading and trailing  ", "a  b   c    d",
    "x = 'caf\u00e9' # na\u00efve \u2014 \u201cquotes\u201d", "\u65e5\u672c\u8a9e \U0001f642 \u00a0nbsp",
    "tab\tin\tthe\tmiddle\t", "\r\n", "line\r\nwindows\r\n", "\x00\x01\x7f", "\ufffd",
    "\u200d\U0001f468\u200d\U0001f469", "# -*- coding: utf-8 -*-\n", "0123456789 3.14159e-10",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


# --------------------------------------------------------------------------- corpus

@dataclass(frozen=True)
class Doc:
    rel: str
    text: str


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: list[Doc]
    val: list[Doc]


def is_excluded(rel: str) -> bool:
    return any(part in EXCLUDED_DIRS for part in rel.split("/")[:-1])


def is_validation(rel: str) -> bool:
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest(), "big") % VAL_MODULUS == 0


def load_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
    docs = [Doc(rel, (root / rel).read_bytes().decode("utf-8", errors="replace"))
            for rel in rels if not is_excluded(rel)]
    return Corpus(root, [d for d in docs if not is_validation(d.rel)],
                  [d for d in docs if is_validation(d.rel)])


def list_hash(docs: list[Doc]) -> str:
    return sha256_bytes("\n".join(d.rel for d in docs).encode("utf-8"))


def content_hash(docs: list[Doc]) -> str:
    lines = (f"{d.rel}\t{sha256_bytes(d.text.encode('utf-8'))}" for d in docs)
    return sha256_bytes("\n".join(lines).encode("utf-8"))


def corpus_record(c: Corpus) -> dict:
    return {
        "stdlib_dir": str(c.root),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "rule": "*.py under the stdlib dir, excluding test/, tests/, idlelib/, site-packages/ "
                "(any depth), sorted by relative path, UTF-8 with errors='replace'; validation "
                f"iff int(sha256(relpath)) % {VAL_MODULUS} == 0",
        "train_files": len(c.train), "val_files": len(c.val),
        "train_bytes": sum(len(d.text.encode()) for d in c.train),
        "val_bytes": sum(len(d.text.encode()) for d in c.val),
        "train_list_sha256": list_hash(c.train), "val_list_sha256": list_hash(c.val),
        "all_list_sha256": list_hash(sorted(c.train + c.val, key=lambda d: d.rel)),
        "train_content_sha256": content_hash(c.train), "val_content_sha256": content_hash(c.val),
        "val_file_list": [d.rel for d in c.val],
    }


def excerpt(docs: list[Doc], limit: int = EXCERPT_BYTES) -> tuple[str, list[str]]:
    """Whole files in order, skipping any that would overflow `limit` UTF-8 bytes."""
    parts, names, size = [], [], 0
    for d in docs:
        n = len(d.text.encode("utf-8"))
        if size + n <= limit:
            parts.append(d.text)
            names.append(d.rel)
            size += n
    return "".join(parts), names


# --------------------------------------------------------------------------- tokenizer

def tokenizer_lines(docs: list[Doc]) -> list[str]:
    """SentencePiece trains on sentences: here every non-blank line of the training files."""
    return [line for d in docs for line in d.text.split("\n") if line.strip()]


def train_sentencepiece(docs: list[Doc], path: Path) -> dict:
    import sentencepiece as spm
    lines = tokenizer_lines(docs)
    buf = io.BytesIO()
    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **SPM_OPTIONS)
    path.write_bytes(buf.getvalue())
    log(f"tokenizer: {len(lines)} lines, {time.perf_counter() - t0:.1f}s")
    return {"sentencepiece_version": spm.__version__, "lines": len(lines),
            "options": {k: v for k, v in SPM_OPTIONS.items() if k != "minloglevel"}}


def write_hf_tokenizer(spm_path: Path, out: Path) -> None:
    """tokenizer.json via transformers' SentencePiece extractor and LlamaTokenizer (no dummy
    prefix), a BOS-adding post-processor, and tokenizer_config / special_tokens_map by hand."""
    from tokenizers import processors
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(str(spm_path)).extract(BPE)
    tok = LlamaTokenizer(vocab=extracted["vocab"], merges=extracted["merges"], legacy=False,
                         add_prefix_space=False, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)])
    backend.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(out / "special_tokens_map.json", specials)
    write_json(out / "tokenizer_config.json", {
        **specials, "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
        "add_eos_token": False, "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False, "padding_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
    })


def verify_tokenizer(out: Path, val_docs: list[Doc]) -> dict:
    """tokenizers (tokenizer.json, with its post-processor) against SentencePiece with BOS."""
    import sentencepiece as spm
    from tokenizers import Tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    lines = [line for d in val_docs for line in d.text.split("\n")]
    cases = {"validation_lines": lines, "validation_files": [d.text for d in val_docs],
             "edge_cases": EDGE_CASES}
    record, examples = {}, []
    for name, texts in cases.items():
        got = [e.ids for e in hf.encode_batch(texts)]
        want = [[BOS_ID] + ids for ids in sp.encode(texts)]
        bad = [t for t, g, w in zip(texts, got, want) if g != w]
        record[name] = {"checked": len(texts), "mismatches": len(bad)}
        examples += [repr(t)[:200] for t in bad[:5]]
    decoded_ok = all(hf.decode(hf.encode(t).ids, skip_special_tokens=True) == t
                     for t in EDGE_CASES + [d.text for d in val_docs[:5]] if "\r" not in t)
    record["mismatch_examples"] = examples
    record["decode_roundtrip_ok"] = decoded_ok
    log(f"tokenizer check: {json.dumps(record)}")
    return record


def check_auto_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x):\n    return x").input_ids
    if ids[0] != BOS_ID or ids.count(BOS_ID) != 1:
        raise SystemExit(f"AutoTokenizer does not add BOS once: {ids}")


def encode_docs(spm_path: Path, docs: list[Doc]) -> list[list[int]]:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_path))
    return sp.encode([d.text for d in docs])


def training_stream(ids: list[list[int]]) -> torch.Tensor:
    """Files joined with EOS between (and after) them."""
    flat: list[int] = []
    for doc in ids:
        flat.extend(doc)
        flat.append(EOS_ID)
    return torch.tensor(flat, dtype=torch.long)


# --------------------------------------------------------------------------- model and training

def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)


def build_model(seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, do_sample=False)
    return model


def make_optimizer(model) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, steps: int) -> float:
    warmup = max(1, min(30, steps // 10))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return PEAK_LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def windows_to_batch(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `windows` is scored whole: input BOS + row[:-1], target row."""
    bos = torch.full((windows.shape[0], 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, windows[:, :-1]], dim=1), windows


def sample_batch(stream: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, stream.numel() - SEQ_LEN + 1, (BATCH,), generator=gen)
    return windows_to_batch(torch.stack([stream[s:s + SEQ_LEN] for s in starts.tolist()]))


def train(model, stream: torch.Tensor, steps: int, seed: int, max_seconds: float) -> dict:
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        x, y = sample_batch(stream, gen)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - t0
        if step == 9 and elapsed / 10 * steps > max_seconds:
            log(f"warning: {steps} steps will take about {elapsed / 10 * steps:.0f}s, over the "
                f"--max-seconds budget of {max_seconds:.0f}s (the run still stops by steps)")
        if step % 10 == 0 or step == steps - 1:
            tok_s = (step + 1) * BATCH * SEQ_LEN / elapsed
            log(f"step {step + 1}/{steps} loss {losses[-1]:.4f} lr {lr_at(step, steps):.2e} "
                f"{tok_s:.0f} tok/s {elapsed:.0f}s")
    wall = time.perf_counter() - t0
    return {"steps": steps, "batch_size": BATCH, "seq_len": SEQ_LEN,
            "tokens_seen": steps * BATCH * SEQ_LEN, "train_seconds": round(wall, 1),
            "final_train_loss": round(losses[-1], 4),
            "final_train_loss_mean_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "first_train_loss": round(losses[0], 4)}


@torch.no_grad()
def perplexity(model, ids: list[int], batch: int = 16) -> tuple[float, int]:
    """Non-overlapping SEQ_LEN-token windows, BOS prepended to each; every token scored once."""
    model.eval()
    full = len(ids) // SEQ_LEN * SEQ_LEN
    chunks = [torch.tensor(ids[:full], dtype=torch.long).view(-1, SEQ_LEN)]
    if full < len(ids):
        chunks.append(torch.tensor(ids[full:], dtype=torch.long).view(1, -1))
    nll, count = 0.0, 0
    for windows in chunks:
        for i in range(0, windows.shape[0], batch):
            x, y = windows_to_batch(windows[i:i + batch])
            logits = model(input_ids=x).logits.float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                   reduction="sum").item()
            count += y.numel()
    return math.exp(nll / count), count


def evaluate(out: Path, val_text: str, quick_text: str) -> dict:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM
    hf = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    full_ppl, full_n = perplexity(model, hf.encode(val_text, add_special_tokens=False).ids)
    quick_ids = hf.encode(quick_text, add_special_tokens=False).ids[:QUICK_VAL_TOKENS]
    quick_ppl, quick_n = perplexity(model, quick_ids)
    log(f"validation perplexity {full_ppl:.3f} ({full_n} tokens); first {quick_n} tokens of "
        f"validation.txt {quick_ppl:.3f}")
    return {"protocol": "saved fp16 weights run in fp32; text tokenized with tokenizer.json "
                        "without special tokens; non-overlapping 256-token windows (the last one "
                        "shorter), each fed as BOS + window[:-1] and scored on the whole window",
            "val_ppl": round(full_ppl, 4), "val_tokens": full_n,
            "val_ppl_first16k": round(quick_ppl, 4), "val_first16k_tokens": quick_n,
            "val_first16k_source": f"the first {QUICK_VAL_TOKENS} tokens of validation.txt"}


# --------------------------------------------------------------------------- output

def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8"))


def save_model(model, out: Path) -> None:
    model.half().save_pretrained(out, safe_serialization=True)


def publish(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames (the old directory is removed last)."""
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def library_versions() -> dict:
    import safetensors
    import tokenizers
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads()}


def build(tmp: Path, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    set_determinism(args.seed)
    corpus = load_corpus()
    log(f"corpus: {len(corpus.train)} training files, {len(corpus.val)} validation files "
        f"under {corpus.root}")
    val_text = "".join(d.text for d in corpus.val)
    val_excerpt, val_names = excerpt(corpus.val)
    cal_excerpt, cal_names = excerpt(corpus.train)
    write_text(tmp / "validation.txt", val_excerpt)
    write_text(tmp / "calibration.txt", cal_excerpt)

    tok_record = train_sentencepiece(corpus.train, tmp / "tokenizer.model")
    write_hf_tokenizer(tmp / "tokenizer.model", tmp)
    tok_record["check"] = verify_tokenizer(tmp, corpus.val)
    check_auto_tokenizer(tmp)

    stream = training_stream(encode_docs(tmp / "tokenizer.model", corpus.train))
    log(f"training stream: {stream.numel()} tokens")
    model = build_model(args.seed)
    log(f"model: {sum(p.numel() for p in model.parameters())} parameters")
    train_record = train(model, stream, args.steps, args.seed, args.max_seconds)
    save_model(model, tmp)
    eval_record = evaluate(tmp, val_text, val_excerpt)

    unexpected = sorted(set(os.listdir(tmp)) - set(OUTPUT_FILES))
    if unexpected:
        raise SystemExit(f"unexpected output files: {unexpected}")
    return {
        "command": f"python golden/make_stdlib_llama.py --out {args.out} --steps {args.steps} "
                   f"--seed {args.seed}",
        "seed": args.seed, "versions": library_versions(), "corpus": corpus_record(corpus),
        "training_stream_tokens": stream.numel(), "tokenizer": tok_record,
        "model": {k: v for k, v in MODEL_CONFIG.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "optimizer": {"name": "AdamW", "peak_lr": PEAK_LR, "warmup_steps": max(1, min(30, args.steps // 10)),
                      "schedule": f"linear warmup, cosine decay to {MIN_LR_FRACTION} x peak",
                      "betas": [0.9, 0.95], "weight_decay": WEIGHT_DECAY,
                      "weight_decay_on": "parameters with ndim >= 2", "grad_clip": 1.0},
        "training": train_record, "evaluation": eval_record,
        "excerpts": {"validation.txt": val_names, "calibration.txt": cal_names},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "sha256": {name: sha256_file(tmp / name) for name in OUTPUT_FILES},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="golden/stdlib-llama", help="output directory (replaced)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help=f"optimizer steps of {BATCH} x {SEQ_LEN} tokens (default {DEFAULT_STEPS})")
    ap.add_argument("--seed", type=int, default=0, help="init and batch-sampling seed (default 0)")
    ap.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                    help="training time budget: warns if --steps is projected to exceed it; the "
                         "run always stops by steps, so the result does not depend on it")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # so the temp dir is removed
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        record = build(tmp, args)
        write_json(tmp / "TRAINING.json", record)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {record['wall_seconds']}s: val ppl {record['evaluation']['val_ppl']}, "
        f"model.safetensors sha256 {record['sha256']['model.safetensors']}")


if __name__ == "__main__":
    main()
