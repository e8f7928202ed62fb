"""`lifelong run | grow | report | flops`: the command line.

Mistakes in what the user gave (config keys and values, presets, paths, data)
end with one line on stderr naming the problem and exit status 2; nothing
already written in a run directory is touched before the input is validated.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

# Nothing here imports torch at module level: the console script imports this module before
# main() runs, and an interrupt while torch loads must end as one line too.
from lifelong import rundir
from lifelong.presets import available_presets, resolve
from lifelong.errors import CheckpointError, ConfigError, TrainingDiverged

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like our own errors
        self.exit(EXIT_USAGE, f"lifelong: error: {message}\n")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
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
    run.add_argument("--seeds", metavar="S1,S2,...", help="one run per seed (in DIR/seed-S) and an aggregate "
                     "results.json with mean and standard deviation of every summary figure")
    run.add_argument("--resume", metavar="DIR",
                     help="continue an interrupted run from its newest complete checkpoint (its saved config); "
                     "a run stopped before its first checkpoint starts again")
    run.add_argument("--allow-changed-data", action="store_true",
                     help="with --resume: continue even if a domain's token blocks differ from the run's start")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    grow = sub.add_parser("grow", help="add experts to a saved checkpoint; continue it with run --resume")
    grow.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="a run directory (its newest checkpoint) "
                      "or one checkpoint folder")
    grow.add_argument("--experts", type=int, required=True, metavar="N",
                      help="experts added to each expert layer (PEER rounds up to whole grid rows)")
    grow.add_argument("--warmup-steps", type=int, default=100, metavar="W",
                      help="optimizer steps over which the new keys wake up (default 100)")
    grow.add_argument("--warmin", choices=("calibrated", "bound"), default="calibrated",
                      help="how new keys enter (default calibrated: from the score gaps of the next domain's queries)")
    grow.add_argument("--init", choices=("random", "copy", "kmeans", "contrast"), default="kmeans",
                      help="placement of new PEER sub-keys (default kmeans: centres of the next domain's queries)")
    grow.add_argument("--layer", action="append", metavar="NAME", help="only this layer, e.g. blocks.2.ffn")

    report = sub.add_parser("report", help="compare finished runs: one table, and their matrices side by side")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    report.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    report.add_argument("--png", metavar="FILE", help="also save the runs' bpb matrices side by side")
    report.add_argument("--frontier", metavar="FILE",
                        help="also save the runs on the forgetting-plasticity plane, with intervals")
    report.add_argument("--no-paired", action="store_true",
                        help="no paired differences against the first run (they need the same test blocks)")

    flops = sub.add_parser("flops", help="FLOPs and parameters per token of a configured model")
    _config_args(flops)
    return parser


def _out_dir(out: str | None, preset: str, overwrite: bool) -> tuple[Path, list[str]]:
    """The new run's directory and the entries of an old run there that it will replace (removed
    only when the new run is built and about to write, so a failed start loses nothing)."""
    path = Path(out) if out else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return path, rundir.check_out_dir(path, overwrite)
    except ConfigError as err:
        raise ConfigError(f"--out: {err}") from None


def _parse_seeds(text: str) -> list[int]:
    from lifelong.config import MAX_SEED

    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers, e.g. --seeds 0,1,2")
    if not all(0 <= seed <= MAX_SEED for seed in seeds):
        raise ConfigError(f"--seeds {text!r}: every seed must be in 0..{MAX_SEED}")
    return seeds


def _say(*args, **kwargs) -> None:
    """print, on rank 0 only under torchrun (every rank runs the same command)."""
    from lifelong import distributed

    if distributed.is_main():
        print(*args, **kwargs)


def cmd_run(args) -> int:
    from lifelong import distributed, experiment, results, seeds

    progress = False if args.no_progress else None
    if args.resume:
        given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config),
                                          ("--set", args.overrides), ("--out", args.out),
                                          ("--seeds", args.seeds)) if value]
        if given:
            raise ConfigError(f"--resume continues a run with its saved config; drop {', '.join(given)}")
        out = Path(args.resume)
        cfg = rundir.read_run_config(out)
        saved_seeds = seeds.read_seeds(out)
        distributed.init_from_env(cfg.train.device)
        _say(f"run directory: {out}")
        if saved_seeds is not None:
            res = seeds.run_seeds(cfg, saved_seeds, out, progress=progress, resuming=True, echo=_say,
                                  allow_changed_data=args.allow_changed_data)
        else:
            res = experiment.resume(out, progress=progress, echo=_say, allow_changed_data=args.allow_changed_data)
    else:
        if args.allow_changed_data:
            raise ConfigError("--allow-changed-data goes with --resume (a new run reads its data afresh)")
        cfg = resolve(args.preset or "builtin", args.config, args.overrides)
        seed_list = _parse_seeds(args.seeds) if args.seeds else None
        out, replace = _out_dir(args.out, args.preset or "builtin", args.overwrite)
        distributed.init_from_env(cfg.train.device)
        _say(f"run directory: {out}")
        if replace and not args.overwrite:
            _say(f"note: {out} held a start stopped before its first checkpoint ({', '.join(replace)}); "
                 "starting it again")
        if seed_list:
            res = seeds.run_seeds(cfg, seed_list, out, progress=progress, echo=_say, replace=replace)
        else:
            res = experiment.run(cfg, out, progress=progress, echo=_say, replace=replace)
    _say()
    _say(results.format_table(res))
    info = res["run_info"]
    _say(f"\nwall time {info['wall_time_s']:.0f} s (evaluation {info['eval_time_s']:.0f} s); "
         f"results in {out / rundir.RESULTS_FILE}")
    return 0


def cmd_grow(args) -> int:
    from lifelong import growth

    if args.experts < 1 or args.warmup_steps < 0:
        raise ConfigError("--experts must be >= 1 and --warmup-steps >= 0")
    new = growth.grow_checkpoint(args.path, args.experts, args.warmup_steps, args.init, args.layer,
                                 warmin=args.warmin)
    print(f"wrote {new}; continue with: lifelong run --resume {new.parent.parent}")
    return 0


def cmd_report(args) -> int:
    from lifelong.report import main_report

    try:
        print(main_report(args.runs, markdown=args.markdown, csv_path=args.csv, png_path=args.png,
                          pair=not args.no_paired, frontier_path=args.frontier))
    except ValueError as err:  # a path that is not a finished run
        raise ConfigError(str(err)) from None
    return 0


def cmd_flops(args) -> int:
    from lifelong.build import meta_model, stream_arguments
    from scenarios import get_tokenizer

    cfg = resolve(args.preset or "builtin", args.config, args.overrides)
    vocab = get_tokenizer(stream_arguments(cfg)["tokenizer"]).vocab_size
    model = meta_model(cfg, vocab)  # shapes only: any size is counted, nothing allocated
    flops, matmul = model.flops_per_token(), model.flops_per_token("matmul")
    stages = model.ffn_breakdowns()  # PEER's stages, printed under its layer
    width = max(len(k) for k in [*flops, *(f"  {p}" for parts in stages.values() for p in parts)]) + 2
    print(f"forward FLOPs per token (multiply-add = 2), context {cfg.stream.block_len}, vocab {vocab}")
    print(f"  {'':<{width}}{'all':>14}{'matmul only':>14}")
    for name, value in flops.items():
        print(f"  {name:<{width}}{value:>14,}{matmul[name]:>14,}")
        for part, n in stages.get(name, {}).items():
            print(f"    {part:<{width - 2}}{n:>14,}")
    print(f"  {'total':<{width}}{sum(flops.values()):>14,}{sum(matmul.values()):>14,}")
    print("  all: every operation, norms, activations and selection included (one FLOP per add, multiply, "
          "comparison or activation); matmul only: matrix products alone, as most scaling studies count; "
          "training = 3 x forward")
    params = model.param_counts()
    print(f"parameters: {params['total']:,} total, {params['active_per_token']:,} active per token "
          f"(FFNs: {params['ffn_total']:,} total, {params['ffn_active']:,} active)")
    print(f"experts: {model.num_experts():,}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _say(f"lifelong: warning: {message}", file=sys.stderr)


def _os_error(err: OSError) -> str:
    """An OSError as one line naming the path (a full disk, a read-only or vanished folder)."""
    return f"{err.filename}: {err.strerror or err}" if err.filename else str(err.strerror or err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the default display when main returns
        warnings.showwarning = _one_line_warning  # a warning is one line too, without the code line
        try:
            return _main(args)
        except KeyboardInterrupt:  # while torch and the data modules load, before _main's handlers
            print("lifelong: interrupted", file=sys.stderr)
            return 130


def _main(args) -> int:
    from scenarios import StreamError

    from lifelong import checkpoint, distributed

    try:
        handler = {"run": cmd_run, "grow": cmd_grow, "report": cmd_report, "flops": cmd_flops}[args.command]
        return handler(args)
    except (ConfigError, StreamError, CheckpointError) as err:
        _say(f"lifelong: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as err:
        kept = checkpoint.latest(err.run_dir) if getattr(err, "run_dir", None) else None
        where = f"; the last good checkpoint is {kept}" if kept else ""
        _say(f"lifelong: {err}{where}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as err:
        _say(f"lifelong: error: {_os_error(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("lifelong: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
