"""Image sources -> checked bytes, a content hash and a decoded picture.

An image arrives as a data URL, raw base64, or an absolute file path. Every
way in ends as the same bytes, so the same picture hashes the same however it
was sent, and a file overwritten in place hashes differently. Limits are
checked before the expensive step they guard: the byte size before reading or
base64-decoding, the pixel count from the header before decoding pixels.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from .. import errors, files
from ..errors import WorkerError

DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024

_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=\-_\s]+")
# Leading bytes of common formats: data that starts like an image but does not
# open is corrupt rather than "not an image".
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = DEFAULT_MAX_IMAGES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES


@dataclass
class ImageInput:
    """One image of a prompt: its bytes and their hash; decoded on demand."""

    field: str  # where it came from, e.g. params.messages[0].content[1].image
    data: bytes
    sha256: str


def image_error(field: str, reason: str, message: str) -> WorkerError:
    return WorkerError(errors.IMAGE_INVALID, f"{message} - at `{field}`", {"field": field, "reason": reason})


def read_image(source: str, field: str, limits: ImageLimits) -> ImageInput:
    """The bytes an image source names, within the byte limit, and their hash."""
    if _DATA_URL.match(source):
        data = _from_data_url(source, field, limits)
    elif source.startswith("file://"):
        data = _from_path(_file_url_path(source, field), field, limits)
    elif _is_path(source):
        data = _from_path(source, field, limits)
    elif re.match(r"^[a-z][a-z0-9+.-]*://", source, re.IGNORECASE):
        raise image_error(
            field, "unsupported_source",
            "URLs are not fetched; send the image as a data URL, base64, or an absolute file path",
        )
    else:
        data = _from_base64(source, field, limits)
    if not data:
        raise image_error(field, "empty", "the image is empty")
    return ImageInput(field=field, data=data, sha256=hashlib.sha256(data).hexdigest())


def _is_path(source: str) -> bool:
    # Base64 may start with "/" too (every JPEG's does: "/9j/"): an absolute
    # path is one that exists, or that is too short or has characters to be
    # an image in base64.
    if len(source) > 4096 or not os.path.isabs(source):
        return False
    return len(source) < 64 or os.path.exists(source) or not _BASE64_TEXT.fullmatch(source)


def _file_url_path(source: str, field: str) -> str:
    parsed = urlparse(source)
    if parsed.netloc not in ("", "localhost"):
        raise image_error(field, "unsupported_source", f"file URLs must name a local file: {source!r}")
    return unquote(parsed.path)


def _too_large(field: str, size: int, limits: ImageLimits) -> WorkerError:
    return image_error(
        field, "too_many_bytes",
        f"the image is {size} bytes; the limit is {limits.max_bytes} (load option `max_image_bytes`)",
    )


def _from_path(path: str, field: str, limits: ImageLimits) -> bytes:
    try:
        data = files.read_regular(files.check_path(path), limits.max_bytes)
    except files.PathProblem as exc:
        raise image_error(field, exc.reason, f"image: {exc.message}") from None
    except files.FileTooLarge as exc:
        raise _too_large(field, exc.size, limits) from None
    if len(data) > limits.max_bytes:
        raise _too_large(field, len(data), limits)
    return data


def _from_data_url(source: str, field: str, limits: ImageLimits) -> bytes:
    match = _DATA_URL.match(source)
    assert match is not None
    params = [p.strip().lower() for p in match.group(2).split(";") if p.strip()]
    if "base64" not in params:
        raise image_error(field, "not_base64", "data URLs must be base64-encoded (`data:image/png;base64,...`)")
    return _from_base64(source[match.end():], field, limits, in_data_url=True)


def _from_base64(text: str, field: str, limits: ImageLimits, in_data_url: bool = False) -> bytes:
    # Size from the encoded length first: never decode more than the limit.
    if len(text) // 4 * 3 > limits.max_bytes + 2:
        compact = "".join(text.split())  # MIME line breaks do not count
        if len(compact) // 4 * 3 > limits.max_bytes + 2:
            raise _too_large(field, len(compact) // 4 * 3, limits)
    data = _b64decode(text)
    if data is None:
        if in_data_url:  # never a path, whatever it looks like
            raise image_error(field, "not_base64", "the data URL's payload is not valid base64")
        if _looks_like_path(text):
            raise image_error(field, "relative_path", f"image paths must be absolute: {text!r}")
        raise image_error(
            field, "unsupported_source",
            "the image is not a data URL, valid base64, or an absolute file path",
        )
    if len(data) > limits.max_bytes:
        raise _too_large(field, len(data), limits)
    return data


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)  # the common case, fast
    except (binascii.Error, ValueError):
        pass
    compact = "".join(text.split())
    if "=" not in compact and len(compact) % 4 in (2, 3):
        compact += "=" * (-len(compact) % 4)  # unpadded base64 (as in JWTs, many encoders)
    for altchars in (None, b"-_"):  # line breaks; the URL-safe alphabet
        try:
            return base64.b64decode(compact, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


def _looks_like_path(text: str) -> bool:
    return len(text) < 4096 and (
        text.startswith(("./", "../", "~")) or "/" in text or "\\" in text or bool(re.search(r"\.[A-Za-z0-9]{2,5}$", text))
    )


def decode_image(image: ImageInput, limits: ImageLimits):
    """Decode to an RGB PIL image, refusing pixel bombs before decoding pixels."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    field = image.field
    # PIL's own guard, at our limit, as a second line behind the header check.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(image.data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise _pixel_error(field, width, height, limits)
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                img = _to_rgb(img)
    except WorkerError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _pixel_error(field, *_header_size(image.data), limits) from None
    except UnidentifiedImageError:
        if image.data.startswith(_IMAGE_MAGIC):
            raise image_error(field, "corrupt", "the image data is corrupt") from None
        raise image_error(field, "not_an_image", "the data is not an image in a format this worker can read") from None
    except MemoryError:
        raise WorkerError(errors.OUT_OF_MEMORY, f"out of memory while decoding the image at `{field}`", {"field": field})
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError...
        raise image_error(field, "corrupt", f"the image could not be decoded: {exc}") from None
    if img.width < 1 or img.height < 1:
        raise image_error(field, "corrupt", "the image has no pixels")
    return img


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white rather than letting transparent pixels turn black.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:
        return (0, 0)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _pixel_error(field: str, width: int, height: int, limits: ImageLimits) -> WorkerError:
    return image_error(
        field, "too_many_pixels",
        f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} "
        "(load option `max_image_pixels`)",
    )
