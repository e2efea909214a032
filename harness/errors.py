"""The harness's errors, under kvhost's own tree so a test sees one family::

    KvhostError
     +-- ScenarioError        a step of a scenario, rig or load test failed; the message
     |    |                   names the step and carries the logs
     |    +-- ShimStartError  kvhost-shim exited instead of listening (harness.shim_process)
     +-- FrameNotSeen         an expected frame did not reach a tap (harness.netns)
"""

from __future__ import annotations

from kvhost.errors import KvhostError


class ScenarioError(KvhostError):
    """A scenario step failed; the message names the step and carries the logs."""
