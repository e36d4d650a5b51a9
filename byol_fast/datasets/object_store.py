"""Reading a local path or an ``s3://bucket/key`` URL the same way, with one-line errors and time-outs.

Shard sets (``byol_fast.datasets.shard_set``) live in a folder or under an S3 prefix. Their small
files (the manifest, index files, a few tar headers) are read here; the images themselves are read
by DALI, whose readers take ``s3://`` URLs too. Both find the endpoint and credentials the standard
AWS way: ``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in ``~/.aws/config``), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE`` and ``~/.aws/credentials``), ``AWS_REGION``. byol_fast
never takes them from its own config and never prints them.

Every network call has a time-out (connect 5 s, read 20 s, one retry), so an endpoint that does
not answer is an error within seconds, never a hang. Errors are :class:`StoreError` (a
``DatasetError``), one line naming the URL and what to check.
"""
from __future__ import annotations

import os
from functools import lru_cache

from byol_fast.errors import DatasetError

S3 = "s3://"
CONNECT_TIMEOUT_S, READ_TIMEOUT_S, ATTEMPTS = 5, 20, 2  # attempts in all: one retry


class StoreError(DatasetError):
    """A location that cannot be read: missing, unreachable, or refused; the message names it."""


def is_s3(path: str | os.PathLike) -> bool:
    return str(path).startswith(S3)


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` for a folder or an S3 prefix."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def parent(path: str | os.PathLike) -> str:
    """The folder (or S3 prefix) holding ``path``."""
    path = str(path).rstrip("/")
    if is_s3(path):
        head, _, _ = path.rpartition("/")
        return head if len(head) > len(S3) else path
    return os.path.dirname(os.path.abspath(path))


def split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = url[len(S3):].partition("/")
    if not bucket:
        raise StoreError(f"{url}: not an S3 URL (s3://bucket/prefix)")
    return bucket, key


@lru_cache(maxsize=1)
def _client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - boto3 is in requirements.txt
        raise StoreError("reading s3:// needs boto3 (pip install boto3)") from None
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"max_attempts": ATTEMPTS, "mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def _endpoint() -> str:
    try:
        return _client().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only for a message
        return "the default AWS endpoint"


def _s3_error(url: str, e: Exception) -> StoreError:
    """One line for what boto3 raised while reading ``url``; never the credentials."""
    from botocore import exceptions as bx

    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StoreError(f"{url}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(or AWS_PROFILE with ~/.aws/credentials)")
    if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError
                  | bx.ConnectionClosedError):
        return StoreError(f"{url}: the S3 endpoint {_endpoint()} does not answer ({type(e).__name__}); "
                          "check AWS_ENDPOINT_URL and the network")
    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        bucket, _ = split_s3(url)
        if code == "NoSuchBucket":
            return StoreError(f"{url}: no bucket {bucket!r} at {_endpoint()}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
            return StoreError(f"{url}: access refused by {_endpoint()} ({code}): check the AWS credentials")
        return StoreError(f"{url}: S3 error {code or type(e).__name__}")
    if isinstance(e, bx.BotoCoreError):
        return StoreError(f"{url}: {type(e).__name__}: {e}")
    raise e


def _missing(e: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound")


def size(path: str) -> int | None:
    """Bytes of a file or object; None if there is none."""
    if not is_s3(path):
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: {e.strerror}") from None
    bucket, key = split_s3(path)
    try:
        return int(_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as e:  # noqa: BLE001 - mapped to one line
        if _missing(e):
            _check_bucket(path)
            return None
        raise _s3_error(path, e) from None


def _check_bucket(url: str) -> None:
    """A missing key reads as 404 whether or not its bucket exists: tell the two apart."""
    bucket, _ = split_s3(url)
    try:
        _client().head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001
        if _missing(e):
            raise StoreError(f"{url}: no bucket {bucket!r} at {_endpoint()}") from None
        raise _s3_error(url, e) from None


def read(path: str, start: int = 0, length: int | None = None) -> bytes:
    """Bytes of a file or object (``length`` bytes from ``start``, or all of it); a StoreError
    naming ``path`` when it is missing or cannot be read."""
    data = read_if_there(path, start, length)
    if data is None:
        raise StoreError(f"{path}: missing")
    return data


def read_if_there(path: str, start: int = 0, length: int | None = None) -> bytes | None:
    """:func:`read`, but None for a file or object that is not there (one request, not two)."""
    if not is_s3(path):
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: cannot be read ({e.strerror})") from None
    bucket, key = split_s3(path)
    extra = {} if start == 0 and length is None else {
        "Range": f"bytes={start}-" + ("" if length is None else str(start + length - 1))}
    try:
        return _client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    except Exception as e:  # noqa: BLE001 - mapped to one line
        if _missing(e):
            _check_bucket(path)
            return None
        raise _s3_error(path, e) from None


def listing(folder: str, suffix: str) -> list[str]:
    """Names (not paths) of the files directly in a folder or under an S3 prefix ending in ``suffix``."""
    if not is_s3(folder):
        try:
            return sorted(n for n in os.listdir(folder) if n.endswith(suffix))
        except OSError as e:
            raise StoreError(f"{folder}: {e.strerror}") from None
    bucket, key = split_s3(folder)
    prefix = key.rstrip("/") + "/" if key else ""
    names = []
    try:
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [o["Key"][len(prefix):] for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
    except Exception as e:  # noqa: BLE001 - mapped to one line
        raise _s3_error(folder, e) from None
    return sorted(names)
