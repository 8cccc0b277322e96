"""`embedpipe distill`: a static embedding model from a local sentence-transformers model."""

from __future__ import annotations

from pathlib import Path

import click

from producer.cli_options import SettingsCommand, echo_json, fail_clearly, json_option


@click.command(cls=SettingsCommand)
@click.option(
    "--from",
    "source",
    default="all-MiniLM-L6-v2",
    show_default=True,
    envvar="EMBEDPIPE_MODEL",
    help="The model to distil: a local directory, the bundled default or a model in the Hugging Face cache.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write the static model to.")
@click.option("--dims", default=256, show_default=True, help="Dimensions of its vectors (PCA); 0 = the source's.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@json_option
@fail_clearly
def distill(source: str, out: Path, dims: int, force: bool, as_json: bool) -> None:
    """Make a static embedding model (model2vec) from a local model, offline: one vector per token, so
    embedding is a lookup and a mean, ~100x cheaper than the source on a CPU, at some cost in quality.
    Use it with EMBEDPIPE_MODEL=OUT (its own collection). Chunks of a static model hold 128 tokens
    unless EMBEDPIPE_CHUNK_TOKENS says otherwise. Takes ~40 s for the default model on 2 cores."""
    from workers.distill import distill as distill_model

    made = distill_model(source, out, dims, force)
    if as_json:
        echo_json(made)
        return
    click.echo(
        f"static model {made['model']}: {made['dimensions']} dimensions, {made['vocabulary']} tokens, "
        f"distilled from {made['from']} in {made['seconds']:.0f} s\nuse it: EMBEDPIPE_MODEL={made['model']}"
    )
