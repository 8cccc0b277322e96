"""The CLI's help for a first read (issue 17, item 7): the settings' flags grouped (model, chunking, store,
Redis, API, tuning), the API and tuning ones folded behind --help-all, commands in the order a user meets them."""

from __future__ import annotations

import re

from click.testing import CliRunner

from producer.cli import main


def help_of(*args: str) -> str:
    result = CliRunner().invoke(main, [*args])
    assert result.exit_code == 0, result.output
    return result.output


def sections(text: str) -> list[str]:
    return re.findall(r"^(\S[^:\n]*):$", text, re.M)


def test_a_first_read_shows_the_groups_and_folds_api_and_tuning() -> None:
    first = help_of("run", "--help")
    assert sections(first)[-4:] == ["Options", "Model settings", "Chunking settings", "Store settings"]
    for flag in ("--model", "--chunk-tokens", "--store", "--json", "--fail-on-dead-letters", "--help-all"):
        assert flag in first
    for folded in ("--api-rpm", "--openai-base-url", "--part-max-chunks", "--micro-batch-tokens"):
        assert folded not in first
    assert re.search(r"\d+ more settings \(API, Tuning\): --help-all shows them", first)

    every = help_of("run", "--help-all")
    assert sections(every)[-6:] == [
        "Options",
        "Model settings",
        "Chunking settings",
        "Store settings",
        "API settings",
        "Tuning settings",
    ]
    assert "--api-rpm" in every and "--part-max-chunks" in every and "more settings" not in every
    assert "Redis settings" in sections(help_of("enqueue", "--help"))


def test_commands_are_listed_in_the_order_a_user_meets_them() -> None:
    listed = re.findall(r"^  (\w+)  ", help_of("--help").split("Commands:")[1], re.M)
    assert listed[:6] == ["run", "search", "estimate", "status", "failed", "redrive"]
    assert listed.index("janitor") < listed.index("worker") < listed.index("enqueue") < listed.index("wait")
    assert listed.index("wait") < listed.index("collections") < listed.index("promote")
