"""``kvhost manifest --nfd``: the node-feature-discovery feature file, its label rules, and
its life next to the manifest (written together, withdrawn when the host serves nothing).

The probe is a recorded one (as in test_cli_versions.py); the real probe writing the file
runs in the kernel tier (tests/test_kernel_manifest.py).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from test_versions import V, probe_61, probe_612, probe_json

import kvhost.probe
from kvhost import manifest as mf
from kvhost import nfd
from kvhost import versions as ver
from kvhost.cli import build_parser, main
from kvhost.commands import versions as cmd
from kvhost.errors import UsageError
from kvhost.probe import Probe

#: Kubernetes' own label syntax (apimachinery validation): qualified name, optional prefix
K8S_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
K8S_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_valid_k8s_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        prefix, _, name = key.partition("/")
        assert len(prefix) <= 253 and K8S_PREFIX.match(prefix), key
        assert len(name) <= 63 and K8S_NAME.match(name), key
        assert len(value) <= 63 and (value == "" or K8S_NAME.match(value)), value


def test_labels_for_61_one_per_version_then_latest() -> None:
    m = mf.build(probe_61(), generated_at="2026-01-01T00:00:00.000000Z")
    text = nfd.render(m)
    lines = text.splitlines()
    assert (
        lines[0] == "# kvhost: interface versions of kernel vhost-net on this node "
        "(kernel 6.1.0-56-amd64)"
    )
    assert lines[1].startswith("# generated 2026-01-01T00:00:00.000000Z by kvhost ")
    assert lines[2:] == [f"kvhost.io/{V[n]}=true" for n in range(1, 6)] + [
        f"kvhost.io/vhost-net.latest={V[5]}"
    ]
    labels = nfd.parse(text)
    assert labels == nfd.labels(m)
    assert_valid_k8s_labels(labels)


def test_every_registry_name_is_a_valid_label() -> None:
    doc = mf.build(probe_61())
    every = [v.name for v in ver.registry() if v.name]
    doc.update(supported=every, latest=every[-1])
    labels = nfd.labels(doc, "feature.node.kubernetes.io")
    assert len(labels) == len(every) + 1
    assert_valid_k8s_labels(labels)


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [
        ("Kvhost.io", "not a DNS subdomain"),
        ("kvhost..io", "not a DNS subdomain"),
        ("-kvhost.io", "not a DNS subdomain"),
        ("a" * 254, "not a DNS subdomain"),
        ("node.kubernetes.io", "reserved"),
        ("x.k8s.io", "reserved"),
    ],
)
def test_bad_prefixes_are_refused(prefix: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        nfd.check_prefix(prefix)


def test_nfd_own_namespace_is_accepted() -> None:
    assert nfd.check_prefix("feature.node.kubernetes.io") == "feature.node.kubernetes.io"


def test_a_version_name_no_label_can_carry_is_refused() -> None:
    doc = mf.build(probe_61())
    for bad in ("org.kernel.vhost-net.v5-", "x" * 64, "with space"):
        doc.update(supported=[bad], latest=bad)
        with pytest.raises(mf.ManifestError, match="cannot be a Kubernetes label name"):
            nfd.labels(doc)


def test_parse_reads_like_nfd_worker() -> None:
    text = "# comment\n\nvendor.io/flag\nvendor.io/x=1\n"
    assert nfd.parse(text) == {"vendor.io/flag": "true", "vendor.io/x": "1"}
    with pytest.raises(ValueError, match="no label namespace"):
        nfd.parse("bare=1\n")


# --- the command ----------------------------------------------------------------------------


def test_manifest_with_nfd_writes_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kvhost.probe, "probe", probe_612)
    out_path, nfd_path = tmp_path / "run" / "vhost-net.json", tmp_path / "features.d" / "kvhost"
    rc, out, _ = run(["manifest", "--output", str(out_path), "--nfd", str(nfd_path)], capsys)
    assert rc == 0
    assert out == (
        f"wrote {out_path} and {nfd_path}: kernel 6.12.117+deb12-amd64: latest {V[7]}, "
        "7 versions supported\n"
    )
    labels = nfd.parse(nfd_path.read_text())
    assert labels == nfd.labels(json.loads(out_path.read_text()))
    assert labels[f"kvhost.io/{V[7]}"] == "true" and f"kvhost.io/{V[8]}" not in labels
    assert stat.S_IMODE(nfd_path.stat().st_mode) == 0o644
    assert os.listdir(nfd_path.parent) == ["kvhost"]  # no dot temp file left for nfd-worker


def test_output_dash_prints_json_only_and_still_writes_nfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kvhost.probe, "probe", probe_61)
    nfd_path = tmp_path / "kvhost"
    rc, out, err = run(
        [
            "manifest",
            "--output",
            "-",
            "--nfd",
            str(nfd_path),
            "--nfd-prefix",
            "feature.node.kubernetes.io",
        ],
        capsys,
    )
    assert rc == 0
    printed = json.loads(out)  # stdout stays parseable JSON
    assert err == f"wrote {nfd_path}: kernel 6.1.0-56-amd64: latest {V[5]}, 5 versions supported\n"
    labels = nfd.parse(nfd_path.read_text())
    assert labels["feature.node.kubernetes.io/vhost-net.latest"] == printed["latest"] == V[5]


def test_json_flag_with_nfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kvhost.probe, "probe", probe_61)
    out_path, nfd_path = tmp_path / "m.json", tmp_path / "kvhost"
    rc, out, _ = run(
        ["manifest", "--output", str(out_path), "--json", "--nfd", str(nfd_path)], capsys
    )
    assert rc == 0 and json.loads(out) == json.loads(out_path.read_text())
    assert nfd.parse(nfd_path.read_text())[f"kvhost.io/{V[5]}"] == "true"


def test_a_host_serving_nothing_withdraws_the_labels_but_keeps_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path, nfd_path = tmp_path / "vhost-net.json", tmp_path / "kvhost"
    argv = ["manifest", "--output", str(out_path), "--nfd", str(nfd_path)]
    monkeypatch.setattr(kvhost.probe, "probe", probe_61)
    assert run(argv, capsys)[0] == 0
    manifest_before = out_path.read_bytes()
    why = "/dev/vhost-net is not available: run 'modprobe vhost_net'"
    monkeypatch.setattr(
        kvhost.probe, "probe", lambda: Probe.from_json(probe_json("6.1", None, [], vhost_error=why))
    )
    rc, out, err = run(argv, capsys)
    assert rc == 1 and out == ""
    assert "this host serves no interface version" in err and why in err
    assert f"removed {nfd_path} so this node advertises no version" in err
    assert not nfd_path.exists()
    assert out_path.read_bytes() == manifest_before
    # again, with nothing left to withdraw: the plain message
    rc, _, err = run(argv, capsys)
    assert rc == 1 and "removed" not in err and not nfd_path.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--nfd", "-"], "nfd-worker ignores dot files and reads only files"),
        (["--nfd", "/x/.hidden"], "nfd-worker ignores dot files"),
        (["--nfd", "/x/kvhost", "--nfd-prefix", "kubernetes.io"], "reserved"),
    ],
)
def test_bad_nfd_arguments_are_usage_errors_before_probing(
    args: list[str],
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_probe() -> Probe:
        raise AssertionError("probed despite a usage error")

    monkeypatch.setattr(kvhost.probe, "probe", no_probe)
    rc, _, err = run(["manifest", "--output", str(tmp_path / "m.json"), *args], capsys)
    assert rc == 2 and fragment in err and err.startswith("kvhost manifest: ")
    assert not (tmp_path / "m.json").exists()


def test_unwritable_nfd_directory_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kvhost.probe, "probe", probe_61)
    (tmp_path / "features.d").write_text("a file where the directory should be")
    nfd_path = tmp_path / "features.d" / "kvhost"
    rc, _, err = run(
        ["manifest", "--output", str(tmp_path / "m.json"), "--nfd", str(nfd_path)], capsys
    )
    assert rc == 1
    assert err.startswith(f"kvhost manifest: cannot write NFD feature file {nfd_path}: ")
    assert (tmp_path / "m.json").exists()  # the manifest itself was written first


def test_kmsg_names_the_file_that_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The udev rule's kernel-log line: a failed NFD file after a written manifest says so,
    and a feature file that cannot be withdrawn is named beside the probe's reason."""
    lines: list[tuple[int, str]] = []
    monkeypatch.setattr(cmd, "_kmsg", lambda level, text: lines.append((level, text)))
    monkeypatch.setattr(kvhost.probe, "probe", probe_61)
    out_path = tmp_path / "m.json"
    (tmp_path / "features.d").write_text("a file where the directory should be")
    nfd_path = tmp_path / "features.d" / "kvhost"
    argv = ["manifest", "--output", str(out_path), "--kmsg", "--nfd", str(nfd_path)]
    assert run(argv, capsys)[0] == 1
    assert out_path.exists()
    ((level, text),) = lines
    assert level == 4
    assert text.startswith(
        f"wrote manifest {out_path}, but NFD feature file {nfd_path} not updated: cannot "
        f"write NFD feature file {nfd_path}: "
    ), text
    # nothing served, and the old feature file cannot be removed (a directory in its place:
    # unlink fails, even for root)
    lines.clear()
    nfd_path = tmp_path / "labels" / "kvhost"
    nfd_path.mkdir(parents=True)
    why = "/dev/vhost-net is not available: run 'modprobe vhost_net'"
    monkeypatch.setattr(
        kvhost.probe, "probe", lambda: Probe.from_json(probe_json("6.1", None, [], vhost_error=why))
    )
    argv = ["manifest", "--output", str(out_path), "--kmsg", "--nfd", str(nfd_path)]
    rc, _, err = run(argv, capsys)
    assert rc == 1
    ((level, text),) = lines
    assert text.startswith(f"manifest {out_path} not updated: ") and why in text, text
    assert f"cannot remove NFD feature file {nfd_path}: " in text, text
    assert "so this node still advertises the versions in it" in text, text
    assert why in err and f"cannot remove NFD feature file {nfd_path}" in err


# --- the udev rule carries --nfd ------------------------------------------------------------


def test_install_udev_with_nfd_puts_it_on_the_run_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, _ = run(
        [
            "install-udev",
            "--rules-dir",
            str(tmp_path),
            "--nfd",
            "/etc/k/features.d/kvhost",
            "--nfd-prefix",
            "feature.node.kubernetes.io",
        ],
        capsys,
    )
    assert rc == 0
    rule = (tmp_path / cmd.RULES_NAME).read_text().splitlines()[-1]
    run_words = rule.split('RUN+="')[1].rstrip('"').split()
    assert run_words[1:4] == ["-I", "-m", "kvhost.cli"]
    assert run_words[4:] == [
        "manifest",
        "--output",
        str(mf.DEFAULT_PATH),
        "--kmsg",
        "--nfd",
        "/etc/k/features.d/kvhost",
        "--nfd-prefix",
        "feature.node.kubernetes.io",
    ]
    # the words the rule runs parse as a manifest command line
    args = build_parser().parse_args(run_words[4:])
    assert args.nfd == "/etc/k/features.d/kvhost" and args.kmsg


def test_nfd_file_tracks_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reboot into an older kernel rewrites the labels: v6/v7 disappear."""
    out_path, nfd_path = tmp_path / "m.json", tmp_path / "kvhost"
    argv = ["manifest", "--output", str(out_path), "--nfd", str(nfd_path)]
    monkeypatch.setattr(kvhost.probe, "probe", probe_612)
    assert run(argv, capsys)[0] == 0
    assert f"kvhost.io/{V[7]}" in nfd.parse(nfd_path.read_text())
    monkeypatch.setattr(kvhost.probe, "probe", probe_61)
    assert run(argv, capsys)[0] == 0
    labels = nfd.parse(nfd_path.read_text())
    assert f"kvhost.io/{V[6]}" not in labels and f"kvhost.io/{V[7]}" not in labels
    assert labels["kvhost.io/vhost-net.latest"] == V[5]
