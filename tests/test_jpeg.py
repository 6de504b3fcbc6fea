"""Crop-aware decoding: the compiled libjpeg-turbo ROI decoder and the training crop built on it, on real
JPEGs. The decoder must build here (CI installs the libjpeg-turbo headers): under `make test` a failed build
fails these tests; the fast tier skips them naming what is missing."""
import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

from pretrain.config import ConfigError, load_config
from pretrain.data import jpeg
from pretrain.data.transforms import DecodeRandomResizedCrop, _decode_whole

from conftest import need

REPO_CFG = str(Path(__file__).resolve().parents[1] / "configs" / "swin_tiny_cpu.json")


def photo(size=(640, 480), fmt="JPEG", mode="RGB", **save) -> bytes:
    """Gradients + noise: smooth structure and texture, so scale and position errors show."""
    bands = [Image.linear_gradient("L").resize(size), Image.effect_noise(size, 40),
             Image.radial_gradient("L").resize(size)]
    img = Image.merge("RGB", bands).convert(mode)
    b = io.BytesIO()
    img.save(b, fmt, **save)
    return b.getvalue()


@pytest.fixture(scope="module")
def roi():
    try:
        return jpeg.roi_decoder("on")
    except jpeg.JpegBuildError as e:  # make test: fails; the fast tier: skips naming what is missing
        need(False, f"the libjpeg-turbo headers and a C compiler (.ci/system_deps.sh): {str(e)[:300]}")


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_roi_pixels_equal_a_whole_decode_at_every_dct_scale(roi, subsampling):
    data = photo((1000, 700), quality=90, subsampling=subsampling)
    for k in (1, 2, 4, 8):
        whole = _decode_whole(Image.open(io.BytesIO(data)), k)
        H, W = whole.shape[:2]
        assert (H, W) == (-(-700 // k), -(-1000 // k))
        for x, y in ((0, 0), (3, 5), (W // 3 + 1, H // 2 + 3)):
            w, h = W // 2, H // 3
            np.testing.assert_array_equal(roi.decode(data, k, x, y, w, h), whole[y:y + h, x:x + w])
    np.testing.assert_array_equal(roi.decode(data, 1, 0, 0, 1000, 700), _decode_whole(
        Image.open(io.BytesIO(data)), 1))


def test_roi_grey_and_progressive_jpegs(roi):
    for data in (photo(mode="L"), photo(progressive=True)):
        whole = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(roi.decode(data, 1, 10, 20, 300, 200), whole[20:220, 10:310])


def test_roi_reports_corrupt_data_and_refuses_bad_regions(roi):
    data = photo()
    assert roi.decode(data[: len(data) // 2], 1, 0, 0, 640, 480) is None  # truncated: libjpeg warns
    assert roi.decode(b"not a jpeg", 1, 0, 0, 8, 8) is None
    assert roi.decode(photo(mode="CMYK"), 1, 0, 0, 8, 8) is None  # no CMYK -> RGB in libjpeg
    with pytest.raises(ValueError, match="outside the 320x240 image at scale 1/2"):
        roi.decode(data, 2, 300, 0, 40, 10)


def rrc(size, scale=(0.08, 1.0)):
    """timm's crop: stateless (it draws from `random`), so ours and the reference can share one."""
    return RRC(size, scale=scale, interpolation="bicubic")


@pytest.mark.parametrize("use_roi", [True, False])
def test_crop_equals_timm_random_resized_crop(roi, use_roi):
    """Same random draws as timm's transform; full-scale pixels; resize within 1 grey level of PIL's."""
    data = photo((500, 375), quality=90)
    ref_t = rrc(64)
    ours = DecodeRandomResizedCrop(ref_t, draft=False, roi=roi if use_roi else None)
    for seed in range(12):
        random.seed(seed)
        a = np.asarray(ours(data)).astype(int)
        random.seed(seed)
        b = np.asarray(ref_t(Image.open(io.BytesIO(data)).convert("RGB"))).astype(int)
        assert a.shape == b.shape == (64, 64, 3)
        assert np.abs(a - b).max() <= 1, seed


def test_crop_decodes_at_a_reduced_scale_only_where_the_crop_allows(roi):
    data = photo((1024, 768), quality=95)
    whole = rrc(64, scale=(1.0, 1.0))
    whole.ratio = (4 / 3, 4 / 3)
    ref = np.asarray(whole(Image.open(io.BytesIO(data)).convert("RGB"))).astype(float)
    outs = [np.asarray(DecodeRandomResizedCrop(whole, roi=r)(data)).astype(float) for r in (roi, None)]
    np.testing.assert_array_equal(outs[0], outs[1])  # 1/8 scale (128x96) by either decoder: same pixels
    assert np.abs(outs[0] - ref).mean() <= 4.0  # grey levels of 255: the same picture as a full decode
    assert np.abs(outs[0] - ref).mean() > 0  # ... but not decoded at full scale


def test_crop_hands_cmyk_png_and_corrupt_images_to_pillow(roi):
    t = rrc(32, scale=(1.0, 1.0))
    crop = DecodeRandomResizedCrop(t, draft=False, roi=roi)  # full scale, to compare with timm's
    for data in (photo(mode="CMYK"), photo(fmt="PNG"), photo(mode="L")):
        random.seed(0)
        out = crop(data)
        random.seed(0)
        ref = t(Image.open(io.BytesIO(data)).convert("RGB"))
        assert out.size == (32, 32) and out.mode == "RGB"
        assert np.abs(np.asarray(out).astype(int) - np.asarray(ref).astype(int)).max() <= 1
    data = photo()
    with pytest.raises(OSError, match="truncated"):  # the whole frame is needed: Pillow's verdict
        crop(data[: len(data) // 2])


def test_build_failure_is_an_error_when_required_and_a_logged_fallback_otherwise(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SWIN_PRETRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setattr(jpeg, "_fallback_logged", False)
    with pytest.raises(jpeg.JpegBuildError, match="libjpeg-turbo >= 1.5 headers.*Command: false"):
        jpeg.roi_decoder("on")
    with caplog.at_level(logging.WARNING, logger="pretrain.data.jpeg"):
        assert jpeg.roi_decoder("auto") is None
    assert "decoding whole images instead" in caplog.text
    assert jpeg.roi_decoder("off") is None
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_jpeg_roi_setting_is_checked_on_load():
    with pytest.raises(ConfigError, match="aug.jpeg_roi must be one of auto, on, off, got 'yes'"):
        load_config(REPO_CFG, ["aug.jpeg_roi=yes"])
