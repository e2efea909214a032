"""Host tier: the wheel holds only what a host runs.

The harness (``harness/``: QEMU driver, test VM, scenarios, demo), the tests and the
benchmarks are run from a checkout; a host that installs kvhost gets ``kvhost`` and ``shim``
only. Two ways that could break without anyone noticing, both checked here without building
a wheel (building one takes seconds and may need the network):

* pyproject's package list (or a ``find`` that replaces it) picks up a harness, test or
  bench package;
* a shipped module imports the harness, which works in a checkout and fails on every host.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the top-level packages a host runs
SHIPPED_ROOTS = {"kvhost", "shim"}
#: top-level packages that exist only in a checkout
CHECKOUT_ONLY = {"harness", "tests", "bench"}


def shipped_packages() -> list[str]:
    """The packages setuptools installs, read as it reads them: the explicit list of
    ``[tool.setuptools] packages``, or what its ``find`` (or automatic discovery) finds."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = conf.get("tool", {}).get("setuptools", {}).get("packages")
    if isinstance(packages, list):
        return [str(p) for p in packages]
    # setuptools 66 has no type hints; newer ones do
    import setuptools  # type: ignore[import-untyped, unused-ignore]

    find = packages.get("find", {}) if isinstance(packages, dict) else {}
    where = find.get("where", ["."])
    found: list[str] = []
    for base in where:
        found += setuptools.find_packages(
            str(ROOT / base),
            include=find.get("include", ["*"]),
            exclude=find.get("exclude", []),
        )
    return found


def module_files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).glob("*.py"))


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in ``tree``, function-local ones and
    ``importlib.import_module("...")`` with a literal name included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_only_kvhost_and_shim_ship() -> None:
    packages = shipped_packages()
    assert packages, "pyproject installs no package"
    strays = [p for p in packages if p.split(".")[0] not in SHIPPED_ROOTS]
    assert not strays, f"pyproject would install checkout-only packages: {strays}"
    for package in packages:
        assert module_files(package), f"shipped package {package} has no modules"


def test_every_package_under_kvhost_and_shim_is_listed() -> None:
    # an unlisted subpackage would be missing from the wheel and fail on hosts, not here
    on_disk = {
        str(init.parent.relative_to(ROOT)).replace("/", ".")
        for root in SHIPPED_ROOTS
        for init in (ROOT / root).rglob("__init__.py")
    }
    assert on_disk == set(shipped_packages())


def test_no_shipped_module_imports_the_harness() -> None:
    offenders = []
    for package in shipped_packages():
        for path in module_files(package):
            tree = ast.parse(path.read_text(), str(path))
            for line, module in imported_modules(tree):
                if module.split(".")[0] in CHECKOUT_ONLY:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offenders, "shipped code imports checkout-only code:\n" + "\n".join(offenders)


def test_the_import_scan_sees_late_and_dynamic_imports() -> None:
    tree = ast.parse(
        "def f():\n"
        "    from harness import rig\n"
        "    import harness.qemu\n"
        "    importlib.import_module('harness.demo')\n"
        "from . import sibling\n"
    )
    assert [m for _, m in imported_modules(tree)] == ["harness", "harness.qemu", "harness.demo"]
