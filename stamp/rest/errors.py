"""Errors as the Blob service sends them.

Every refusal is a RestError: an HTTP status, the service's error code (sent
as `x-ms-error-code` and as the body's <Code>), its message, and the extra
elements some codes carry (HeaderName/HeaderValue, QueryParameterName/Value,
MaxLimit, AuthenticationErrorDetail). The stamp's own AzureErrors already
carry a code and a status and map one to one; any other StampError (a node
down, a full disk) is 503 ServerBusy, which clients retry. A HEAD answer has
the header only (the service sends no body on HEAD).
"""

from __future__ import annotations

from ..errors import AzureError, MetadataFull, NotEnoughNodes, StampError

MESSAGES = {
    "AuthenticationFailed": "Server failed to authenticate the request. Make sure the value of Authorization "
                            "header is formed correctly including the signature.",
    "AuthorizationFailure": "This request is not authorized to perform this operation.",
    "AuthorizationPermissionMismatch": "This request is not authorized to perform this operation using this "
                                       "permission.",
    "BlobAlreadyExists": "The specified blob already exists.",
    "BlobNotFound": "The specified blob does not exist.",
    "ConditionNotMet": "The condition specified using HTTP conditional header(s) is not met.",
    "ContainerAlreadyExists": "The specified container already exists.",
    "ContainerNotFound": "The specified container does not exist.",
    "CopySourceCannotBeIncrementalCopyBlob": "The copy source blob is an incremental copy blob.",
    "IncrementalCopyBlobMismatch": "The specified source blob is different than the copy source of the "
                                   "existing incremental copy blob.",
    "IncrementalCopyOfEarlierVersionSnapshotNotAllowed": "The specified snapshot is earlier than the last "
                                                         "snapshot copied into the incremental copy blob.",
    "IncrementalCopySourceMustBeSnapshot": "The source for incremental copy request must be a snapshot.",
    "InvalidBlobType": "The blob type is invalid for this operation.",
    "InvalidHeaderValue": "The value for one of the HTTP headers is not in the correct format.",
    "InvalidInput": "One of the request inputs is not valid.",
    "InvalidMetadata": "The metadata specified is invalid. It has characters that are not permitted.",
    "InvalidPageRange": "The page range specified is invalid.",
    "InvalidQueryParameterValue": "Value for one of the query parameters specified in the request URI is invalid.",
    "InvalidRange": "The range specified is invalid for the current size of the resource.",
    "InvalidResourceName": "The specifed resource name contains invalid characters.",
    "InvalidUri": "The requested URI does not represent any resource on the server.",
    "InvalidXmlDocument": "XML specified is not syntactically valid.",
    "InvalidXmlNodeValue": "The value for one of the XML nodes is not in the correct format.",
    "Md5Mismatch": "The MD5 value specified in the request did not match with the MD5 value calculated by "
                   "the server.",
    "MetadataTooLarge": "The size of the specified metadata exceeds the maximum size permitted.",
    "MissingRequiredHeader": "An HTTP header that's mandatory for this request is not specified.",
    "MissingRequiredQueryParameter": "A query parameter that's mandatory for this request is not specified.",
    "NoAuthenticationInformation": "Server failed to authenticate the request. Please refer to the information "
                                   "in the www-authenticate header.",
    "OperationNotAllowedOnIncrementalCopyBlob": "The specified operation is not allowed on an incremental "
                                                "copy blob.",
    "OutOfRangeInput": "One of the request inputs is out of range.",
    "PreviousSnapshotOperationNotSupported": "The operation is not supported on the previous snapshot.",
    "RequestBodyTooLarge": "The request body is too large and exceeds the maximum permissible limit.",
    "RequestTimeout": "The client did not send the request body in time.",
    "ResourceNotFound": "The specified resource does not exist.",
    "SequenceNumberConditionNotMet": "The sequence number condition specified was not met.",
    "SequenceNumberIncrementTooLarge": "The sequence number increment cannot be performed because it would "
                                       "result in overflow of the sequence number.",
    "ServerBusy": "The server is currently unable to receive requests. Please retry your request.",
    "SnapshotsPresent": "This operation is not permitted because the blob has snapshots.",
    "UnsupportedHeader": "One of the headers specified in the request is not supported.",
    "UnsupportedHttpVerb": "The resource doesn't support the specified HTTP verb.",
    "UnsupportedQueryParameter": "One of the query parameters specified in the request URI is not supported.",
}


class RestError(Exception):
    """A refusal: `status`, `code`, `message` and extra body elements."""

    def __init__(self, status: int, code: str, message: str | None = None, **extra: str) -> None:
        self.status, self.code = status, code
        self.message = message or MESSAGES.get(code, code)
        self.extra = extra
        self.headers: dict[str, str] = {}  # extra response headers (Content-Range of a 416)
        super().__init__(f"{status} {code}: {self.message}")


def header_error(name: str, value: str, code: str = "InvalidHeaderValue", status: int = 400) -> RestError:
    return RestError(status, code, HeaderName=name, HeaderValue=value[:256])


def missing_header(name: str) -> RestError:
    return RestError(400, "MissingRequiredHeader", HeaderName=name)


def query_error(name: str, value: str, reason: str = "") -> RestError:
    extra = {"QueryParameterName": name, "QueryParameterValue": value[:256]}
    if reason:
        extra["Reason"] = reason
    return RestError(400, "InvalidQueryParameterValue", **extra)


def from_stamp(e: StampError) -> RestError:
    """The answer for an error the stamp raised."""
    if isinstance(e, AzureError):
        detail = getattr(e, "detail", "")
        message = getattr(e, "message", None)
        extra = {"AuthenticationErrorDetail": detail} if e.code == "AuthenticationFailed" and detail else {}
        return RestError(e.status, e.code, message, **extra)
    if isinstance(e, (NotEnoughNodes, MetadataFull)):
        return RestError(503, "ServerBusy", f"{MESSAGES['ServerBusy']} ({e})")
    return RestError(500, "InternalError", f"The server encountered an internal error: {e}")
