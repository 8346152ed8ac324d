"""Library errors name config fields; the CLI writes those fields as its flags (advpipe/commands/flags.py)."""

from __future__ import annotations

import pickle

import pytest
from typer.testing import CliRunner

from advpipe.cli import app
from advpipe.commands.flags import flag_name, with_flags
from advpipe.errors import AdvpipeError
from advpipe.train.compose import parse_aug


def test_flag_names_follow_the_cli_spelling():
    assert flag_name("weight_decay") == "--weight-decay"
    assert flag_name("attack_options") == "--attack-opt"
    assert flag_name("lr") == "--lr"


@pytest.mark.parametrize("message, fields, expected", [
    ("lr must be positive, got -1.0", ["lr"], "--lr must be positive, got -1.0"),
    ("momentum and weight_decay must be >= 0", ["momentum", "weight_decay"], "--momentum and --weight-decay must be >= 0"),
    # user values (quoted) and paths are never rewritten; neither are fields the error does not name
    ("unknown aug 'data aug'", ["aug"], "unknown --aug 'data aug'"),
    ("/data/c10c is short; use limit or the matching data", ["limit", "data"],
     "/data/c10c is short; use --limit or the matching --data"),
    ("epochs must be >= 1 for this data", ["epochs"], "--epochs must be >= 1 for this data"),
    ("workers=0 runs in this process", ["workers"], "--workers=0 runs in this process"),
    ("nothing to map", [], "nothing to map"),
])
def test_with_flags_rewrites_only_the_named_fields(message, fields, expected):
    assert with_flags(message, fields) == expected


def test_fields_survive_pickling_as_across_dask_workers():
    exc = pickle.loads(pickle.dumps(AdvpipeError("lr must be positive", fields=("lr",))))
    assert isinstance(exc, AdvpipeError) and str(exc) == "lr must be positive" and exc.fields == ("lr",)


def test_library_names_the_field_and_the_cli_names_the_flag():
    with pytest.raises(AdvpipeError) as info:
        parse_aug("sparkles")
    assert "unknown aug 'sparkles'" in str(info.value) and "--aug" not in str(info.value)
    result = CliRunner().invoke(app, ["train", "--aug", "sparkles", "--epochs", "1"])
    assert result.exit_code == 2 and "unknown --aug 'sparkles'" in result.output, result.output
