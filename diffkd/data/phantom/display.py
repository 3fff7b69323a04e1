"""What the scanner adds on its way to a PNG: UI frame, burned-in text, calipers, color export, JPEG.

Real exports carry all of these and models must learn to look past them; nothing drawn here depends
on the label except what a sonographer would also show (a caliper reads the lesion it measures).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffkd.data.phantom.fields import feret_diameter

CLOCK = ("12", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11")


@dataclass
class Exported:
    pixels: np.ndarray  # uint8, (H, W) gray or (H, W, 3) RGB
    mask: np.ndarray | None  # bool (H, W) aligned with pixels; None when nothing is outlined
    diameter_mm: float | None  # largest lesion extent measured on the mask


@lru_cache(maxsize=16)
def overlay_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def export_image(gray: np.ndarray, mask: np.ndarray | None, profile, spacing_mm: float, rng: np.random.Generator,
                 *, force_gray: bool = False, extra_text: str = "") -> Exported:
    """Frame, annotate and compress a [0, 1] gray image the way `profile`'s scanner exports it."""
    h, w = gray.shape
    top, bottom, left, right = profile.ui_margins
    canvas = np.zeros((h + top + bottom, w + left + right), np.uint8)
    canvas[top:top + h, left:left + w] = np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)
    full_mask = None
    if mask is not None:
        full_mask = np.zeros(canvas.shape, bool)
        full_mask[top:top + h, left:left + w] = mask
    diameter_px, ends = feret_diameter(mask) if mask is not None else (0.0, None)

    rgb = profile.rgb and not force_gray
    if rgb:
        img = Image.fromarray(np.clip(canvas[..., None] * np.asarray(profile.tint, np.float32)[None, None, :], 0, 255)
                              .astype(np.uint8), "RGB")
        color = tuple(profile.overlay_color)
    else:
        img = Image.fromarray(canvas, "L")
        color = 235
    draw = ImageDraw.Draw(img)
    font_px = max(8, int(round(min(h, w) / 30)))
    font = overlay_font(font_px)

    if profile.text_overlay:
        side = rng.choice(["L", "R"])
        lines = [profile.model_text,
                 f"{profile.frequency_mhz:.0f}MHz  Gn {50 + profile.gain_db:.0f}  DR {profile.dynamic_range_db:.0f}",
                 f"{side} BREAST {CLOCK[int(rng.integers(12))]}:00 {int(rng.integers(1, 8))}CMFN"]
        if extra_text:
            lines.append(extra_text)
        y = 2
        for line in lines:
            draw.text((left + 3, y), line, fill=color, font=font)
            y += font_px + 1
        _depth_scale(draw, profile, spacing_mm, (top, left, h, w), font, color)
        _body_marker(draw, rng, (top, left, h, w), font_px, color)

    if ends is not None and rng.random() < profile.caliper_rate:
        size = max(3, font_px // 2)
        for r, c in ends:
            x, y = left + c, top + r
            draw.line([(x - size, y), (x + size, y)], fill=color, width=1)
            draw.line([(x, y - size), (x, y + size)], fill=color, width=1)
        draw.text((left + 3, top + h - font_px - 3), f"D1  {diameter_px * spacing_mm / 10:.2f} cm", fill=color,
                  font=font)

    if profile.jpeg_quality:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(profile.jpeg_quality))
        img = Image.open(io.BytesIO(buf.getvalue()))
        img.load()
    pixels = np.asarray(img)
    return Exported(pixels, full_mask, diameter_px * spacing_mm if ends is not None else None)


def _depth_scale(draw: ImageDraw.ImageDraw, profile, spacing_mm: float, box, font, color) -> None:
    top, left, h, w = box
    x = left + w - 2 if profile.ui_margins[3] < 12 else left + w + 3
    for cm in range(int(h * spacing_mm / 10) + 1):
        y = top + int(round(cm * 10 / spacing_mm))
        draw.line([(x - 5, y), (x, y)], fill=color, width=1)
        if profile.ui_margins[3] >= 12:
            draw.text((x + 3, y - 4), str(cm), fill=color, font=font)
    fy = top + int(round(profile.focal_depth_mm / spacing_mm))
    draw.polygon([(x - 9, fy), (x - 14, fy - 3), (x - 14, fy + 3)], fill=color)


def _body_marker(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box, font_px: int, color) -> None:
    """The breast pictogram with the probe position, bottom right."""
    top, left, h, w = box
    r = max(5, font_px)
    cx, cy = left + w - 3 * r, top + h - 2 * r
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=1)
    a = rng.uniform(0, np.pi)
    dx, dy = 0.7 * r * np.cos(a), 0.7 * r * np.sin(a)
    px, py = cx + rng.uniform(-0.4, 0.4) * r, cy + rng.uniform(-0.4, 0.4) * r
    draw.line([(px - dx, py - dy), (px + dx, py + dy)], fill=color, width=2)
