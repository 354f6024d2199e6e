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

from privtext.errors import Interrupted, PrivtextError, UsageError


class _PipeClosed(Exception):
    """stdout's reader went away. Not an OSError, so click does not turn it into exit 1."""


def _embedding_options(f: Any, format_flags: tuple[str, ...] = ("--embeddings-format",)) -> Any:
    options = [
        click.option("--embeddings", default="default", show_default=True,
                     help="GloVe/word2vec/fastText vector file, or 'default' (packaged GloVe 6B 50d)."),
        click.option(*format_flags, "embeddings_format", default="auto", show_default=True,
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


def _likely_several_chunks(inputs: tuple[str, ...]) -> bool:
    """Whether the run will want a worker pool: more than one input, a directory, a glob, or a
    file larger than one chunk. Only a guess to start the pool early (stdin: no)."""
    from privtext.settings import CHUNK_BYTES

    if len(inputs) != 1:
        return len(inputs) > 1
    try:
        return os.path.isdir(inputs[0]) or os.path.getsize(inputs[0]) > CHUNK_BYTES
    except OSError:
        return any(c in inputs[0] for c in "*?[")  # a glob of shards, or missing: said later


def _open_index(embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
                cache_dir: Path | None, trust_pickle: bool, force: bool = False, quiet: bool = False,
                announce: bool = True):  # type: ignore[no-untyped-def]
    from privtext.embeddings import EmbeddingSource
    from privtext.index import IndexSpec, ensure_index

    spec = IndexSpec(EmbeddingSource(embeddings, embeddings_format, trust_pickle), vocab_size, neighbors)
    result = ensure_index(spec, cache_dir, force=force, progress=False if quiet else None)
    if result.built and announce and not quiet:
        click.echo(f"privtext: built index {result.index.path} in {result.seconds:.1f} s "
                   f"({result.reason})", err=True)
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="privtext", prog_name="privtext")
def cli() -> None:
    """Anonymise text corpora with word-level differential privacy."""


@cli.command()
# `privtext index --format` names the embedding format (there is no corpus here to confuse it with)
@lambda f: _embedding_options(f, ("--format", "--embeddings-format"))
@click.option("--force", is_flag=True, help="Rebuild even if a valid cache exists.")
@click.option("--verify", is_flag=True,
              help="Check every byte of the existing cache (sha256 of each file, the whole "
                   "neighbour table, derived files); builds nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def index(embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
          cache_dir: Path | None, trust_pickle: bool, force: bool, verify: bool, as_json: bool) -> None:
    """Load vectors, build and cache the FAISS index, neighbour table and geometry."""
    if verify:
        if force:
            raise click.UsageError("--verify checks the existing cache; drop --force")
        _verify_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir, trust_pickle, as_json)
        return
    result = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                         trust_pickle, force=force, announce=False)
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


def _verify_index(embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
                  cache_dir: Path | None, trust_pickle: bool, as_json: bool) -> None:
    from privtext.embeddings import EmbeddingSource
    from privtext.errors import IndexCacheError
    from privtext.index import EmbeddingIndex, IndexSpec, default_cache_root, read_pointer

    spec = IndexSpec(EmbeddingSource(embeddings, embeddings_format, trust_pickle), vocab_size, neighbors)
    slot = (cache_dir if cache_dir is not None else default_cache_root()) / spec.key()
    if read_pointer(slot) is None:
        raise IndexCacheError(f"no index cache at {slot} to verify; build it with: privtext index")
    checked = EmbeddingIndex(slot).verify()
    if as_json:
        click.echo(json.dumps({"verified": True, **checked}, indent=2))
        return
    click.echo(f"index verified: {checked['path']}")
    click.echo(f"  sha256 of {len(checked['files'])} files and {len(checked['derived'])} derived files match; "
               f"neighbour table of {checked['rows']} rows well formed")


def _parse_param_pairs(pairs: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param expects KEY=VALUE, got {pair!r}")
        params[key.strip()] = value.strip()
    return params


# The perturb options that a --config file may also set: given on the command line, a flag wins.
_SETTING_OPTIONS = ("mechanism", "epsilon", "field", "oov", "mask_token", "on_error", "chunk_size",
                    "workers", "embeddings", "embeddings_format", "vocab_size", "neighbors",
                    "max_rows_per_file")


@cli.command()
@click.argument("inputs", nargs=-1, metavar="[INPUT ...]")
@click.option("-o", "--output", default="-", show_default=True,
              help="Output path, or - for stdout. A symlink is written through; a pipe or device "
                   "is streamed into; a regular file is replaced atomically.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet", "text"]), default=None,
              help="Corpus format (inferred from the extension; required for stdin).")
@click.option("--field", default="text", show_default=True,
              help="Field to perturb (dotted path for nested JSON; a column for Parquet).")
@click.option("--mechanism", default="gumbel", show_default=True, help="See: privtext mechanisms.")
@click.option("--epsilon", default=None, help="Privacy parameter ε of the mechanism.")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Mechanism parameter (repeatable).")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML file with mechanism, epsilon, [params] and other options; flags override it.")
@click.option("--search", type=click.Choice(["exact", "hnsw"]), default=None,
              help="Nearest-word search of laplace, mahalanobis and vickrey (same as --param "
                   "search=...): exact (default) or hnsw (approximate, faster; same guarantee; "
                   "the report gives its measured recall@1).")
@_embedding_options
@click.option("--workers", type=click.IntRange(min=0), default=0,
              help="Worker processes (0, the default: one per core).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Records per chunk (use 1 to stream a pipe line by line).")
@click.option("--seed", default=None, help="Reproducible run (voids privacy if the seed is known).")
@click.option("--oov", type=click.Choice(["mask", "drop", "keep"]), default="mask", show_default=True,
              help="Out-of-vocabulary words: mask them, drop them, or keep them (unprotected).")
@click.option("--mask-token", default="[OOV]", show_default=True, help="Placeholder for --oov mask.")
@click.option("--on-error", type=click.Choice(["fail", "skip", "keep"]), default="fail", show_default=True,
              help="Unreadable record: stop, drop it, or copy it unchanged.")
@click.option("--report", "report_path", default=None, help="Write the JSON epsilon report here.")
@click.option("--resume", is_flag=True,
              help="Continue a killed or failed run of the same command from its last committed "
                   "chunk (and keep the finished part if this run fails too).")
@click.option("--max-rows-per-file", type=click.IntRange(min=1), default=None, metavar="N",
              help="Parquet output: write files of at most N rows (OUT-00000.parquet, ...).")
@click.option("--risk/--no-risk", "with_risk", default=True, show_default=True,
              help="Put the attack-success figure in the report (computed once per index, "
                   "mechanism, ε and params, then cached with the index).")
@click.option("-q", "--quiet", is_flag=True, help="No summary or progress on stderr.")
@click.option("--engine", type=click.Choice(["local", "spark", "ray"]), default="local", show_default=True,
              help="local: this machine's worker pool. spark|ray: read JSONL/Parquet shards (files, "
                   "directories, globs) with the engine and write part files to -o OUT_DIR "
                   "(needs privtext[spark] or privtext[ray]; see docs/engines.md).")
@click.option("--engine-address", default=None, metavar="URL",
              help="Cluster for --engine spark|ray (spark://…, ray://… or auto); the index is then "
                   "shipped by the engine. Default: local mode on --workers cores.")
@click.pass_context
def perturb(ctx: click.Context, inputs: tuple[str, ...], output: str, fmt: str | None, field: str,
            mechanism: str, epsilon: str | None, param_pairs: tuple[str, ...], config_path: Path | None,
            search: str | None, embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
            cache_dir: Path | None, trust_pickle: bool, workers: int, chunk_size: int,
            seed: str | None, oov: str, mask_token: str, on_error: str, report_path: str | None,
            resume: bool, max_rows_per_file: int | None, with_risk: bool, quiet: bool, engine: str,
            engine_address: str | None) -> None:
    """Perturb the text of a JSONL, Parquet or text corpus and write an epsilon report.

    INPUT may be a directory or a quoted glob of shards ('data/*.jsonl.gz'): then -o names a
    directory and each input shard gets an output shard with the same relative name."""
    if engine == "local" and workers != 1 and _likely_several_chunks(inputs):
        # The fork server imports numpy, FAISS and privtext (~0.2 s) on the other core while
        # this process does its own imports and opens the index; the exact check comes later.
        from privtext.run.executor import mp_context

        mp_context()
    from privtext import report as report_mod
    from privtext.mechanisms import get
    from privtext.run.executor import mp_context, signals_as_interrupts
    from privtext.run.outputs import refuse_inputs, resolve_output, write_text_atomic
    from privtext.run.perturb import execute, plan_run, single_chunk
    from privtext.run.shards import check_out_dir, find_shards, is_sharded, run_shards
    from privtext.settings import PerturbSettings, load_config

    given = dict(ctx.params, format=fmt)
    flags: dict[str, Any] = {
        name: given[name] for name in (*_SETTING_OPTIONS, "format")
        if ctx.get_parameter_source("fmt" if name == "format" else name)
        is not click.core.ParameterSource.DEFAULT
    }
    flags["params"] = _parse_param_pairs(param_pairs)
    if search is not None:
        flags["params"]["search"] = search
    flags["seed"] = seed
    settings = PerturbSettings.from_sources(load_config(config_path), flags,
                                            config_name=str(config_path))
    mech_cls = get(settings.mechanism)  # fail on an unknown name before any index work
    if search is not None and "search" not in {f.name for f in dataclasses.fields(mech_cls.Params)}:
        raise UsageError(f"--search applies only to laplace, mahalanobis and vickrey, not to "
                         f"{settings.mechanism}; leave it out")
    if settings.oov.value == "keep" and not quiet:
        click.echo("privtext: WARNING: --oov keep passes out-of-vocabulary words through "
                   "unperturbed; they are not protected", err=True)
    note = None if quiet else (lambda msg: click.echo(f"privtext: {msg}", err=True))
    fmt_name = settings.format.value if settings.format is not None else None
    if engine != "local":
        from privtext.engines.shards import validate

        validate(engine, list(inputs), output, settings.field, fmt_name)
        if settings.on_error.value != "fail":
            raise UsageError("--on-error skip|keep works with --engine local only; the engines stop "
                             "on a malformed record")
        if resume:
            raise UsageError("--resume works with --engine local only; rerun the engine job instead")
    else:
        sharded = is_sharded(list(inputs))
        if sharded:
            shards = find_shards(list(inputs), settings)  # no shard found: fail before the index
            check_out_dir(output, shards)
            if report_path:
                refuse_inputs(resolve_output(report_path, "report"), [str(s.source) for s in shards],
                              "report")
        else:
            plan = plan_run(list(inputs), output, settings, report=report_path, resume=resume)
        if settings.effective_workers() > 1 and (sharded or not single_chunk(plan)):
            # The fork server preloads numpy, FAISS and privtext while this process opens the index.
            mp_context()
    with signals_as_interrupts():
        result = _open_index(settings.embeddings, settings.embeddings_format, settings.vocab_size,
                             settings.neighbors, cache_dir, trust_pickle, quiet=quiet)
        if engine != "local":
            from privtext.api import Anonymizer
            from privtext.engines.shards import run_shards as run_engine_shards

            anon = Anonymizer(settings.mechanism, epsilon=settings.epsilon, params=settings.params,
                              oov=settings.oov.value, mask_token=settings.mask_token, seed=seed,
                              index=result.index)
            report = run_engine_shards(engine, list(inputs), output, anon, settings.field, fmt_name,
                                       engine_address, settings.effective_workers())
            report["attack_success"] = (report_mod.attack_success_section(anon.mechanism) if with_risk
                                        else {"skipped": "left out with --no-risk; privtext risk computes it"})
            if report_path:
                write_text_atomic(report_path, report_mod.to_json(report), list(inputs), "report")
            if not quiet:
                click.echo(report_mod.summary(report), err=True, nl=False)
            return
        try:
            if sharded:
                outcome = run_shards(list(inputs), output, settings, result.index, resume=resume,
                                     progress=False if quiet else None, notify=note)
            else:
                outcome = execute(plan, result.index, progress=False if quiet else None, notify=note)
        except BrokenPipeError:
            raise _PipeClosed() from None
    report = report_mod.build_report(outcome, risk=with_risk, notify=note)
    if report_path:
        write_text_atomic(report_path, report_mod.to_json(report), list(inputs), "report")
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
    """Entry point: runs the CLI, turns every failure a user can meet into one line and an exit
    code (1 data/environment, 2 usage, 128+N for signal N), ends quietly on a closed pipe.
    `--debug` (or PRIVTEXT_DEBUG=1) shows the traceback instead."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("PRIVTEXT_DEBUG") == "1"
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as exc:
        # click turns KeyboardInterrupt (and so our Interrupted) into Abort; keep the signal's code
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, Interrupted):
            name = {2: "Interrupted", 15: "Terminated", 1: "Hung up"}.get(cause.signum, "Stopped")
            click.echo(f"{name}; nothing was published.", err=True)
            sys.exit(cause.exit_code)
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UsageError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except PrivtextError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except Interrupted as exc:
        name = {2: "Interrupted", 15: "Terminated", 1: "Hung up"}.get(exc.signum, "Stopped")
        click.echo(f"{name}; nothing was published.", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted; no partial output file was left.", err=True)
        sys.exit(130)
    except (_PipeClosed, BrokenPipeError):
        # The reader went away (`| head`): stop quietly; point stdout at devnull so the
        # interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except MemoryError:
        if debug:
            raise
        click.echo("Error: out of memory; rerun with fewer --workers or a smaller --chunk-size "
                   "(add --resume to continue)", err=True)
        sys.exit(1)
    except OSError as exc:
        if debug:
            raise
        from privtext.run.outputs import describe_os_error

        where = f" ({exc.filename})" if exc.filename else ""
        click.echo(f"Error{where}: {describe_os_error(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}); rerun with --debug for the "
                   "traceback and report it", err=True)
        sys.exit(1)


# --- choosing ε by measured privacy and utility: stats, calibrate, evaluate ------------------


def _float_list(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated numbers such as 1,5,10") from None
    if not values:
        raise UsageError(f"{option} expects at least one number")
    return values


def _write_or_echo(path: str | None, text: str) -> None:
    if path is None:
        return
    from privtext.run.outputs import write_text_atomic

    write_text_atomic(path, text)


@cli.command("stats")
@click.option("--mechanism", required=True, help="See: privtext mechanisms.")
@click.option("--epsilon", "epsilons", required=True, metavar="E1,E2,...", help="ε values to measure.")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Mechanism parameter (repeatable).")
@_embedding_options
@click.option("--sample", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Vocabulary words sampled (stratified by frequency-rank decade).")
@click.option("--draws", type=click.IntRange(min=1), default=100, show_default=True,
              help="Draws R per sampled word.")
@click.option("--seed", default=None, help="Reproducible sample and draws (default: OS entropy).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--csv", "csv_path", default=None, help="Write tidy CSV rows here.")
@click.option("--plot", "plot_path", default=None, help="Write a PNG plot here (needs privtext[plot]).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def stats_cmd(mechanism: str, epsilons: str, param_pairs: tuple[str, ...], embeddings: str,
              embeddings_format: str, vocab_size: int, neighbors: int, cache_dir: Path | None,
              trust_pickle: bool, sample: int, draws: int, seed: str | None, as_json: bool,
              csv_path: str | None, plot_path: str | None, quiet: bool) -> None:
    """Plausible deniability per ε: N_w (share unchanged) and S_w (distinct outputs)."""
    from privtext.analysis import stats
    from privtext.mechanisms import get

    values = _float_list(epsilons, "--epsilon")
    get(mechanism)
    if plot_path:
        stats.require_matplotlib()  # fail before the sampling, not after
    index = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                        trust_pickle, quiet=quiet).index
    result = stats.run_stats(index, mechanism, values, _parse_param_pairs(param_pairs), sample,
                             draws, seed, progress=False if quiet else None)
    _write_or_echo(csv_path, stats.rows_to_csv(result.rows()))
    if plot_path:
        stats.plot_stats(result, plot_path)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else stats.format_table(result), nl=as_json)


@cli.command("calibrate")
@click.option("--mechanism", required=True, help="See: privtext mechanisms.")
@click.option("--target-unchanged", type=float, default=None,
              help="Target median N_w: share of draws that return the word itself.")
@click.option("--target-support", type=float, default=None,
              help="Target median S_w: distinct outputs in --draws draws.")
@click.option("--target-risk", type=float, default=None,
              help="Target attack success: the chance a Bayes-optimal adversary guesses a word "
                   "from its output (see privtext risk).")
@click.option("--prior", type=click.Choice(["uniform", "zipf"]), default="uniform", show_default=True,
              help="The adversary's public prior for --target-risk.")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Mechanism parameter (repeatable).")
@_embedding_options
@click.option("--sample", type=click.IntRange(min=1), default=500, show_default=True,
              help="Vocabulary words sampled (stratified by frequency-rank decade).")
@click.option("--draws", type=click.IntRange(min=1), default=50, show_default=True,
              help="Draws R per sampled word.")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=0.01,
              show_default=True, help="Bisection stops when log(ε − ε_low) is known this well.")
@click.option("--seed", default=None, help="Reproducible sample and draws (default: OS entropy).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (key 'epsilon').")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def calibrate_cmd(mechanism: str, target_unchanged: float | None, target_support: float | None,
                  target_risk: float | None, prior: str, param_pairs: tuple[str, ...], embeddings: str, embeddings_format: str,
                  vocab_size: int, neighbors: int, cache_dir: Path | None, trust_pickle: bool,
                  sample: int, draws: int, tolerance: float, seed: str | None, as_json: bool,
                  quiet: bool) -> None:
    """Find the ε at which the median N_w (or S_w, or the attack success) reaches a target."""
    from privtext.analysis.calibrate import calibrate, calibrate_risk
    from privtext.mechanisms import get

    if sum(t is not None for t in (target_unchanged, target_support, target_risk)) != 1:
        raise UsageError("give exactly one of --target-unchanged, --target-support or --target-risk")
    get(mechanism)
    if target_risk is not None:
        index = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                            trust_pickle, quiet=quiet).index
        res = calibrate_risk(index, mechanism, float(target_risk), _parse_param_pairs(param_pairs),
                             prior, seed, tolerance, progress=False if quiet else None)
        if as_json:
            click.echo(json.dumps(res.to_dict(), indent=2))
            return
        r = res.stats.summary()
        click.echo(f"epsilon = {res.epsilon:.6g}")
        click.echo(f"  {mechanism}: attack success {res.achieved:.4g} with a {prior} prior "
                   f"(target {res.target:g}, baseline {r['baseline']:.3g}, {r['method']}); ε bracket "
                   f"[{res.bracket[0]:.6g}, {res.bracket[1]:.6g}] after {res.evaluations} evaluations")
        return
    statistic, target = (("unchanged", target_unchanged) if target_unchanged is not None
                         else ("support", target_support))
    index = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                        trust_pickle, quiet=quiet).index
    result = calibrate(index, mechanism, statistic, float(target),  # type: ignore[arg-type]
                       _parse_param_pairs(param_pairs), sample, draws, seed, tolerance,
                       progress=False if quiet else None)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    s = result.stats.summary()
    label = "N_w" if statistic == "unchanged" else "S_w"
    click.echo(f"epsilon = {result.epsilon:.6g}")
    click.echo(f"  {mechanism}: median {label} = {result.achieved:.4g} (target {result.target:g}); "
               f"ε bracket [{result.bracket[0]:.6g}, {result.bracket[1]:.6g}] after "
               f"{result.evaluations} measurements of {result.sample} words × {result.draws} draws")
    for key, name in (("unchanged", "N_w"), ("support", "S_w")):
        d = s[key]
        click.echo(f"  {name}: p5 {d['p5']:.3g}, p25 {d['p25']:.3g}, median {d['p50']:.3g}, "
                   f"p75 {d['p75']:.3g}, p95 {d['p95']:.3g}, mean {d['mean']:.3g}")


def _per_mechanism(pairs: tuple[str, ...], names: list[str], option: str) -> dict[str, dict[str, str]]:
    """--param NAME.KEY=VALUE (or KEY=VALUE when one mechanism is listed) → {name: {key: value}}."""
    out: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in _parse_param_pairs(pairs).items():
        name, dot, pkey = key.partition(".")
        if dot and name in out:
            out[name][pkey] = value
        elif len(names) == 1:
            out[names[0]][key] = value
        else:
            raise UsageError(f"{option} {key}=…: with several mechanisms write NAME.KEY=VALUE "
                             f"(NAME one of {', '.join(names)})")
    return out


@cli.command("evaluate")
@click.option("--data", "data_path", required=True, help="Labelled records: JSONL, CSV or TSV.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--label-field", default="label", show_default=True)
@click.option("--test", "test_path", default=None, help="Separate test records (same fields).")
@click.option("--test-fraction", type=float, default=None,
              help="Hold out this stratified share of --data for testing (default 0.2).")
@click.option("--mechanisms", "mechanism_list", required=True, metavar="A,B,...|all",
              help="Mechanisms to compare ('all': every registered one).")
@click.option("--epsilon", "epsilon_specs", multiple=True, metavar="[NAME=]E1,E2,...",
              help="ε values for every mechanism, or NAME=... for one (repeatable).")
@click.option("--match-unchanged", default=None, metavar="P1,P2,...",
              help="Choose each mechanism's ε so its median N_w is P (via calibrate).")
@click.option("--match-risk", default=None, metavar="R1,R2,...",
              help="Choose each mechanism's ε so its attack success is R (via calibrate "
                   "--target-risk); combinable with --match-unchanged.")
@click.option("--prior", type=click.Choice(["uniform", "zipf"]), default="uniform", show_default=True,
              help="The adversary's public prior for --match-risk.")
@click.option("--param", "param_pairs", multiple=True, metavar="NAME.KEY=VALUE",
              help="Mechanism parameter (repeatable; KEY=VALUE when one mechanism is listed).")
@_embedding_options
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Independent perturbations of the training set per setting.")
@click.option("--oov", type=click.Choice(["mask", "drop", "keep"]), default="mask", show_default=True,
              help="Out-of-vocabulary words in the training text.")
@click.option("--sample", type=click.IntRange(min=1), default=500, show_default=True,
              help="Words sampled for the N_w statistics and calibration.")
@click.option("--draws", type=click.IntRange(min=1), default=50, show_default=True,
              help="Draws per sampled word for the N_w statistics and calibration.")
@click.option("--seed", default=None, help="Reproducible split and noise (default: OS entropy).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--csv", "csv_path", default=None, help="Write the result rows as CSV here.")
@click.option("--plot", "plot_path", default=None, help="Write the accuracy–N_w plot (PNG) here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def evaluate_cmd(data_path: str, text_field: str, label_field: str, test_path: str | None,
                 test_fraction: float | None, mechanism_list: str, epsilon_specs: tuple[str, ...],
                 match_unchanged: str | None, match_risk: str | None, prior: str, param_pairs: tuple[str, ...], embeddings: str,
                 embeddings_format: str, vocab_size: int, neighbors: int, cache_dir: Path | None,
                 trust_pickle: bool, repeats: int, oov: str, sample: int, draws: int,
                 seed: str | None, as_json: bool, csv_path: str | None, plot_path: str | None,
                 quiet: bool) -> None:
    """Train a classifier on perturbed text, test on clean text: utility against privacy."""
    from privtext.analysis import evaluate as ev
    from privtext.mechanisms import available, get
    from privtext.randomness import run_key

    ev.require_sklearn()
    if plot_path:
        from privtext.analysis.stats import require_matplotlib

        require_matplotlib()
    names = (list(available()) if mechanism_list.strip() == "all"
             else [n.strip() for n in mechanism_list.split(",") if n.strip()])
    for name in names:
        get(name)
    matching = match_unchanged is not None or match_risk is not None
    if bool(epsilon_specs) == matching:
        raise UsageError("give either --epsilon or --match-unchanged/--match-risk")
    if test_path is not None and test_fraction is not None:
        raise UsageError("give either --test or --test-fraction, not both")
    params = _per_mechanism(param_pairs, names, "--param")
    epsilons: dict[str, list[float]] = {}
    for spec in epsilon_specs:
        name, sep, rest = spec.partition("=")
        if sep:
            if name.strip() not in names:
                raise UsageError(f"--epsilon {name.strip()}=…: that mechanism is not in --mechanisms")
            epsilons.setdefault(name.strip(), []).extend(_float_list(rest, "--epsilon"))
        else:
            for n in names:
                epsilons.setdefault(n, []).extend(_float_list(spec, "--epsilon"))

    key = run_key(seed)
    data = ev.load_dataset(data_path, text_field, label_field)
    if test_path is not None:
        train, test = data, ev.load_dataset(test_path, text_field, label_field)
    else:
        from privtext.randomness import chunk_rng

        train, test = ev.stratified_split(data, test_fraction or ev.DEFAULT_TEST_FRACTION,
                                          chunk_rng(ev.subkey(key, "split"), 0, 0))
    index = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                        trust_pickle, quiet=quiet).index
    progress = False if quiet else None
    skipped: list[Any] = []
    if matching:
        settings = []
        if match_unchanged is not None:
            settings, skipped = ev.matched_settings(index, names,
                                                    _float_list(match_unchanged, "--match-unchanged"),
                                                    params, key, sample, draws, progress)
        if match_risk is not None:
            more, more_skipped = ev.risk_matched_settings(index, names,
                                                          _float_list(match_risk, "--match-risk"),
                                                          params, key, prior, sample, draws, progress)
            settings += more
            skipped += more_skipped
    else:
        settings = ev.epsilon_settings(index, epsilons, params, key, sample, draws, progress)
    result = ev.evaluate(index, train, test, settings, repeats, seed, key, oov, progress, skipped)
    _write_or_echo(csv_path, ev.rows_csv(result.rows))
    if plot_path:
        ev.plot_tradeoff([result], plot_path)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(ev.format_result(result), nl=False)


# --- audit: test a mechanism's stated guarantee by sampling ---------------------------------------


@cli.command("audit")
@click.option("--mechanism", required=True, help="See: privtext mechanisms.")
@click.option("--epsilon", type=float, required=True, help="Privacy parameter ε to audit.")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Mechanism parameter (repeatable).")
@_embedding_options
@click.option("--pairs", "pair_count", type=click.IntRange(min=1), default=None,
              help="Word pairs to audit: near, beyond the neighbour table, far (default 12).")
@click.option("--words", default=None, metavar="A,B", help="Audit this one pair of vocabulary words.")
@click.option("--samples", type=click.IntRange(min=20), default=20_000, show_default=True,
              help="Draws per word (half choose the events, half estimate them).")
@click.option("--alpha", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              default=0.05, show_default=True, help="Family-wise error level of the lower bounds.")
@click.option("--seed", default=None, help="Reproducible audit (default: OS entropy).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def audit_cmd(mechanism: str, epsilon: float, param_pairs: tuple[str, ...], embeddings: str,
              embeddings_format: str, vocab_size: int, neighbors: int, cache_dir: Path | None,
              trust_pickle: bool, pair_count: int | None, words: str | None, samples: int,
              alpha: float, seed: str | None, as_json: bool, quiet: bool) -> None:
    """Sample a mechanism on word pairs and test its stated guarantee (exit 1 if exceeded)."""
    from privtext.analysis import audit
    from privtext.mechanisms import create, get
    from privtext.randomness import chunk_rng, run_key

    if pair_count is not None and words is not None:
        raise UsageError("give either --pairs or --words, not both")
    get(mechanism)
    index = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                        trust_pickle, quiet=quiet).index
    mech = create(mechanism, index, epsilon, _parse_param_pairs(param_pairs))
    _warn_guarantee(mech, quiet)
    mech.prepare()
    rng = chunk_rng(run_key(seed), 0, 0)
    if words is not None:
        pairs = audit.pairs_from_words(index, [w.strip() for w in words.split(",")])
    else:
        pairs = audit.select_pairs(index, pair_count or audit.DEFAULT_PAIRS, rng)
    progress = None if quiet else (lambda msg: click.echo(f"privtext audit: {msg}", err=True))
    result = audit.run_audit(mech, pairs, samples, rng, alpha, progress=progress)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else audit.format_table(result),
               nl=as_json)
    if result.flagged:
        sys.exit(1)


# --- risk: what a Bayes-optimal adversary recovers from one perturbed word -----------------------


def _warn_guarantee(mechanism: Any, quiet: bool) -> None:
    """The map's warnings (e.g. floor=0), one line each on stderr."""
    if quiet:
        return
    for warning in mechanism.guarantee.warnings:
        click.echo(f"privtext: WARNING: {warning}", err=True)


@cli.command("risk")
@click.option("--mechanism", required=True, help="See: privtext mechanisms.")
@click.option("--epsilon", type=float, required=True, help="Privacy parameter ε of the mechanism.")
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Mechanism parameter (repeatable).")
@click.option("--prior", type=click.Choice(["uniform", "zipf"]), default="uniform", show_default=True,
              help="Public prior of the adversary over vocabulary rows (zipf: ∝ 1/(row + 1)).")
@_embedding_options
@click.option("--draws-per-word", type=click.IntRange(min=1), default=2, show_default=True,
              help="Monte-Carlo only: training draws per vocabulary word for the MAP guesser.")
@click.option("--test-draws", type=click.IntRange(min=1), default=50_000, show_default=True,
              help="Monte-Carlo only: held-out draws that measure the guesser.")
@click.option("--seed", default=None, help="Reproducible Monte-Carlo draws (default: OS entropy).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No messages on stderr.")
def risk_cmd(mechanism: str, epsilon: float, param_pairs: tuple[str, ...], prior: str,
             embeddings: str, embeddings_format: str, vocab_size: int, neighbors: int,
             cache_dir: Path | None, trust_pickle: bool, draws_per_word: int, test_draws: int,
             seed: str | None, as_json: bool, quiet: bool) -> None:
    """Attack success: the chance a Bayes-optimal adversary guesses a word from its output."""
    from privtext.analysis import risk
    from privtext.mechanisms import create, get
    from privtext.randomness import chunk_rng, run_key

    get(mechanism)
    index = _open_index(embeddings, embeddings_format, vocab_size, neighbors, cache_dir,
                        trust_pickle, quiet=quiet).index
    mech = create(mechanism, index, epsilon, _parse_param_pairs(param_pairs))
    _warn_guarantee(mech, quiet)
    result = risk.attack_success(mech, (prior,), chunk_rng(run_key(seed), 0, 0), draws_per_word,
                                 test_draws)[prior]
    click.echo(json.dumps(result.to_dict()) if as_json else risk.format_result(result), nl=as_json)
