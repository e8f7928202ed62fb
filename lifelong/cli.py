"""`lifelong run | flops`: the command line.

Mistakes in what the user gave (config keys and values, presets, paths, data)
end with one line on stderr naming the problem and exit status 2; nothing
already written in a run directory is touched before the input is validated.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from lifelong.config import ConfigError, RunConfig, available_presets, resolve

EXIT_USAGE = 2
RUN_FILES = ("config.yaml", "results.json", "metrics.csv", "bpb_matrix.png", "tb")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like our own errors
        self.exit(EXIT_USAGE, f"lifelong: error: {message}\n")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="builtin",
                        help=f"base configuration (default: builtin; one of {', '.join(available_presets())})")
    parser.add_argument("--config", metavar="FILE", help="YAML file layered on top of the preset")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one setting, e.g. --set train.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lifelong", description="Continual learning of language models with PEER experts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train over a stream of domains and measure forgetting and transfer")
    _config_args(run)
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/PRESET-TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    flops = sub.add_parser("flops", help="FLOPs and parameters per token of a configured model")
    _config_args(flops)
    return parser


def _prepare_out_dir(out: str | None, preset: str, overwrite: bool) -> Path:
    path = Path(out) if out else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a directory")
    existing = [name for name in RUN_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"--out {path} already holds a run ({', '.join(existing)}); "
                          "choose another directory or pass --overwrite")
    for name in existing:  # only after validation, and only the files a run writes
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return path


def cmd_run(args, cfg: RunConfig) -> int:
    from lifelong import experiment, results

    out = _prepare_out_dir(args.out, args.preset, args.overwrite)
    print(f"run directory: {out}")
    res = experiment.run(cfg, out, progress=False if args.no_progress else None)
    print()
    print(results.format_table(res))
    print(f"\nwall time {res['wall_time_s']:.0f} s (evaluation {res['eval_time_s']:.0f} s); "
          f"results in {out / results.RESULTS_FILE}")
    return 0


def cmd_flops(args, cfg: RunConfig) -> int:
    from lifelong.model import LanguageModel

    vocab = 256 if cfg.stream.tokenizer == "byte" else None
    if vocab is None:
        from scenarios import load_tokenizer
        vocab = load_tokenizer(cfg.stream.tokenizer).vocab_size
    try:
        model = LanguageModel(cfg.model, vocab_size=vocab, context=cfg.stream.block_len)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    flops = model.flops_per_token()
    width = max(len(k) for k in flops) + 2
    print(f"forward FLOPs per token (multiply-add = 2), context {cfg.stream.block_len}, vocab {vocab}")
    for name, value in flops.items():
        print(f"  {name:<{width}}{value:>14,}")
    print(f"  {'total':<{width}}{sum(flops.values()):>14,}")
    params = model.param_counts()
    print(f"parameters: {params['total']:,} total, {params['active_per_token']:,} active per token "
          f"(FFNs: {params['ffn_total']:,} total, {params['ffn_active']:,} active)")
    print(f"experts: {model.num_experts():,}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from scenarios import StreamError

    try:
        cfg = resolve(args.preset, args.config, args.overrides)
        handler = {"run": cmd_run, "flops": cmd_flops}[args.command]
        return handler(args, cfg)
    except (ConfigError, StreamError) as err:
        print(f"lifelong: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lifelong: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
