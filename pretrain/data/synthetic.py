"""A small labelled image set drawn procedurally: real JPEG files in class folders, no download.

Class c draws one of a few shapes in a class-specific colour on a noisy background, at a random place and
size, so that a small Swin learns it well above chance in minutes.
"""
from __future__ import annotations

import colorsys
import os
import random

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring")


def draw_image(cls: int, num_classes: int, rng: random.Random, size: tuple[int, int]) -> Image.Image:
    w, h = size
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    for _ in range(6):  # clutter shared by all classes
        x, y = rng.randrange(w), rng.randrange(h)
        d.line([(x, y), (rng.randrange(w), rng.randrange(h))],
               fill=tuple(rng.randint(0, 140) for _ in range(3)), width=2)
    r, g, b = colorsys.hsv_to_rgb(cls / num_classes, 0.9, 1.0)
    color = (int(r * 255), int(g * 255), int(b * 255))
    s = rng.uniform(0.3, 0.6) * min(w, h)
    cx, cy = rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2)
    box = [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
    shape = SHAPES[cls % len(SHAPES)]
    if shape == "ellipse":
        d.ellipse(box, fill=color)
    elif shape == "rectangle":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=color)
    elif shape == "cross":
        t = s / 6
        d.rectangle([cx - t, box[1], cx + t, box[3]], fill=color)
        d.rectangle([box[0], cy - t, box[2], cy + t], fill=color)
    else:
        d.ellipse(box, outline=color, width=max(2, int(s / 8)))
    return img.filter(ImageFilter.GaussianBlur(0.6))


def make_image_folder(root: str, num_classes: int = 10, per_class: int = 50, size: tuple[int, int] = (160, 120),
                      seed: int = 0, quality: int = 90) -> str:
    """Write `root/class_XX/NNNNN.jpg`; existing files are kept (a second call is a no-op)."""
    rng = random.Random(seed)
    for c in range(num_classes):
        folder = os.path.join(root, f"class_{c:02d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = draw_image(c, num_classes, rng, size)  # drawn even when present: keeps the rng stream
            path = os.path.join(folder, f"{i:05d}.jpg")
            if not os.path.exists(path):
                tmp = path + ".tmp"
                img.save(tmp, format="JPEG", quality=quality)
                os.replace(tmp, path)
    return root
