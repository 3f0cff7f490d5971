"""Write every data owner's file for a compose demo: the partitions that `fedsvd run` simulates for a config.

    .venv/bin/python docker/make-owner-data.py configs/deploy.toml docker/data

writes docker/data/owner-<i>/train.csv, which is client i-1's whole partition of the config's dataset (the
server keeps evaluating on the held-out split, which no owner file contains). A deployment then trains on
exactly the data a simulation of the same config would. Real data owners skip this and bring their own files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from fedsvd.config import ConfigError, load_config
from fedsvd.data import DataError, TextDataset
from fedsvd.federation import Split, federation_data


def write_owner_file(data: TextDataset, path: Path) -> None:
    """One CSV in the layout `fedsvd.data.load_texts` reads: text (or text_a, text_b) and an integer label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [("text", data.texts)] if data.texts_b is None else [("text_a", data.texts), ("text_b", data.texts_b)]
    columns.append(("label", data.labels))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(name for name, _ in columns)
        writer.writerows(zip(*(values for _, values in columns), strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run config the deployment will be submitted with")
    parser.add_argument("out_dir", type=Path, help="where owner-<i>/train.csv go (docker/data for compose)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        # Whole partitions: with local_eval_fraction > 0 every client splits its own file the same way itself.
        data = federation_data(dataclasses.replace(Split.of(cfg), local_eval_fraction=0.0))
    except (ConfigError, DataError) as err:
        print(f"make-owner-data: error: {err}", file=sys.stderr)
        return 2
    for owner, partition in enumerate(data.partitions, start=1):
        path = args.out_dir / f"owner-{owner}" / "train.csv"
        write_owner_file(partition, path)
        print(f"{path}: {len(partition)} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
