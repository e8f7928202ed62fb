"""Data-pipeline speed: tokenisation throughput, block building, cold and warm stream builds.

    python benchmarks/data.py                      # the built-in stream and a temporary folder of text
    python benchmarks/data.py --folder data/manuals --json figures.json
    python benchmarks/data.py --tokenizer path/to/hf-tokenizer

Figures (best of ``--repeat`` runs where a run is short):

* tokeniser throughput in MB of UTF-8 text per second (``encode_with_bytes``, what the
  block builder calls), on real text: the Python standard library's sources;
* block building throughput: documents read, tokenised and packed into blocks for one
  local folder without cache, in MB/s of text and tokens/s;
* cold and warm builds of whole streams with ``build_benchmark``: cold = a fresh empty
  cache folder, warm = the same folder again. Avalanche is imported before timing
  (its import time is printed on its own); the operating system's file cache is not
  dropped, so "cold" means a cold block cache, not a cold disk.

Prints a table with the machine it ran on; ``--json PATH`` also writes every figure.
Nothing here is asserted: tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine  # noqa: E402
from scenarios import STATS, ByteTokenizer, DomainSpec, build_benchmark, get_tokenizer  # noqa: E402
from scenarios.blocks import build_domain_blocks  # noqa: E402
from scenarios.sources import PythonSource  # noqa: E402


def sample_docs(megabytes: float) -> list[str]:
    """About ``megabytes`` MB of real text: standard-library sources in a fixed order."""
    src = PythonSource("python")
    parts, size = [], 0
    for doc in src.documents(seed=0):
        text = doc.text()
        parts.append(text)
        size += len(text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    return parts


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def tokenizer_throughput(tok, docs: list[str], repeat: int) -> dict:
    nbytes = sum(len(d.encode("utf-8")) for d in docs)

    def run():
        return sum(len(tok.encode_with_bytes(d)[0]) for d in docs)

    seconds, ntokens = best_of(repeat, run)
    return {"tokenizer": getattr(tok, "name", repr(tok)), "mb": nbytes / 1e6, "seconds": seconds,
            "mb_per_s": nbytes / 1e6 / seconds, "tokens_per_s": ntokens / seconds}


def make_folder(root: Path, megabytes: float) -> Path:
    """A folder of .txt files (one per standard-library module) holding about ``megabytes`` MB."""
    folder = root / "text"
    folder.mkdir()
    src = PythonSource("python")
    size = 0
    for i, doc in enumerate(src.documents(seed=0)):
        text = doc.text()
        if not text.strip():
            continue
        (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        size += len(text.encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    return folder


def block_throughput(folder: Path, args, repeat: int) -> dict:
    spec = DomainSpec("folder", path=str(folder))
    tok = get_tokenizer(args.tokenizer)
    huge = 10**12  # no budget limit: every document is read and packed

    def run():
        return build_domain_blocks(spec, tok, block_len=args.block_len, train_tokens=huge, test_tokens=huge,
                                   test_fraction=0.1, seed=0, cache_dir=None, progress=False)

    seconds, blocks = best_of(repeat, run)
    tokens = blocks.train.num_blocks * args.block_len + blocks.test.num_blocks * args.block_len
    text_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    return {"folder": str(folder), "mb": text_mb, "seconds": seconds, "mb_per_s": text_mb / seconds,
            "tokens_per_s": tokens / seconds}


def cold_warm(spec, args, cache_root: Path, label: str) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=cache_root))
    kw = dict(block_len=args.block_len, train_tokens=args.train_tokens, test_tokens=args.test_tokens,
              tokenizer=args.tokenizer, cache_dir=cache, progress=False)
    out = {"stream": label}
    for phase in ("cold", "warm"):
        before = STATS["documents_tokenized"]
        t = time.perf_counter()
        bench = build_benchmark(spec, **kw)
        out[f"{phase}_s"] = time.perf_counter() - t
        out[f"{phase}_documents_tokenized"] = STATS["documents_tokenized"] - before
        out[f"{phase}_cached"] = all(i["cached"] for i in bench.domain_info)
    out["domains"] = bench.domains
    out["train_tokens"] = sum(i["train_tokens"] for i in bench.domain_info)
    out["test_tokens"] = sum(i["test_tokens"] for i in bench.domain_info)
    out["speedup"] = out["cold_s"] / out["warm_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Data-pipeline speed (prints a table).")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer")
    parser.add_argument("--block-len", type=int, default=128)
    parser.add_argument("--train-tokens", type=int, default=200_000, help="per domain (the builtin default)")
    parser.add_argument("--test-tokens", type=int, default=20_000, help="per domain (the builtin default)")
    parser.add_argument("--text-mb", type=float, default=8.0, help="MB of text for the throughput figures")
    parser.add_argument("--folder", action="append", default=[], metavar="DIR",
                        help="a local folder of text to build as a stream (repeatable); "
                             "default: a temporary folder of --text-mb MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    figures: dict = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    t = time.perf_counter()
    import avalanche.benchmarks  # noqa: F401  (timed on its own, not in the stream builds)
    figures["avalanche_import_s"] = time.perf_counter() - t

    docs = sample_docs(args.text_mb)  # whole documents, as the block builder sees them
    figures["tokenizer"] = [tokenizer_throughput(ByteTokenizer(), docs, args.repeat)]
    if args.tokenizer != "byte":
        figures["tokenizer"].append(tokenizer_throughput(get_tokenizer(args.tokenizer), docs, args.repeat))

    root = Path(tempfile.mkdtemp(prefix="lifelong-data-bench-"))
    try:
        folders = [Path(f) for f in args.folder] or [make_folder(root, args.text_mb)]
        figures["blocks"] = [block_throughput(f, args, args.repeat) for f in folders]
        figures["streams"] = [cold_warm("builtin", args, root, "builtin (4 domains)")]
        specs = [{"name": f"d{i}-{f.name}", "path": str(f)} for i, f in enumerate(folders)]
        figures["streams"].append(cold_warm(specs, args, root, f"local ({len(folders)} folder(s))"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    m = figures["machine"]
    print(f"machine: {m['cpus']} CPUs, {m['cpu']}, Python {m['python']}, torch {m['torch']}, "
          f"numpy {m['numpy']}, load average {m['load_average_1min']}")
    print(f"avalanche import: {figures['avalanche_import_s']:.1f} s (not included below)\n")
    print(f"{'tokeniser':<24}{'MB':>8}{'MB/s':>10}{'Mtok/s':>10}")
    for r in figures["tokenizer"]:
        print(f"{r['tokenizer'][:23]:<24}{r['mb']:>8.1f}{r['mb_per_s']:>10.1f}{r['tokens_per_s'] / 1e6:>10.2f}")
    print(f"\n{'block building (no cache)':<40}{'MB':>8}{'s':>8}{'MB/s':>8}{'Mtok/s':>8}")
    for r in figures["blocks"]:
        print(f"{Path(r['folder']).name[:39]:<40}{r['mb']:>8.1f}{r['seconds']:>8.3f}{r['mb_per_s']:>8.1f}"
              f"{r['tokens_per_s'] / 1e6:>8.2f}")
    print(f"\n{'stream build (train/test tokens)':<40}{'cold s':>8}{'warm s':>8}{'x':>8}  docs tokenised cold/warm")
    for r in figures["streams"]:
        label = f"{r['stream']} {r['train_tokens'] // 1000}k/{r['test_tokens'] // 1000}k"
        print(f"{label[:39]:<40}{r['cold_s']:>8.3f}{r['warm_s']:>8.3f}{r['speedup']:>8.1f}"
              f"  {r['cold_documents_tokenized']}/{r['warm_documents_tokenized']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
