"""The one image decode path: bytes -> RGB uint8 array, used by training, predict, labelling and UI.

Why one path: a model only sees at inference what it saw in training, so orientation, colour
conversion, alpha handling and the resize policy must be identical everywhere.

- Formats: JPEG, PNG, GIF (first frame), WebP, BMP, and AVIF where Pillow has libavif (its wheels
  since 11.3); anything else is refused with a short reason (a HEIC photo: "unsupported format (HEIF)").
- EXIF orientation is applied; CMYK, palette, grey, alpha (composited on white) and 16-bit → RGB.
- The pixel count is checked from the header before any pixel is decoded (decompression bombs):
  for a JPEG the count it is decoded at (1/8 to 8/8 of its size, below), so a 108 MP phone photo
  labels; for the others their full count (DEFAULT_MAX_PIXELS, 64 MP).
- JPEGs at least 2× the target are decoded at reduced scale in the DCT domain (libjpeg-turbo
  scaling via simplejpeg; PIL `Image.draft` is the fallback for CMYK and anything simplejpeg
  refuses). `python -m bench.decode_throughput ../shared/data/sample_bucket` on one core of the
  shared 2-core machine, to 224: simplejpeg path ~397 img/s per CPU-second vs PIL draft ~350-361,
  PIL full decode ~318; a 12 MP JPEG: 47 img/s vs 7 img/s with a full decode.
- Truncated files are errors, never half-grey images.

`size` is always (height, width). Errors are `ImageDecodeError(reason)` with `reason` one of the
REASON_* constants of core.reasons (the text that goes into a label row's `error` column).
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, UnidentifiedImageError, features

from core.errors import ConfigError, ImageDecodeError
from core.formats import OPTIONAL_PIL_FORMATS, PIL_FORMATS
from core.reasons import (REASON_CORRUPT, REASON_EMPTY, REASON_NOT_IMAGE, REASON_TOO_MANY_PIXELS, REASON_TRUNCATED,
                          REASON_UNSUPPORTED)

try:  # optional accelerator; PIL alone decodes everything
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

# Never turn a truncated file into a half-grey image (Pillow's default; restated on purpose).
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 64_000_000
RESIZE_CROP = "resize_crop"
SQUASH = "squash"
RESIZE_POLICIES = (RESIZE_CROP, SQUASH)


def _decoded_formats() -> tuple[str, ...]:
    """PIL_FORMATS, and each optional one this Pillow has the codec for: a phone's AVIF photo is
    labelled where it can be decoded, and refused with its format's name where it cannot."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an older Pillow warns about a feature it does not know
        return PIL_FORMATS + tuple(f for f in OPTIONAL_PIL_FORMATS if features.check(f.lower()))


DECODED_FORMATS = _decoded_formats()

_RESAMPLE = Image.Resampling.BILINEAR
# EXIF orientation -> PIL transpose (same table as PIL.ImageOps.exif_transpose).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_SWAPS_AXES = (5, 6, 7, 8)


@dataclass(frozen=True)
class DecodedImage:
    """`array` is RGB uint8 [H, W, 3] (already resized when a size was asked for; may be
    read-only: copy before writing into it); `width`/`height` are the ORIGINAL size after EXIF
    orientation."""

    array: np.ndarray
    width: int
    height: int


def decode_image(data: bytes, *, size: tuple[int, int] | None = None, policy: str = RESIZE_CROP,
                 max_pixels: int = DEFAULT_MAX_PIXELS, source: str | None = None) -> DecodedImage:
    """Decode image bytes to RGB uint8, optionally resized to `size` = (height, width)."""
    _check_policy(policy)
    if not data:
        raise ImageDecodeError(REASON_EMPTY, source)
    if simplejpeg is not None and data[:3] == b"\xff\xd8\xff":
        decoded = _decode_simplejpeg(data, size, policy, max_pixels, source)
        if decoded is not None:
            return decoded
    return _decode_pil(data, size, policy, max_pixels, source)


def resize_array(arr: np.ndarray, size: tuple[int, int], policy: str = RESIZE_CROP) -> np.ndarray:
    """Resize an already-decoded RGB uint8 [H, W, 3] array to `size` = (height, width)."""
    _check_policy(policy)
    return np.asarray(_resize(Image.fromarray(np.ascontiguousarray(arr)), size, policy))


def _check_policy(policy: str) -> None:
    if policy not in RESIZE_POLICIES:
        raise ConfigError(f"resize policy {policy!r} is unknown; use one of {', '.join(RESIZE_POLICIES)}")


def _resize(im: Image.Image, size: tuple[int, int], policy: str) -> Image.Image:
    """"resize_crop": scale the short side to the target and centre-crop; "squash": plain resize.

    The crop is done by `resize(box=...)`, i.e. resampling straight from the central region."""
    th, tw = int(size[0]), int(size[1])
    w, h = im.size
    if (w, h) == (tw, th):
        return im
    box = None
    if policy == RESIZE_CROP:
        scale = max(th / h, tw / w)
        cw, ch = tw / scale, th / scale
        left, top = max(0.0, (w - cw) / 2), max(0.0, (h - ch) / 2)
        box = (left, top, min(float(w), left + cw), min(float(h), top + ch))
    return im.resize((tw, th), _RESAMPLE, box=box)


def _needed_scale(width: int, height: int, size: tuple[int, int] | None, policy: str) -> tuple[float, float]:
    """Smallest (x, y) scale factors of the oriented image that still cover the target."""
    if size is None:
        return 1.0, 1.0
    th, tw = size
    if policy == RESIZE_CROP:
        s = max(th / height, tw / width)
        return s, s
    return tw / width, th / height


def _decode_simplejpeg(data, size, policy, max_pixels, source) -> DecodedImage | None:
    """Fast path for YCbCr/grey JPEGs; None means "let PIL do it" (CMYK, odd or broken files)."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    orientation = _jpeg_orientation(data)
    ow, oh = (h, w) if orientation in _SWAPS_AXES else (w, h)
    sx, sy = _needed_scale(ow, oh, size, policy)
    if orientation in _SWAPS_AXES:
        sx, sy = sy, sx
    min_w, min_h = (int(np.ceil(w * sx)), int(np.ceil(h * sy))) if size else (0, 0)
    decoded = _dct_scaled(w, h, min_w, min_h) if size else (w, h)
    _check_pixels(*decoded, max_pixels, source)  # what is decoded: a 108 MP phone photo labels
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=True)
    except ValueError:
        return None  # PIL decodes it again and names the problem precisely
    im = Image.fromarray(arr)
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    if size is not None:
        im = _resize(im, size, policy)
    return DecodedImage(np.asarray(im), ow, oh)


def _dct_scaled(width: int, height: int, min_width: int, min_height: int) -> tuple[int, int]:
    """The size libjpeg-turbo decodes a JPEG at for a wanted minimum: the smallest of its M/8 scales
    that covers it (the pixel limit is on what is decoded, not on the file's full size)."""
    for m in range(1, 8):
        scaled = -(-width * m // 8), -(-height * m // 8)
        if scaled[0] >= min_width and scaled[1] >= min_height:
            return scaled
    return width, height


def _decode_pil(data, size, policy, max_pixels, source) -> DecodedImage:
    im = _open_pil(data, source)
    ow, oh = im.size
    orientation = _pil_orientation(im)
    if orientation in _SWAPS_AXES:
        ow, oh = oh, ow
    _check_pixels(ow, oh, max_pixels, source)
    if isinstance(im, JpegImagePlugin.JpegImageFile) and size is not None:  # MPO too
        sx, sy = _needed_scale(ow, oh, size, policy)
        if orientation in _SWAPS_AXES:
            sx, sy = sy, sx
        im.draft("RGB", (int(np.ceil(im.width * sx)), int(np.ceil(im.height * sy))))
    _load(im, source)
    if orientation in _TRANSPOSE:
        im = im.transpose(_TRANSPOSE[orientation])
    im = _to_rgb(im)
    if size is not None:
        im = _resize(im, size, policy)
    return DecodedImage(np.asarray(im), ow, oh)


def _open_pil(data: bytes, source: str | None) -> Image.Image:
    """Open (header only) with the allowed plugins; say *why* when it is refused."""
    iso = _iso_media_format(data)
    if iso is not None and iso not in DECODED_FORMATS:  # a HEIF never reaches libavif (it accepts brand mif1)
        raise ImageDecodeError(f"{REASON_UNSUPPORTED} ({iso})", source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageDecodeError(REASON_TOO_MANY_PIXELS, source) from None
    except UnidentifiedImageError:
        pass
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, RuntimeError) as exc:  # libavif: RuntimeError
        raise ImageDecodeError(_reason_from(exc), source) from None
    try:  # header sniff only: a known format that we do not accept gets a clearer reason
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other = Image.open(io.BytesIO(data))
        fmt = other.format
    except Exception:  # noqa: BLE001 - anything here just means "not an image"
        fmt = None
    fmt = fmt or iso
    if fmt in DECODED_FORMATS:  # a format we decode, whose header its plugin could not parse
        raise ImageDecodeError(REASON_CORRUPT, source)
    if fmt:
        raise ImageDecodeError(f"{REASON_UNSUPPORTED} ({fmt})", source)
    raise ImageDecodeError(REASON_TRUNCATED if _looks_like_truncated_header(data) else REASON_NOT_IMAGE, source)


# ISO base media file brands of still images: a phone's HEIC photo saved as .jpg was "not an
# image", which sends people looking for corruption instead of a converter
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx")
_GENERIC_BRANDS = (b"mif1", b"msf1")  # any HEIF-family still image: its compatible brands say which codec
_AVIF_BRANDS = (b"avif", b"avis")


def _iso_media_format(data: bytes) -> str | None:
    """"HEIF" or "AVIF" from an ISO base media file's `ftyp` box, else None; a file whose major
    brand is the generic mif1/msf1 is AVIF if it lists an AVIF brand among its compatible ones."""
    if data[4:8] != b"ftyp":
        return None
    brand = data[8:12]
    if brand in _AVIF_BRANDS:
        return "AVIF"
    if brand in _HEIF_BRANDS:
        return "HEIF"
    if brand not in _GENERIC_BRANDS:
        return None
    end = min(int.from_bytes(data[:4], "big"), len(data), 1024)
    compatible = {data[i:i + 4] for i in range(16, end - 3, 4)}
    return "AVIF" if compatible & set(_AVIF_BRANDS) else "HEIF"


def _looks_like_truncated_header(data: bytes) -> bool:
    """A file that starts like a supported image but whose header PIL could not even parse."""
    return (data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a"))
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def _load(im: Image.Image, source: str | None) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except Image.DecompressionBombError:
        raise ImageDecodeError(REASON_TOO_MANY_PIXELS, source) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, RuntimeError) as exc:
        raise ImageDecodeError(_reason_from(exc), source) from None


def _reason_from(exc: BaseException) -> str:
    text = str(exc).lower()
    if "truncated" in text or "premature end" in text or isinstance(exc, EOFError):
        return REASON_TRUNCATED
    if "unsupported" in text or "not supported" in text:
        return REASON_UNSUPPORTED
    return REASON_CORRUPT


def _check_pixels(width: int, height: int, max_pixels: int, source: str | None) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(REASON_TOO_MANY_PIXELS, source)


def _pil_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not make a good image undecodable
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit grey scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) from a JPEG's APP1 segment without decoding anything; 1 if none."""
    pos, end = 2, min(len(data), 1 << 20)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: no more metadata
            return 1
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10:pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
        for i in range(count):
            entry = ifd + 2 + 12 * i
            tag, typ = struct.unpack(order + "HH", tiff[entry:entry + 4])
            if tag == 0x0112 and typ == 3:
                (value,) = struct.unpack(order + "H", tiff[entry + 8:entry + 10])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1
