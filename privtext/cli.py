"""The `privtext` command: a thin click layer over the library.

Each command parses options, calls the library and maps typed library errors to one-line messages
that name the fix (exit 1; exit 2 for usage mistakes). No traceback for user errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from privtext import __version__
from privtext.errors import PrivtextError, UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class _PipeClosed(Exception):
    """stdout's reader went away. Not an OSError, so click does not turn it into exit 1."""


def _embedding_options(f: Any) -> Any:
    options = [
        click.option("--embeddings", default="default", show_default=True,
                     help="GloVe/word2vec/fastText vector file, or 'default' (packaged GloVe 6B 50d)."),
        click.option("--embeddings-format", "embeddings_format", default="auto", show_default=True,
                     type=click.Choice(["auto", "glove", "word2vec", "word2vec-bin", "fasttext-vec", "kv"]),
                     help="Format of --embeddings ('kv' needs --trust-pickle)."),
        click.option("--vocab-size", type=click.IntRange(min=2), default=100_000, show_default=True,
                     help="Keep the N most frequent rows of the embedding file."),
        click.option("--neighbors", type=click.IntRange(min=2), default=64, show_default=True,
                     help="Width K of the exact neighbour table."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Index cache root (default: $PRIVTEXT_CACHE, else the user cache dir)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a gensim .kv file (a pickle: it can run code)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _open_index(embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
                cache_dir: Path | None, trust_pickle: bool, force: bool = False, quiet: bool = False):  # type: ignore[no-untyped-def]
    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index

    spec = IndexSpec(EmbeddingSource(embeddings, embeddings_format, trust_pickle), vocab_size, neighbors)
    result = ensure_index(spec, cache_dir, force=force, progress=False if quiet else None)
    if result.built and not quiet:
        click.echo(f"privtext: built index {result.index.path} in {result.seconds:.1f} s "
                   f"({result.reason})", err=True)
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="privtext")
def cli() -> None:
    """Anonymise text corpora with word-level differential privacy."""


@cli.command()
@_embedding_options
@click.option("--force", is_flag=True, help="Rebuild even if a valid cache exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def index(embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
          cache_dir: Path | None, trust_pickle: bool, force: bool, as_json: bool) -> None:
    """Load vectors, build and cache the FAISS index, neighbour table and geometry."""
    result = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                         trust_pickle, force=force, quiet=True)
    manifest = result.index.manifest
    if as_json:
        click.echo(json.dumps({"path": str(result.index.path), "built": result.built, **manifest}, indent=2))
        return
    geo = result.index.geometry
    clean = manifest["cleaning"]
    dropped = {k: v for k, v in clean.items() if k not in ("rows_read", "words_kept") and v}
    action = f"built in {result.seconds:.1f} s" if result.built else "reused (cache is current)"
    click.echo(f"index {action}: {result.index.path}")
    click.echo(f"  source     {manifest['source']['spec']} [{manifest['source']['format']}] "
               f"sha256 {manifest['source']['sha256'][:16]}…")
    click.echo(f"  vocabulary {geo.n} words × {geo.dim} dims from {clean['rows_read']} rows"
               + (f"; removed/merged: {', '.join(f'{k} {v}' for k, v in dropped.items())}" if dropped else ""))
    click.echo(f"  metric     {geo.metric}; neighbour table K = {geo.neighbors} (exact)")
    click.echo(f"  geometry   Δ_min = {geo.delta_min:.4f} (exact), Δ_max ≤ {geo.delta_max:.4f}, "
               f"median NN distance {geo.nn_distance_median:.3f}")


def _parse_param_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param expects KEY=VALUE, got {pair!r}")
        params[key.strip()] = value.strip()
    return params


def _load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML ({exc})") from None


# Options a config file may set; anything else in it is refused so typos do not pass silently.
_CONFIG_KEYS = {"mechanism", "epsilon", "params", "field", "oov", "mask_token", "on_error",
                "chunk_size", "workers", "embeddings", "embeddings_format", "vocab_size",
                "neighbors", "format"}


@cli.command()
@click.argument("inputs", nargs=-1, metavar="[INPUT ...]")
@click.option("-o", "--output", default="-", show_default=True, help="Output path, or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet", "text"]), default=None,
              help="Corpus format (inferred from the extension; required for stdin).")
@click.option("--field", default="text", show_default=True,
              help="Field to perturb (dotted path for nested JSON; a column for Parquet).")
@click.option("--mechanism", default="gumbel", show_default=True, help="See: privtext mechanisms.")
@click.option("--epsilon", type=float, default=None, help="Privacy parameter ε of the mechanism.")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Mechanism parameter (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file with mechanism, epsilon, [params] and other options; flags override it.")
@_embedding_options
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: number of cores).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Records per chunk (use 1 to stream a pipe line by line).")
@click.option("--seed", default=None, help="Reproducible run (voids privacy if the seed is known).")
@click.option("--oov", type=click.Choice(["mask", "drop", "keep"]), default="mask", show_default=True,
              help="Out-of-vocabulary words: mask them, drop them, or keep them (unprotected).")
@click.option("--mask-token", default="[OOV]", show_default=True, help="Placeholder for --oov mask.")
@click.option("--on-error", type=click.Choice(["fail", "skip", "keep"]), default="fail", show_default=True,
              help="Unreadable record: stop, drop it, or copy it unchanged.")
@click.option("--report", "report_path", default=None, help="Write the JSON epsilon report here.")
@click.option("-q", "--quiet", is_flag=True, help="No summary or progress on stderr.")
@click.pass_context
def perturb(ctx: click.Context, inputs: tuple[str, ...], output: str, fmt: str | None, field: str,
            mechanism: str, epsilon: float | None, param_pairs: tuple[str, ...], config_path: Path | None,
            embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
            cache_dir: Path | None, trust_pickle: bool, workers: int | None, chunk_size: int,
            seed: str | None, oov: str, mask_token: str, on_error: str, report_path: str | None,
            quiet: bool) -> None:
    """Perturb the text of a JSONL, Parquet or text corpus and write an epsilon report."""
    from privtext import report as report_mod
    from privtext.pipeline import PerturbSettings, default_workers, run_perturb

    config = _load_config(config_path)
    unknown = set(config) - _CONFIG_KEYS
    if unknown:
        raise UsageError(f"unknown key(s) in {config_path}: {', '.join(sorted(unknown))}; "
                         f"valid keys: {', '.join(sorted(_CONFIG_KEYS))}")

    def pick(name: str, value: Any) -> Any:
        """A flag given on the command line wins over the config file, which wins over defaults."""
        source = ctx.get_parameter_source(name)
        if source is click.core.ParameterSource.DEFAULT and name in config:
            return config[name]
        return value

    params = {str(k): v for k, v in config.get("params", {}).items()}
    params.update(_parse_param_pairs(param_pairs))
    epsilon = pick("epsilon", epsilon)
    if epsilon is None:
        raise UsageError("--epsilon is required (or set epsilon in --config); see privtext mechanisms")
    settings = PerturbSettings(
        mechanism=pick("mechanism", mechanism),
        epsilon=float(epsilon),
        params=params,
        field=pick("field", field),
        oov=pick("oov", oov),
        mask_token=pick("mask_token", mask_token),
        on_error=pick("on_error", on_error),
        chunk_size=int(pick("chunk_size", chunk_size)),
        workers=int(pick("workers", workers) or default_workers()),
        seed=seed,
    )
    settings.validate()
    from privtext.mechanisms import get

    get(settings.mechanism)  # fail on an unknown name before any index work
    if settings.oov == "keep" and not quiet:
        click.echo("privtext: WARNING: --oov keep passes out-of-vocabulary words through "
                   "unperturbed; they are not protected", err=True)
    result = _open_index(pick("embeddings", embeddings), pick("embeddings_format", embeddings_format),
                         int(pick("vocab_size", vocab_size)), int(pick("neighbors", neighbors)),
                         cache_dir, trust_pickle, quiet=quiet)
    try:
        outcome = run_perturb(list(inputs) or ["-"], output, settings, result.index,
                              fmt=pick("format", fmt), progress=False if quiet else None)
    except BrokenPipeError:
        raise _PipeClosed() from None
    report = report_mod.build_report(outcome)
    if report_path:
        from privtext.io import write_text_atomic

        write_text_atomic(report_path, report_mod.to_json(report))
    if not quiet:
        click.echo(report_mod.summary(report), err=True, nl=False)


@cli.command("mechanisms")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable listing.")
def mechanisms_cmd(as_json: bool) -> None:
    """List the registered mechanisms, their parameters, defaults and guarantees."""
    from privtext.mechanisms import available
    from privtext.mechanisms.base import describe_range

    listing = []
    for name, cls in available().items():
        params = [
            {"name": f.name, "default": f.default, "range": describe_range(f), "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls.Params)
        ]
        listing.append({"name": name, "summary": cls.summary, "reference": cls.reference,
                        "guarantee": cls.guarantee_summary, "params": params})
    if as_json:
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    for entry in listing:
        click.echo(f"{entry['name']}: {entry['summary']}")
        click.echo(f"    reference: {entry['reference']}")
        click.echo(f"    guarantee: {entry['guarantee']}")
        for p in entry["params"]:
            click.echo(f"    --param {p['name']}={p['default']}  [{p['range']}]  {p['help']}")
        click.echo("")


def main() -> None:
    """Entry point: runs the CLI, turns library errors into one line, ends quietly on a closed pipe."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except PrivtextError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted; no partial output file was left.", err=True)
        sys.exit(130)
    except (_PipeClosed, BrokenPipeError):
        # The reader went away (`| head`): stop quietly; point stdout at devnull so the
        # interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
