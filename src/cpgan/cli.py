"""``cpgan`` command line: run the pipeline, single stages, data generation, generation, evaluation.

Every command prints one line ``error: ...`` and exits with status 2 on a user error (bad config key,
missing file, wrong weights); set ``CPGAN_DEBUG=1`` to see the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__

EPILOG = """examples:
  cpgan demo                                   the whole chain on the shapes world, then a report
  cpgan run shapes-quick --out runs/q          every stage of a preset (finished stages are reused)
  cpgan run shapes-quick --out runs/q --set gan.batch_size=16 --stages damsm,gan
  cpgan damsm shapes-quick --out runs/q        one stage as its own command
  cpgan data shapes --out data/shapes --size 64 --n-train 8000 --n-test 1000 --seed 0
  cpgan config shapes-quick --set model.cond_disc=fgcd   print the resolved config
"""


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("config", nargs=None if config_required else "?",
                   help="preset name (see `cpgan presets`) or a YAML file")
    p.add_argument("--out", "-o", default=None, help="run directory (default: runs/<preset>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set gan.batch_size=8 (repeatable)")
    p.add_argument("--force", action="store_true", help="re-run even if the stage is up to date")


def _run_dir(args, cfg) -> Path:
    if args.out:
        return Path(args.out)
    name = Path(args.config).stem if args.config else cfg.name
    return Path("runs") / name


def _load(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


def cmd_run(args) -> int:
    from .stages.base import run_stages

    cfg = _load(args)
    only = [s.strip() for s in args.stages.split(",")] if args.stages else None
    run_dir = _run_dir(args, cfg)
    res = run_stages(cfg, run_dir, only=only, force=args.force)
    if int(os.environ.get("RANK", "0")) == 0:
        from .report import write_report
        from .utils.logging import echo

        echo(f"[cpgan] report: {write_report(run_dir).resolve()}")
    return 0 if all(r.get("status") != "interrupted" for r in res.values()) else 130


def cmd_stage(args) -> int:
    from .stages.base import run_stages

    cfg = _load(args)
    res = run_stages(cfg, _run_dir(args, cfg), only=[args.command], force=args.force, check_upstream=True)
    return 0 if all(r.get("status") != "interrupted" for r in res.values()) else 130


def cmd_evaluate(args) -> int:
    if args.run:
        from .commands import cmd_evaluate_run

        return cmd_evaluate_run(args)
    if not args.config:
        raise SystemExit("error: give --run RUN_DIR (a finished run) or a CONFIG and --out RUN_DIR")
    args.command = "evaluate"
    return cmd_stage(args)


def cmd_data(args) -> int:
    from .data import shapes

    if args.kind != "shapes":
        raise SystemExit("error: only `cpgan data shapes` generates data; other sources are indexed by the data stage")
    t0 = time.time()
    shapes.write_dataset(Path(args.out), size=args.size, n_train=args.n_train, n_test=args.n_test,
                         n_test_novel=args.n_test_novel, seed=args.seed, progress=True)
    print(f"wrote the shapes world ({args.n_train}/{args.n_test}/{args.n_test_novel} images at {args.size} px) "
          f"to {args.out} in {time.time() - t0:.1f} s")
    return 0


def cmd_config(args) -> int:
    from .config import dump_yaml, valid_keys

    if args.keys:
        print("\n".join(valid_keys()))
        return 0
    if not args.config:
        raise SystemExit("error: give a preset or YAML file (or --keys)")
    print(dump_yaml(_load(args)), end="")
    return 0


def cmd_presets(args) -> int:  # noqa: ARG001
    from .config import config_dir, list_presets

    for p in list_presets():
        first = (config_dir() / f"{p}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{p:16s} {first}")
    return 0


def _side_stage(run_dir: Path, name: str, threads: int):
    """Start ``cpgan run RUN_DIR/config.yaml --stages NAME`` as a child process with ``threads`` intra-op threads;
    its output goes to ``RUN_DIR/NAME.log``. Returns ``(process, log path)``."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = run_dir / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cpgan", "run", str(run_dir / "config.yaml"), "--out",
                                 str(run_dir), "--stages", name], stdout=f, stderr=subprocess.STDOUT, env=env)
    return proc, log


def cmd_demo(args) -> int:
    """The whole chain, then the report. With two or more CPU cores (and ``--sequential`` not given) the
    evaluator — which nothing but the GAN's curves and ``evaluate`` needs — trains in a second process, one core,
    while the detector → captioner → memory → DAMSM chain uses the others; the GAN then gets the threads back."""
    import os

    import torch

    from .config import load_config
    from .stages.base import PIPELINE, StageError, registry, run_stages, stage_hash, stage_status
    from .utils.logging import echo

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    stages = registry(include_missing=True)
    missing = [n for n, s in stages.items() if s is None]
    t0 = time.time()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    res: dict = {}
    side = None
    try:
        res.update(run_stages(cfg, out, only=["data", "vocab"]))
        if any(r.get("status") == "interrupted" for r in res.values()):
            return 130
        ev = registry().get("evaluator")
        done = stage_status(out, "evaluator")
        pending = (ev is not None and ev.needed(cfg)
                   and not (done and done.get("hash") == stage_hash(cfg, "evaluator", registry())))
        if pending and cores >= 2 and not args.sequential and cfg.device in ("auto", "cpu"):
            side, log = _side_stage(out, "evaluator", 1)
            echo(f"[cpgan] evaluator  training in a second process on one core (log: {log})")
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, min(threads, cores - 1)))
        main_chain = [n for n in PIPELINE if n not in ("data", "vocab", "gan", "evaluate")
                      and not (side and n == "evaluator")]
        res.update(run_stages(cfg, out, only=main_chain))
        if any(r.get("status") == "interrupted" for r in res.values()):
            return 130
        if side is not None:
            if side.poll() is None:
                echo("[cpgan] waiting for the evaluator process ...")
            rc = side.wait()
            side_res = stage_status(out, "evaluator")
            if rc != 0 or not side_res:
                raise StageError(f"the evaluator stage failed (exit {rc}); see {log}, or run "
                                 f"`cpgan demo --sequential` to run every stage in this process")
            res["evaluator"] = {"status": "done", "seconds": side_res.get("seconds")}
            echo(f"[cpgan] evaluator  done in {side_res.get('seconds', 0):.0f} s (second process)")
            side = None
            torch.set_num_threads(threads)  # back to what the user had (OMP_NUM_THREADS or torch's default)
        res.update(run_stages(cfg, out, only=["gan", "evaluate"]))
    finally:
        if side is not None and side.poll() is None:
            side.terminate()  # SIGTERM: the evaluator saves its checkpoint and exits
            side.wait()
    if any(r.get("status") == "interrupted" for r in res.values()):
        return 130
    from .report import write_report

    write_report(out)
    echo("")
    echo(f"[cpgan] demo run in {out} ({time.time() - t0:.0f} s this time)")
    for name in PIPELINE:
        r = res.get(name)
        if r is None:
            continue
        secs = r.get("seconds")
        echo(f"  {name:10s} {r.get('status', '?'):12s}" + (f" {secs:7.1f} s" if secs is not None else ""))
    if missing:
        echo(f"[cpgan] not implemented yet, so not run: {', '.join(missing)}")
    report = out / "report.html"
    if report.exists():
        echo(f"[cpgan] report: {report.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .stages.base import PIPELINE

    p = argparse.ArgumentParser(
        prog="cpgan", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="CPGAN (Content-Parsing GAN, arXiv 1912.08562): train every stage, sample, evaluate, serve.")
    p.add_argument("--version", action="version", version=f"cpgan {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("demo", help="run the whole chain on the shapes world (shapes-quick) and write a report")
    sp.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    sp.add_argument("--config", default="shapes-quick", help="preset or YAML (default: shapes-quick)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--sequential", action="store_true",
                    help="run every stage in this process (default: the evaluator trains in a second process "
                         "on one core when there are two or more)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("run", help="run the pipeline (or --stages a,b) for a config; finished stages are reused")
    _add_config_args(sp)
    sp.add_argument("--stages", default="", help=f"comma-separated subset of: {','.join(PIPELINE)}")
    sp.set_defaults(func=cmd_run)

    helps = {
        "data": "generate the shapes world / index a data set (`cpgan data shapes --out DIR ...` writes a "
                "shapes world to any folder; see `cpgan data shapes --help`)", "vocab": "build the vocabulary, cache caption ids",
        "evaluator": "train the shapes-world judge (semantic accuracy, FID/IS features)",
        "detector": "train/load the YOLOv3 detector and write region features",
        "captioner": "train the Bottom-Up/Top-Down captioner on region features",
        "memory": "build the word memory bank, eq. (7)", "damsm": "pretrain the DAMSM text/image encoders",
        "gan": "train the generator and discriminators", "evaluate": "compute every metric (and the real ceiling)",
    }
    for name in PIPELINE:
        if name == "evaluate":
            continue
        sp = sub.add_parser(name, help=f"stage: {helps[name]}")
        _add_config_args(sp)
        sp.set_defaults(func=cmd_stage)
    sp = sub.add_parser("evaluate", help="metrics of a run: `cpgan evaluate --run RUN_DIR [--n N]` (or as a stage: "
                        "`cpgan evaluate CONFIG --out RUN_DIR`)",
                        description="Generate images for test captions with the run's generator and compute "
                                    "R-precision (both protocols), SOA, colour/shape/background accuracy, FID and IS; "
                                    "the same metrics on the real test images are the ceiling. Writes "
                                    "RUN_DIR/evaluate/metrics.json and prints a table.")
    _add_config_args(sp, config_required=False)
    sp.add_argument("--run", help="evaluate this finished run directory (uses its config.yaml)")
    sp.add_argument("--n", type=int, default=None, help="captions per split (default: evaluate.n_images)")
    sp.add_argument("--untrained", action="store_true", help="score an untrained generator (the floor)")
    sp.add_argument("--device", default=None)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("config", help="print the resolved config of a preset (or --keys: every valid key)")
    sp.add_argument("config", nargs="?")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--keys", action="store_true", help="list every valid dotted key")
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("presets", help="list the presets in configs/")
    sp.set_defaults(func=cmd_presets)

    _add_optional_commands(sub)
    return p


def _add_optional_commands(sub) -> None:
    """Commands whose modules register themselves (generate, evaluate-run, import-official, serve, ablate)."""
    from importlib import import_module

    for mod in ("cpgan.commands",):
        try:
            m = import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        m.register(sub)


def _data_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cpgan data", description="generate the built-in shapes world on disk")
    p.add_argument("kind", choices=["shapes"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=64, choices=[64, 128, 256], help="image size in pixels")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-test-novel", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return cmd_data(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .config import ConfigError
    from .data.sources import DataSourceError
    from .stages.base import StageError

    errors: tuple = (ConfigError, StageError, DataSourceError, FileNotFoundError, PermissionError)
    try:
        if argv and argv[0] == "data" and len(argv) > 1 and argv[1] == "shapes":
            return _data_command(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except errors as e:
        if os.environ.get("CPGAN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
