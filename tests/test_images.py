import io

import numpy as np
import pytest
from PIL import Image

from conftest import draw_map
from datasette_mapclip.model.images import ImageDecodeError, open_image


def encoded(image, fmt, **kwargs):
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def test_draft_mode_decodes_big_jpegs_at_a_reduced_scale():
    big = encoded(draw_map(1, size=(2000, 1500)), "JPEG")
    image = open_image(big, min_size=224)
    assert image.mode == "RGB"
    assert min(image.size) >= 224 and image.size[0] <= 1000  # 1/4 scale: 500 x 375
    assert open_image(big).size == (2000, 1500)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML page"),
        (b'{"error": "no"}', "JSON"),
        (b"%PDF-1.4 ...", "PDF"),
        (b"\x00\x01garbage", "not an image"),
    ],
)
def test_non_images_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        open_image(data)


def test_truncated_jpeg_is_refused():
    data = encoded(draw_map(2), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated|cannot decode"):
        open_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated image"):
        open_image(data[:600])  # cut inside the header


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("1", (20000, 12000)), "PNG")  # 240 Mpx in a few KB
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        open_image(bomb)
    with pytest.raises(ImageDecodeError, match="too many pixels: 300x200"):
        open_image(encoded(draw_map(3, (300, 200)), "PNG"), max_pixels=1000)


def test_odd_modes_become_rgb():
    cmyk = open_image(encoded(draw_map(4).convert("CMYK"), "JPEG"))
    assert cmyk.mode == "RGB"
    transparent = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    assert open_image(encoded(transparent.convert("P"), "PNG")).getpixel((5, 5)) == (255, 255, 255)
    sixteen = Image.new("I;16", (40, 30), 65535)
    assert open_image(encoded(sixteen, "PNG")).getpixel((1, 1)) == (255, 255, 255)
    grey16 = Image.new("I;16", (40, 30), 32768)
    assert open_image(encoded(grey16, "PNG")).getpixel((1, 1))[0] in (127, 128)


def test_exif_rotation_is_applied():
    image = draw_map(5, (60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    assert open_image(encoded(image, "JPEG", exif=exif)).size == (40, 60)


@pytest.mark.parametrize("data,kind", [
    (b"PK\x03\x04SECRET-payload" + bytes(200), "looks like a ZIP archive"),
    (b"\x1f\x8b\x08SECRET-payload", "looks like a gzip file"),
    (b'<?xml version="1.0"?><svg>SECRET-payload</svg>', "looks like XML or SVG"),
    (b"name,password\nadmin,SECRET-payload\n", "looks like a text file (35 bytes)"),
    (b"\x00\x01SECRET-payload\xff\xfe", "unrecognised binary data (18 bytes)"),
])
def test_non_image_reasons_name_the_kind_and_never_quote_the_bytes(data, kind):
    """Reasons land in load_errors, which is published: a file's content must not."""
    with pytest.raises(ImageDecodeError) as caught:
        open_image(data)
    reason = str(caught.value)
    assert reason.startswith(f"not an image: {kind}")
    assert "SECRET" not in reason and "\\x" not in reason


def test_pillow_messages_that_quote_header_bytes_are_cleaned():
    from datasette_mapclip.model.images import _decode_error

    error = _decode_error(SyntaxError("not a TIFF file (header b'II*\\x00SECRET' not valid)"), "TIFF")
    assert "SECRET" not in str(error) and "<bytes>" in str(error)


def _correlation(image, source):
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return float(np.corrcoef(grey.ravel(), np.asarray(source, dtype=np.float64).ravel())[0, 1])


def _pattern(height=48, width=64):
    y, x = np.mgrid[0:height, 0:width]
    return (x / (width - 1)) * 0.7 + ((x // 8 + y // 8) % 2) * 0.3  # gradient plus checkerboard, 0..1


@pytest.mark.parametrize("scale", [1.0, 1000.0, -3.5])  # reflectance 0..1, elevations, negative values
def test_float_tiffs_decode_to_the_picture_not_black(scale):
    source = (_pattern() * scale).astype(np.float32)
    image = open_image(encoded(Image.fromarray(source, "F"), "TIFF"))
    grey = np.asarray(image.convert("L"))
    assert image.mode == "RGB" and grey.max() - grey.min() > 200  # uses the whole range, not black
    assert abs(_correlation(image, source)) > 0.99
    if scale == 1.0:  # 0..1 data keeps its absolute brightness
        assert grey.max() == 255 and grey.min() == 0


def test_float_tiff_nan_and_infinity_do_not_blank_the_picture():
    source = _pattern().astype(np.float32)
    source[0, 0], source[0, 1] = np.nan, np.inf
    grey = np.asarray(open_image(encoded(Image.fromarray(source, "F"), "TIFF")).convert("L"))
    assert grey.max() == 255 and _correlation(Image.fromarray(grey), _pattern()) > 0.95


@pytest.mark.parametrize("bits", [12, 16])
def test_sixteen_bit_tiffs_scale_by_the_bits_they_use(bits):
    """A 12-bit scanner's values in a 16-bit TIFF would come out 1/16 as bright if divided by 256."""
    source = np.rint(_pattern() * (2**bits - 1)).astype(np.uint16)
    sixteen = Image.fromarray(source)
    assert sixteen.mode == "I;16"
    image = open_image(encoded(sixteen, "TIFF"))
    grey = np.asarray(image.convert("L"))
    assert grey.max() == 255 and grey.min() == 0
    assert _correlation(image, source) > 0.99


def test_a_multi_page_tiff_reports_its_page_count():
    pages = [draw_map(1), draw_map(2), draw_map(3)]
    data = encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    image = open_image(data)
    assert image.info["pages"] == 3
    assert np.asarray(image).tolist() == np.asarray(pages[0]).tolist()  # the first page
    assert open_image(encoded(draw_map(4), "TIFF")).info["pages"] == 1
