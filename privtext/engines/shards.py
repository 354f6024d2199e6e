"""`privtext perturb SHARDS... -o OUT_DIR --engine spark|ray`: a directory of shards through an engine.

The engine reads the JSONL or Parquet shards with its own reader and writes OUT_DIR with its own
writer (part files named by the engine, not mirrored shard names): this is what runs unchanged on
a cluster, reading from and writing to object storage. The local engine (the default) is the
byte-faithful path: it keeps each JSONL record's bytes apart from the perturbed value and mirrors
shard names. Engine JSONL output is re-serialised by the engine (key order and number formatting
may change; Spark infers one schema over all shards, Ray's reader fixes it from the first block).
"""

from __future__ import annotations

import glob
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtext.errors import UsageError

if TYPE_CHECKING:
    from privtext.api import Anonymizer

ENGINES = ("spark", "ray")
_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def _shard_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.startswith((".", "_")):  # _SUCCESS, .crc and other engine markers
        return None
    if name.endswith(".zst"):
        raise UsageError(f"{path.name}: the engines cannot read .zst; recompress the shards with gzip "
                         "or use the local engine")
    if name.endswith(".gz"):
        name = name[:-3]
    return _SUFFIXES.get(Path(name).suffix)


def list_shards(inputs: list[str], fmt: str | None = None) -> tuple[list[str], str]:
    """Input files (directories searched recursively, globs expanded) and their one format."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and _shard_format(p))
        elif path.is_file():
            files.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise UsageError(f"input not found: {item}; give shard files, a directory or a glob")
            files += matches
    if not files:
        raise UsageError(f"no .jsonl, .json or .parquet shards under {', '.join(inputs)}")
    formats = {fmt or _shard_format(f) for f in files}
    if None in formats:
        raise UsageError("cannot infer the format of every shard from its extension; pass --format")
    if len(formats) != 1:
        raise UsageError("all shards must have the same format; perturb JSONL and Parquet separately")
    found = formats.pop()
    if found not in ("jsonl", "parquet"):
        raise UsageError("--engine spark|ray reads jsonl or parquet shards; use --engine local for text")
    return [str(f) for f in files], str(found)


def _check_output(output: str, inputs: list[str]) -> None:
    out = Path(output)
    if output == "-" or not output:
        raise UsageError("--engine spark|ray writes a directory: pass -o OUT_DIR")
    if out.exists():
        raise UsageError(f"output directory {output} already exists; pass a new -o directory "
                         "(the engine writes part files into it)")
    resolved = out.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source.is_dir() and (resolved == source or source in resolved.parents):
            raise UsageError(f"-o {output} is inside the input directory {item}; write elsewhere")


def validate(engine: str, inputs: list[str], output: str, field: str = "text",
             fmt: str | None = None) -> tuple[list[str], str]:
    """Everything checkable before the index is built or the engine started: the engine is one we
    know and is installed, the shards exist in one format, the output directory is new."""
    if engine not in ENGINES:
        raise UsageError(f"--engine must be local, spark or ray, got {engine!r}")
    from privtext.engines import require

    require("pyspark" if engine == "spark" else "ray", engine)
    if "." in field:
        raise UsageError("--engine spark|ray perturbs a top-level field; flatten the records or use "
                         "--engine local for a dotted --field")
    files, found = list_shards(inputs, fmt)
    _check_output(output, inputs)
    return files, found


def run_shards(engine: str, inputs: list[str], output: str, anonymizer: Anonymizer, field: str = "text",
               fmt: str | None = None, address: str | None = None, cores: int = 2) -> dict[str, Any]:
    """Perturb the shards with Spark or Ray and write OUT_DIR; returns the epsilon report.

    With an address (a cluster), the index cache is shipped by the engine; in local mode executors
    read it where it is.
    """
    files, found = validate(engine, inputs, output, field, fmt)
    ship = bool(address)
    start = time.perf_counter()
    if engine == "spark":
        from privtext.engines import spark as spark_engine

        session = spark_engine.session(address, cores)
        reader = session.read
        # FAILFAST: a malformed JSON line stops the job instead of becoming a silent null row
        df = reader.parquet(*files) if found == "parquet" else reader.option("mode", "FAILFAST").json(files)
        out, report = spark_engine.perturb_dataframe(df, field, anonymizer, ship_index=ship)
        if found == "parquet":
            out.write.parquet(output)
        else:
            out.write.option("ignoreNullFields", "false").json(output)
        out.unpersist()
    else:
        from privtext.engines import ray as ray_engine

        ray = ray_engine.init(address, cores)
        from pyarrow.fs import LocalFileSystem

        # the shards were listed on this machine's filesystem: say so instead of letting Ray guess
        local = LocalFileSystem()
        ds = (ray.data.read_parquet(files, filesystem=local, override_num_blocks=len(files)) if found == "parquet"
              else ray.data.read_json(files, filesystem=local, override_num_blocks=len(files)))
        out, report = ray_engine.perturb_dataset(ds, field, anonymizer, ship_index=ship)
        if found == "parquet":
            out.write_parquet(output)
        else:
            out.write_json(output)
    report["input"].update({
        "format": found,
        "shards": len(files),
        "field": field,
        "output": f"{engine} writer: part files in the output directory",
        "seconds_with_read_and_write": round(time.perf_counter() - start, 3),
    })
    return report
