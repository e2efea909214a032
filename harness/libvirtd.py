"""Real libvirtd (Debian 12: 9.0) inside the disposable test VM, with kvhost's hook installed.

One recipe for the kernel tier, the cross-kernel tier and ``bench/bench_libvirt.py``, as
/work/shared/reference/libvirt-in-test-vm.md records it: the test VM is booted with
``--overlay-rwdir /etc --overlay-rwdir /var/lib``; libvirt needs its build-time user
``libvirt-qemu`` even when qemu.conf says root (``useradd`` cannot run: virtme bind-mounts
/etc/shadow, so the lines are appended); the hook must be in place before libvirtd starts
(it reads hooks once); ``virsh capabilities`` blocks until QEMU has been probed.

Domains come in two shapes. :func:`vhostuser_domain`/:func:`native_domain` boot SeaBIOS with
no disk: enough for what libvirt and the hook do. :func:`driven_domain` boots a HLT-only
BIOS and asks QEMU for a qtest socket (``qemu:commandline``), so a test can play the guest
driver (:mod:`harness.qemu.virtio_pci`) at a fixed PCI slot, as :mod:`harness.qemu.machine`
does for QEMUs it starts itself: the driver reaches DRIVER_OK and moves frames.

Nothing here may run on a real host: :func:`require_test_vm` says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.qemu.machine import DEVICE_SLOT, write_bios
from harness.qemu.qtest import QtestClient
from kvhost.commands import host as hostcmd

SOCKETS = Path("/run/kvhost")
STATE = SOCKETS / "shim"
#: libvirt probes QEMU twice when /bin and /usr/bin both lead to it (the reference)
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
VIRSH = ("virsh", "-c", "qemu:///system")
USER_LINES = (
    ("/etc/group", "libvirt-qemu:x:64055:"),
    ("/etc/passwd", "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin"),
)
DIRECTORIES = ("/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt", "/run/libvirt")
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
# libvirt's default device ACL lacks what QEMU opens itself for a qemu:commandline
# '-netdev tap,vhost=on' (libvirt passes fds only for the interfaces it knows)
cgroup_device_acl = [ "/dev/null", "/dev/full", "/dev/zero", "/dev/random", "/dev/urandom",
                      "/dev/ptmx", "/dev/kvm", "/dev/net/tun", "/dev/vhost-net" ]
"""
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

#: a TCG q35 domain; the parts the kinds of domain differ in are filled in
_DOMAIN = """\
<domain type='qemu' xmlns:qemu='{qemu_ns}'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
{backing}  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
{loader}  </os>
  <devices>
    <controller type='usb' model='none'/>
{interface}    <video>
      <model type='none'/>
    </video>
    <memballoon model='none'/>
  </devices>
{commandline}</domain>
"""
#: vhost-user needs guest RAM the shim can map
_SHARED_MEMORY = """\
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
"""


def require_test_vm(what: str) -> None:
    """RuntimeError unless this runs in the disposable test VM (``KVHOST_IN_TESTVM``)."""
    if not os.environ.get("KVHOST_IN_TESTVM"):
        raise RuntimeError(
            f"{what} rewrites /etc/passwd and /etc/libvirt and starts its own libvirtd: run "
            "it in the test VM (python -m harness.testvm --overlay-rwdir /etc "
            "--overlay-rwdir /var/lib -- ...)")


def sh(argv: list[str] | tuple[str, ...], timeout: float = 300,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with this environment's programs first on PATH, then libvirt's."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{PATH}")
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env=env, input=input, check=False)  # fmt: skip


def virsh(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return sh([*VIRSH, *args], timeout=timeout)


def one_line(text: str) -> str:
    """virsh folds long errors over lines; assertions read them as one."""
    return " ".join(text.split())


def _interface_vhostuser(sock: Path | str, slot: int | None) -> str:
    address = ("" if slot is None else
               f"      <address type='pci' domain='0' bus='0' slot='{slot:#x}' function='0'/>\n")
    return f"""\
    <interface type='vhostuser'>
      <source type='unix' path='{sock}' mode='client'/>
      <model type='{"virtio" if slot is None else "virtio-non-transitional"}'/>
      <rom enabled='no'/>
{address}    </interface>
"""


def _interface_native(tap: str, slot: int | None) -> str:
    address = ("" if slot is None else
               f"      <address type='pci' domain='0' bus='0' slot='{slot:#x}' function='0'/>\n")
    return f"""\
    <interface type='ethernet'>
      <target dev='{tap}' managed='no'/>
      <model type='{"virtio" if slot is None else "virtio-non-transitional"}'/>
      <driver name='vhost'/>
      <rom enabled='no'/>
{address}    </interface>
"""


def vhostuser_domain(name: str, sock: Path | str, results: Path) -> str:
    """A q35 domain with SeaBIOS, a serial log in ``results`` and a vhost-user NIC."""
    serial = f"""\
    <serial type='file'>
      <source path='{results}/{name}.serial'/>
      <target port='0'/>
    </serial>
"""
    return _DOMAIN.format(qemu_ns=QEMU_NS, name=name, memory=128, backing=_SHARED_MEMORY,
                          machine="q35", loader="", commandline="",
                          interface=_interface_vhostuser(sock, None) + serial)


def native_domain(name: str, tap: str) -> str:
    """A q35 domain with SeaBIOS and QEMU's own vhost-net on an existing tap."""
    return _DOMAIN.format(qemu_ns=QEMU_NS, name=name, memory=128, backing="", machine="q35",
                          loader="", commandline="", interface=_interface_native(tap, None))


@dataclass(frozen=True, slots=True)
class Driven:
    """A domain whose guest driver a test plays over QEMU's qtest socket."""

    name: str
    xml: str
    qtest: Path

    def connect(self, timeout: float = 60.0) -> QtestClient:
        """The qtest client, once QEMU (started by libvirt) listens on the socket."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.qtest))
                return QtestClient(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def driven_domain(name: str, work: Path, *, sock: Path | str | None = None,
                  tap: str | None = None, extra_args: str = "",
                  machine: str = "pc") -> Driven:
    """A domain with the HLT BIOS in ``work`` and a qtest socket, the NIC at DEVICE_SLOT:
    vhost-user on ``sock``, QEMU's vhost-net on ``tap`` (``<driver name='vhost'>``), or none
    (``extra_args`` then adds one through qemu:commandline)."""
    bios = work / "hlt.bin"
    if not bios.exists():
        write_bios(bios)
    qtest = work / f"{name}.qtest"
    if sock is not None:
        interface, backing = _interface_vhostuser(sock, DEVICE_SLOT), _SHARED_MEMORY
    elif tap is not None:
        interface, backing = _interface_native(tap, DEVICE_SLOT), ""
    else:
        interface, backing = "", _SHARED_MEMORY
    commandline = f"""\
  <qemu:commandline>
    <qemu:arg value='-qtest'/>
    <qemu:arg value='unix:{qtest},server=on,wait=off'/>
    <qemu:arg value='-qtest-log'/>
    <qemu:arg value='/dev/null'/>
{extra_args}  </qemu:commandline>
"""
    xml = _DOMAIN.format(qemu_ns=QEMU_NS, name=name, memory=64, backing=backing,
                         machine=machine, loader=f"    <loader type='rom'>{bios}</loader>\n",
                         interface=interface, commandline=commandline)
    return Driven(name, xml, qtest)


def _append_once(path: Path, line: str) -> None:
    text = path.read_text()
    if line.split(":", 1)[0] + ":" not in text:
        path.write_text(text + ("" if text.endswith("\n") else "\n") + line + "\n")


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)


def check_ready() -> str | None:
    """Why libvirt cannot be set up in this VM, or None."""
    for prog in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(prog, path=PATH) is None:
            return (f"{prog} is not installed: run scripts/install-deps (it installs "
                    "libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients)")
    try:
        Path("/etc/libvirt").mkdir(parents=True, exist_ok=True)
        Path("/etc/libvirt/.kvhost-write-check").touch()
        Path("/etc/libvirt/.kvhost-write-check").unlink()
        Path("/var/lib/libvirt").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return (f"/etc or /var/lib is not writable ({err.strerror}): boot the test VM with "
                "--overlay-rwdir /etc --overlay-rwdir /var/lib")
    return None


@contextlib.contextmanager
def running(results: Path, stage: Path) -> Iterator[Path]:
    """Set libvirt up, install the hook as ``kvhost install-host`` renders it, start virtlogd
    and libvirtd, wait for QEMU's capabilities; yield the hook's path; stop both daemons."""
    require_test_vm("libvirtd set-up")
    why = check_ready()
    if why is not None:
        raise RuntimeError(why)
    for path, line in USER_LINES:
        _append_once(Path(path), line)
    for d in DIRECTORIES:
        Path(d).mkdir(parents=True, exist_ok=True)
    Path("/etc/libvirt/qemu.conf").write_text(QEMU_CONF)
    Path("/etc/libvirt/libvirtd.conf").write_text(
        f'log_outputs = "3:file:{results}/libvirtd.log"\n')
    args = [sys.executable, "-m", "kvhost.cli", "install-host", "--root", str(stage)]
    done = sh(args)
    if done.returncode:
        raise RuntimeError(f"install-host --root {stage}: {done.stderr.strip()}")
    hook = Path("/") / hostcmd.HOOK_FILE
    hook.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(stage / hostcmd.HOOK_FILE, hook)
    SOCKETS.mkdir(parents=True, exist_ok=True)
    try:
        for daemon in ("virtlogd", "libvirtd"):
            done = sh([daemon, "--daemon"], timeout=60)
            if done.returncode:
                raise RuntimeError(f"{daemon} --daemon: {done.stderr.strip()}")
        caps = virsh("capabilities")  # blocks until QEMU is probed (~26 s cold under TCG)
        if caps.returncode:
            raise RuntimeError(f"virsh capabilities: {caps.stderr.strip()}")
        yield hook
    finally:
        _kill_pidfile(Path("/run/libvirtd.pid"))
        _kill_pidfile(Path("/run/virtlogd.pid"))


# --- a second libvirtd in the same test VM (live migration) ----------------------------------

#: what instance B gets a private copy of, bind-mounted over the one instance A uses; its
#: QEMUs, shims, sockets, hook state and manifest (all under /run) are B's own
PRIVATE_DIRS = ("/run", "/etc/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
                "/var/cache/libvirt")
#: B's host UUID: libvirt refuses to migrate to a daemon whose host UUID is its own
HOST_UUID_B = "6b7661a1-7be2-4c8f-9f1e-00000000000b"


@dataclass(frozen=True, slots=True)
class Instance:
    """Instance B: a libvirtd (and virtlogd) in a mount namespace of its own."""

    base: Path
    libvirtd_pid: int

    def path(self, inside: str | Path) -> Path:
        """Where B's ``inside`` (under one of PRIVATE_DIRS) is, seen from outside B."""
        text = str(inside)
        for d in sorted(PRIVATE_DIRS, key=len, reverse=True):
            if text == d or text.startswith(d + "/"):
                return self.base / d.strip("/").replace("/", "-") / text[len(d):].lstrip("/")
        raise ValueError(f"{inside} is not in one of B's private directories {PRIVATE_DIRS}")

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path('/run/libvirt/libvirt-sock')}"

    def virsh(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return sh(["virsh", "-c", self.uri, *args], timeout=timeout)

    def processes(self) -> dict[int, list[str]]:
        """pid -> argv of every process in B's mount namespace (its daemons, QEMUs, shims):
        A and B run the same programs with the same arguments, the namespace tells them
        apart."""
        want = _mount_ns(self.libvirtd_pid)
        out: dict[int, list[str]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _mount_ns(int(entry.name)) == want:
                try:
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                out[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
        return out


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


@contextlib.contextmanager
def second_instance(results: Path, base: Path, *, manifest: bytes | None = None,
                    host_uuid: str = HOST_UUID_B) -> Iterator[Instance]:
    """Start instance B while :func:`running` (instance A) runs, as the reference's verified
    recipe does: A's /etc/libvirt (qemu.conf, kvhost's hook) and QEMU capability cache
    copied into B's private directories, B's own ``host_uuid`` and log
    (``results/libvirtd-b.log``), A's /run/libvirt still reachable inside B at
    ``base/a-run-libvirt``; ``manifest`` becomes B's /run/kvhost/vhost-net.json, the
    manifest B's hook judges versions by. Yields B; destroys B's domains and stops B's
    daemons at the end."""
    require_test_vm("a second libvirtd")
    for d in PRIVATE_DIRS:
        Instance(base, 0).path(d).mkdir(parents=True, exist_ok=True)
    b = Instance(base, 0)
    # domain definitions stay A's (*.xml): B must learn a domain only from a migration
    shutil.copytree("/etc/libvirt", b.path("/etc/libvirt"), dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns("*.xml", ".kvhost-*"))
    b.path("/etc/libvirt/libvirtd.conf").write_text(
        f'log_outputs = "3:file:{results}/libvirtd-b.log"\nhost_uuid = "{host_uuid}"\n')
    # the same QEMU binary on the same kernel: A's probe is valid for B (26 s saved)
    shutil.copytree("/var/cache/libvirt", b.path("/var/cache/libvirt"), dirs_exist_ok=True,
                    symlinks=True)
    for d in ("/run/libvirt", "/run/kvhost", "/var/log/libvirt/qemu"):
        b.path(d).mkdir(parents=True, exist_ok=True)
    if manifest is not None:
        b.path(str(SOCKETS / "vhost-net.json")).write_bytes(manifest)
    (base / "a-run-libvirt").mkdir(exist_ok=True)
    mounts = [f"mount --bind /run/libvirt {base}/a-run-libvirt"]
    mounts += [f"mount --bind {b.path(d)} {d}" for d in PRIVATE_DIRS]
    script = "set -e\n" + "\n".join(mounts) + "\nvirtlogd --daemon\nlibvirtd --daemon\n"
    sh(["ip", "link", "set", "lo", "up"])  # the migration stream goes over 127.0.0.1
    done = sh(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
              timeout=120)  # fmt: skip
    try:
        if done.returncode:
            raise RuntimeError(f"instance B did not start: {done.stderr.strip()}")
        pid = _read_pid_file(b.path("/run/libvirtd.pid"))
        if pid is None:
            raise RuntimeError(f"instance B's libvirtd wrote no {b.path('/run/libvirtd.pid')}")
        b = Instance(base, pid)
        caps = b.virsh("capabilities")
        if caps.returncode:
            raise RuntimeError(f"virsh -c {b.uri} capabilities: {caps.stderr.strip()}")
        yield b
    finally:
        running_b = b.virsh("list", "--name").stdout.split() if b.libvirtd_pid else []
        for name in running_b:
            b.virsh("destroy", name)
        _kill_pidfile(b.path("/run/libvirtd.pid"))
        _kill_pidfile(b.path("/run/virtlogd.pid"))
        # B's mounts go with its namespace, when its last process is gone


def _read_pid_file(path: Path, timeout: float = 30.0) -> int | None:
    """The pid in ``path`` once a daemonizing program has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    return None


def migrate(name: str, b: Instance, *, port: int = 49152,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``virsh migrate --live`` NAME from instance A to B (the reference's command line)."""
    return virsh("migrate", "--live", name, b.uri, "--migrateuri", f"tcp://127.0.0.1:{port}",
                 "--listen-address", "127.0.0.1", timeout=timeout)
