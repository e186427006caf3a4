"""core.images: every kind of input decodes to the right size or fails with the right short reason."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import images
from core.breeds import STANFORD_DOGS
from core.errors import ConfigError, ImageDecodeError
from core.images import DEFAULT_MAX_PIXELS, decode_image, resize_array
from tests.fixtures.images import (
    AVIF_DECODED,
    SAMPLE_KINDS,
    encode,
    jpeg_bytes,
    make_synthetic_dataset,
    pattern_image,
    png_bytes,
    sample_images,
    two_colour_jpeg,
)

CATALOGUE = {s.kind: s for s in sample_images()}


@pytest.fixture(params=[True, False], ids=["simplejpeg", "pil_only"])
def backend(request, monkeypatch):
    """Run a test on the production path and on the PIL fallback alone."""
    if not request.param:
        monkeypatch.setattr(images, "simplejpeg", None)
    return request.param


@pytest.mark.parametrize("kind", SAMPLE_KINDS)
def test_every_kind_decodes_or_fails_with_its_reason(kind, backend):
    sample = CATALOGUE[kind]
    if sample.error is None:
        out = decode_image(sample.data, source=sample.filename)
        assert (out.width, out.height) == (sample.width, sample.height)
        assert out.array.shape == (sample.height, sample.width, 3)
        assert out.array.dtype == np.uint8
        sized = decode_image(sample.data, size=(32, 40))
        assert sized.array.shape == (32, 40, 3) and (sized.width, sized.height) == (out.width, out.height)
    else:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(sample.data, size=(32, 32), source=sample.filename)
        assert info.value.reason.startswith(sample.error)
        assert info.value.source == sample.filename
        assert sample.filename in str(info.value)


def test_exif_orientation_6_rotates_clockwise(backend):
    out = decode_image(two_colour_jpeg(64, 32, exif_orientation=6))
    assert (out.width, out.height) == (32, 64)
    top, bottom = out.array[:24].mean(axis=(0, 1)), out.array[-24:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, "red half must be on top after rotating 90° clockwise"
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_orientations_match_pil_exif_transpose(orientation):
    from PIL import ImageOps

    data = jpeg_bytes(80, 40, quality=95, exif_orientation=orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = decode_image(data).array
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).max() <= 2


def test_alpha_is_composited_on_white():
    out = decode_image(png_bytes(64, 48, mode="RGBA")).array
    assert (out[:, :30] == 255).all(), "fully transparent half must become white"
    assert out[:, 40:].min() < 255


def test_sixteen_bit_png_is_scaled_not_clipped():
    grey8 = np.asarray(pattern_image(64, 48).convert("L"))
    out = decode_image(png_bytes(64, 48, mode="I;16")).array
    assert np.abs(out[..., 0].astype(int) - grey8).max() <= 1
    assert (out[..., 0] == out[..., 2]).all()


def test_cmyk_jpeg_colours_survive():
    rgb = decode_image(jpeg_bytes(mode="RGB", quality=95)).array.astype(int)
    cmyk = decode_image(jpeg_bytes(mode="CMYK", quality=95)).array.astype(int)
    assert np.abs(rgb - cmyk).mean() < 12


def test_animated_gif_gives_first_frame():
    out = decode_image(CATALOGUE["animated_gif"].data).array
    assert out.mean() > 60, "first frame is the pattern; later frames are black"


def test_max_pixels_is_checked_before_decoding(backend):
    data = jpeg_bytes(64, 48)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(data, max_pixels=64 * 48 - 1)
    assert decode_image(data, max_pixels=64 * 48).width == 64
    assert DEFAULT_MAX_PIXELS >= 24_000_000  # phone photos must pass


def test_a_jpeg_is_held_to_the_pixels_it_is_decoded_at():
    """A 108 MP phone photo was "too many pixels" though it decodes at 1/8 of its size for a 224 px
    model: the limit applies to what is decoded. A full-size decode and other formats keep the
    full count."""
    data, png = jpeg_bytes(800, 600), png_bytes(800, 600)
    small = 800 * 600 // 10  # 1/4 of each side (50 x 37.5 = 1/16 of the pixels) fits, full size does not
    assert decode_image(data, size=(112, 112), max_pixels=small).array.shape == (112, 112, 3)
    for full in ({"size": None}, {"size": (600, 800)}):
        with pytest.raises(ImageDecodeError, match="too many pixels"):
            decode_image(data, max_pixels=small, **full)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(png, size=(112, 112), max_pixels=small)


def test_truncated_png_and_webp_are_errors():
    for data in (png_bytes(128, 96)[:-200], encode(pattern_image(128, 96), "WEBP")[:300]):
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data)
        assert info.value.reason in (images.REASON_TRUNCATED, images.REASON_CORRUPT)


def test_truncated_jpeg_never_passes_as_grey(backend):
    for keep in (0.3, 0.6, 0.9):
        data = jpeg_bytes(256, 192, quality=95)
        with pytest.raises(ImageDecodeError, match="truncated image"):
            decode_image(data[: int(len(data) * keep)], size=(64, 64))


@pytest.mark.parametrize("policy", ["resize_crop", "squash"])
def test_reduced_scale_decode_matches_full_decode(policy, backend):
    """DCT-domain downscaling (source ≥ 2× target) must give nearly the same pixels."""
    big = Image.fromarray(np.asarray(pattern_image(800, 600)))
    data = encode(big, "JPEG", quality=95)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = resize_array(full, (96, 112), policy).astype(int)
    got = decode_image(data, size=(96, 112), policy=policy).array.astype(int)
    assert got.shape == expected.shape == (96, 112, 3)
    assert np.abs(got - expected).mean() < 3 and np.abs(got - expected).max() < 40


def test_resize_policies():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :40] = 255  # left strip white: cropped away by resize_crop, kept by squash
    crop = resize_array(arr, (50, 50), "resize_crop")
    squash = resize_array(arr, (50, 50), "squash")
    assert crop.shape == squash.shape == (50, 50, 3)
    assert crop.max() == 0
    assert squash[:, :8].min() == 255
    with pytest.raises(ConfigError, match="resize policy"):
        resize_array(arr, (50, 50), "stretch")
    with pytest.raises(ConfigError):
        decode_image(jpeg_bytes(), policy="bogus")


def test_orientation_parser_ignores_broken_exif():
    assert images._jpeg_orientation(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00XXXXXXXX") == 1
    assert images._jpeg_orientation(two_colour_jpeg(exif_orientation=8)) == 8
    assert images._jpeg_orientation(jpeg_bytes()) == 1


def test_image_factory_fixture(image_factory):
    path = image_factory.file("exif_rotated_jpeg")
    assert path.exists() and decode_image(path.read_bytes()).height == 64
    written = image_factory.folder(["jpeg", "empty", "bomb_png"])
    assert {s.kind for s in written.values()} == {"jpeg", "empty", "bomb_png"}
    root = image_factory.dataset(num_classes=2, images_per_class=3)
    assert sorted(p.name for p in root.iterdir()) == [b.folder for b in STANFORD_DOGS[:2]]
    with pytest.raises(KeyError, match="unknown kind"):
        image_factory.sample("nope")


def test_synthetic_classes_are_separable(tmp_path):
    """A nearest-centroid rule on mean colour must already separate the classes, so tiny models learn them."""
    from core.datasets import discover

    ds = discover(make_synthetic_dataset(tmp_path / "ds", num_classes=6, images_per_class=6, size=32))
    feats = np.stack([decode_image(Path(p).read_bytes()).array.reshape(-1, 3).mean(0) for p in ds.paths])
    centroids = np.stack([feats[ds.labels == c].mean(0) for c in range(6)])
    predicted = np.argmin(((feats[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == ds.labels).mean() >= 0.9


@pytest.mark.parametrize("brand, reason", [
    (b"heic", "unsupported format (HEIF)"), (b"mif1", "unsupported format (HEIF)"),
    (b"avif", "corrupt image" if AVIF_DECODED else "unsupported format (AVIF)"),  # a header, no image in it
])
def test_a_phone_photo_pil_cannot_read_is_named(brand, reason, backend):
    """An iPhone's HEIC photo saved as .jpg said "not an image"; its header names the format."""
    head = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(ImageDecodeError) as info:
        decode_image(head, size=(32, 32), source="IMG_0001.jpg")
    assert info.value.reason == reason


@pytest.mark.skipif(not AVIF_DECODED, reason="this Pillow has no libavif: AVIF is refused, by name")
def test_an_avif_is_decoded_where_pillow_can():
    """AVIF photos (what recent phones and browsers save) were refused, "unsupported format (AVIF)",
    though Pillow decodes them: they are labelled, oriented like a JPEG, and a bad one gets its reason."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32], arr[:, 32:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "AVIF", quality=90, exif=exif)
    out = decode_image(data)
    assert (out.width, out.height) == (32, 64)
    top, bottom = out.array[:24].mean(axis=(0, 1)), out.array[-24:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert decode_image(data, size=(16, 16)).array.shape == (16, 16, 3)
    hevc = data.replace(b"av01", b"hvc1").replace(b"av1C", b"hvcC")  # a HEIF's image item in an AVIF's box
    cases = {data[:-30]: "truncated image", hevc: "corrupt image",  # libavif: RuntimeError, not a traceback
             hevc[:8] + b"mif1" + hevc[12:16] + b"mif1heic" + hevc[24:]: "unsupported format (HEIF)"}
    for bad, reason in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(bad, size=(32, 32), source="IMG_0002.avif")
        assert info.value.reason == reason
