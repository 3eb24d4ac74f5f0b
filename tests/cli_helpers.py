"""Helpers the CLI tests share: run ``dfqkern`` in-process and read its JSON summary."""
from __future__ import annotations

import json

from dfqkern import cli


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``dfqkern *argv`` run in this process."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def json_block(text):
    """The JSON object a command prints (progress output may precede it)."""
    return json.loads(text[text.index("{"):])
