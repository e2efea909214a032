"""docs/operator.md as a contract: every ``kvhost`` and ``kvhost-shim`` command in its shell
blocks parses with the real argument parsers (an option renamed in the code fails here),
the files it says install-host writes are the ones it writes, and the README links it.

The commands themselves were run as written inside the test VM when the document was
written (its commit message says which); here nothing runs but a staging install.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kvhost.cli import build_parser as kvhost_parser
from kvhost.cli import main
from shim.cli import build_parser as shim_parser

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "operator.md"


def shell_commands(text: str) -> list[list[str]]:
    """Each command line of the ```sh blocks, continuation lines joined, comment dropped."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def test_every_kvhost_command_in_the_doc_parses() -> None:
    commands = shell_commands(DOC.read_text())
    kvhost = [w[1:] for w in commands if w[0] == "kvhost"]
    shim = [w[1:] for w in commands if w[0] == "kvhost-shim"]
    assert len(kvhost) >= 10 and shim, commands  # the blocks were found
    for argv in kvhost:
        kvhost_parser().parse_args(argv)  # SystemExit (exit 2) on an unknown option
    for argv in shim:
        if argv != ["--version"]:  # argparse's version action exits 0 by design
            shim_parser().parse_args(argv)
    with pytest.raises(SystemExit):
        kvhost_parser().parse_args(["libvirt", "stamp", "vm1.xml", "--no-such-option"])


def test_the_files_the_doc_lists_are_the_ones_installed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = set(re.findall(r"^\| `(/etc/[^`]+)` \|", DOC.read_text(), re.M))
    root = tmp_path / "root"
    assert main(["install-host", "--root", str(root)]) == 0
    capsys.readouterr()
    installed = {
        "/" + str(p.relative_to(root)) + ("/" if p.is_dir() else "")
        for p in root.rglob("*")
        if (p.is_file() and not p.is_symlink()) or p.name == "shim"
    }
    assert listed == installed


def test_the_readme_links_the_doc_and_keeps_its_first_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "[docs/operator.md](docs/operator.md)" in readme
    first = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first is not None
    assert [line.split()[0] for line in first.group(1).splitlines()] == ["./demo", "./run-tests"]
