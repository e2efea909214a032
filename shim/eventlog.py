"""The shim's log: connection events as structured records, one formatter for every line.

Events (:func:`event`) are ordinary ``logging`` records on the ``kvhost.shim`` logger that
carry their fields in ``record.kvhost_event``; every other kvhost record (the session's own
lines, errors) goes through the same :class:`EventFormatter`, so the stream is uniform:

* ``text``: ``kvhost-shim: <message>``, one line per record. An event's message already
  names its socket, peer, version and result, so the text form loses nothing.
* ``json``: one JSON object per line, always with the keys of :data:`KEYS` (``null`` when a
  key does not apply) plus any extra field the event carries (``tap``, ``uid``...). A record
  that is not an event has ``event`` = ``"log"``; a ``connection N:`` prefix of its message
  fills ``connection``.

When stderr is the journal (systemd sets ``JOURNAL_STREAM=DEV:INO`` for a service whose
stderr is a journal stream, and those numbers match ``fstat`` of the stream), every line
starts with its syslog priority, ``<3>`` for an error down to ``<7>`` for debug (sd-daemon(3)),
so ``journalctl -p err`` finds the shim's errors; anywhere else lines carry no prefix.

Event names: ``listening``, ``accepted``, ``refused``, ``version``, ``closed``,
``stopping``, ``stopped``, ``tap``, ``privileges``, ``error``; for the listener,
``accept_paused`` (out of fds or memory: ``result`` ``paused: EMFILE`` and the like, logged
once per shortage at error level; peers wait in the backlog) and ``accept_resumed``
(``result`` ``resumed``, accepting again); per connection, what it did to the kernel
device: ``features`` (each SET_FEATURES: ``features``; the first at info level, the
rest debug), ``vring_base`` (``request`` GET_VRING_BASE -- a ring stopped, with ``took_us``,
the time from the request to its reply being ready -- or, at debug, SET_VRING_BASE; ``vring``,
``base``), ``dirty_log`` (``bytes`` mapped), ``rarp`` (``mac`` announced), ``vring`` (``vring``
started, ``result`` ``running``, ``start_us``: microseconds since the first ring message of
this start) and ``devices`` (SET_OWNER opened ``tap`` and ``devices``
vhost-net devices; ``features``: the kernel's).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from typing import Any, Literal, TextIO

log = logging.getLogger("kvhost.shim")

#: keys every JSON line has, in this order
KEYS = (
    "time",
    "level",
    "event",
    "socket",
    "connection",
    "peer_pid",
    "peer_uid",
    "peer_gid",
    "version",
    "result",
    "message",
)
LOG_FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]
_CONNECTION_PREFIX = re.compile(r"^(connection \d+): ")
#: logging level -> syslog priority (sd-daemon(3)'s SD_ERR... prefixes)
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7


def priority(level: int) -> int:
    """The syslog priority of a logging level (CRITICAL 2, ERROR 3, WARNING 4, INFO 6, else 7)."""
    for at_least, prio in _PRIORITIES:
        if level >= at_least:
            return prio
    return _DEBUG_PRIORITY


def is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd named in ``JOURNAL_STREAM``.

    The variable is inherited by children whose stderr may be redirected elsewhere, so it
    counts only when its device and inode are the stream's own (systemd.exec(5)).
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no fd (a StringIO)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def event(kind: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log event ``kind`` with human ``message`` and structured ``fields`` (JSON keys)."""
    if log.isEnabledFor(level):
        log.log(level, "%s", message, extra={"kvhost_event": {"event": kind, **fields}})


class EventFormatter(logging.Formatter):
    """Renders records as ``text`` or ``json`` (see the module docstring).

    ``socket`` is the shim's socket: the default ``socket`` of every JSON line (one shim
    serves one socket), settable once the socket is known. ``journal`` puts the record's
    syslog priority (``<3>``...) in front of each line, for journald.
    """

    def __init__(
        self, style: LogFormat = "text", socket: str | None = None, *, journal: bool = False
    ) -> None:
        if style not in LOG_FORMATS:
            raise ValueError(f"log format {style!r} is not one of {', '.join(LOG_FORMATS)}")
        super().__init__()
        self.style = style
        self.socket = socket
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = self._format(record)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line

    def _format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message = f"{message}\n{record.exc_text}"
        if self.style == "text":
            return f"kvhost-shim: {message}"
        out: dict[str, Any] = dict.fromkeys(KEYS)
        out["socket"] = self.socket
        fields = getattr(record, "kvhost_event", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["event"] = "log"
            m = _CONNECTION_PREFIX.match(message)
            if m:
                out["connection"] = m.group(1)
        out["time"] = (
            datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        out["level"] = record.levelname.lower()
        out["message"] = message
        return json.dumps(out, default=str)


def configure(style: LogFormat, *, verbose: bool, stream: TextIO | None = None) -> logging.Handler:
    """Send the log to ``stream`` (stderr) through one :class:`EventFormatter`; returns the
    handler (installed on the root logger, so libraries' warnings come out in the same
    format; remove it with :func:`unconfigure`).

    ``verbose`` turns on the shim's debug lines, not the libraries' (pyroute2's netlink
    traces would bury them). Lines get journald's priority prefixes when the stream is the
    journal (:func:`is_journal`).
    """
    kvhost = logging.getLogger("kvhost")
    out = stream if stream is not None else sys.stderr
    handler = _EventHandler(out, kvhost.level)
    handler.setFormatter(EventFormatter(style, journal=is_journal(out)))
    logging.getLogger().addHandler(handler)
    kvhost.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler


class _EventHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure` installs; remembers the ``kvhost`` logger's level from
    before, for :func:`unconfigure`."""

    def __init__(self, stream: TextIO, level_before: int) -> None:
        super().__init__(stream)
        self.level_before = level_before


def unconfigure(handler: logging.Handler) -> None:
    """Undo :func:`configure`: the handler removed and closed, the ``kvhost`` logger's level
    back to what it was (the program is done; tests call main() repeatedly)."""
    logging.getLogger().removeHandler(handler)
    handler.close()
    if isinstance(handler, _EventHandler):
        logging.getLogger("kvhost").setLevel(handler.level_before)


def formatter_of(handler: logging.Handler) -> EventFormatter:
    """The :class:`EventFormatter` :func:`configure` installed on ``handler``."""
    formatter = handler.formatter
    if not isinstance(formatter, EventFormatter):
        raise TypeError("the handler was not made by eventlog.configure")
    return formatter
