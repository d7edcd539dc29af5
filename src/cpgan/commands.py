"""Sub-commands beyond the pipeline stages: generate, evaluate --run, import-official, serve, ablate."""
from __future__ import annotations

import sys
from pathlib import Path


def cmd_generate(args) -> int:
    from .sampling import CaptionError, Sampler, save_generation_grid

    captions = list(args.captions)
    if args.file:
        p = Path(args.file)
        if not p.exists():
            raise FileNotFoundError(f"caption file '{p}' not found")
        captions += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not captions:
        print("error: give at least one caption (or --file FILE with one caption per line)", file=sys.stderr)
        return 2
    sampler = Sampler.from_run(args.run, args.device)
    results, used = [], []
    for i, cap in enumerate(captions):
        try:
            res = sampler.generate(cap, n=args.n, seed=args.seed + i, truncation=args.truncation)
        except CaptionError as e:
            print(f"error: caption {i + 1} ({cap!r}): {e}", file=sys.stderr)
            return 2
        if res["unknown"]:
            print(f"caption {i + 1}: unknown words dropped: {', '.join(res['unknown'])}", file=sys.stderr)
        results.append(res)
        used.append(cap)
    out = save_generation_grid(results, used, Path(args.out), stages=args.stages, attention=args.attention)
    print(f"wrote {out} ({len(used)} caption(s) x {args.n} image(s))")
    return 0


def cmd_evaluate_run(args) -> int:


    from .config import load_config
    from .stages.base import resolve_device
    from .stages.evaluate import evaluate_run, format_table
    from .utils.checkpoint import atomic_write_json

    run = Path(args.run)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"'{run}' is not a run directory (no config.yaml)")
    cfg = load_config(str(run / "config.yaml"), args.overrides)
    device = resolve_device(args.device or cfg.device)
    res = evaluate_run(cfg, run, device, run / "evaluate", n_images=args.n, untrained=args.untrained)
    name = "metrics_untrained.json" if args.untrained else "metrics.json"
    atomic_write_json(run / "evaluate" / name, res)
    print(format_table(res))
    print(f"wrote {run / 'evaluate' / name}")
    return 0


def cmd_import_official(args) -> int:
    from .interop.official import cli_import_official

    return cli_import_official([*args.paths, "--out", args.out])


def register(sub) -> None:
    sp = sub.add_parser("generate", help="draw images for captions with a trained run",
                        description="Draw images for one or more captions with the generator of a trained run. "
                                    "Unknown words are reported and dropped; a caption without any known word is "
                                    "an error.")
    sp.add_argument("captions", nargs="*", help="caption(s) in quotes")
    sp.add_argument("--run", required=True, help="run directory (e.g. runs/demo)")
    sp.add_argument("--file", help="text file with one caption per line")
    sp.add_argument("--n", type=int, default=8, help="images per caption (default 8)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--truncation", type=float, default=1.0, help="truncated-normal noise bound (0 = none)")
    sp.add_argument("--stages", action="store_true", help="also show the lower-resolution stages")
    sp.add_argument("--attention", action="store_true", help="add per-word attention maps of the last stage")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--out", required=True, help="output PNG")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("import-official", help="convert the authors' released files to safetensors",
                        description="Read the CPGAN release (NET_T.pkl, Text_Encoder.pkl, NET_G.pkl, memoryft_*.pkl, "
                                    "transvob.pkl, vocab.pkl) or AttnGAN DAMSM .pth files with a restricted "
                                    "unpickler (nothing executable is loaded) and write safetensors + JSON sidecars.")
    sp.add_argument("paths", nargs="+", help="files or a folder of the release")
    sp.add_argument("--out", required=True, help="output folder")
    sp.set_defaults(func=cmd_import_official)

    from .serve.app import add_serve_command

    add_serve_command(sub)
    from .report import add_report_command

    add_report_command(sub)
    from .ablate import add_ablate_command

    add_ablate_command(sub)
