import io

import pytest
from PIL import Image

from conftest import draw_map
from datasette_mapclip.images import ImageDecodeError, open_image


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
