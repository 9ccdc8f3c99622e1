"""The host's errors: a request the platform would refuse, or a bad setting.

Where the compute platform has an error code for a refusal, the error class
carries it (`code`) and the message uses the platform's wording first, then
names the thing and the fix; the CLI prints "CODE: message".
"""

from __future__ import annotations


class HostError(Exception):
    """Base class for everything hostcache raises on purpose."""

    code: str | None = None

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.code}: {text}" if self.code else text


class UnknownTier(HostError):
    """No published tier or VM size matches the request."""


class InvalidPerformance(HostError):
    """Provisioned IOPS or MB/s outside what the disk type allows for its size."""


class HostRuleError(HostError):
    """A request the compute platform would refuse (LUN in use, too many disks...)."""


class InvalidParameter(HostRuleError):
    """A parameter outside what the platform accepts (a LUN out of range, a bad caching value)."""

    code = "InvalidParameter"


class ConflictingUserInput(HostRuleError):
    """The request conflicts with the resource's state (a disk attached elsewhere)."""

    code = "ConflictingUserInput"


class OperationNotAllowed(HostRuleError):
    """A rule of the platform forbids the operation (caching, OS disk size, disk type as OS disk)."""

    code = "OperationNotAllowed"

