#!/usr/bin/env python
"""Regenerate the tiny demo dataset in ``demo/data/`` from scikit-image's bundled photos.

This script is only needed to (re)build the demo images and ``SOURCES.md``;
nothing in the repo needs it (or scikit-image) when it runs.

Usage::

    pip install scikit-image pillow      # e.g. in a scratch virtualenv
    python demo/make_demo_data.py        # writes demo/data/{train,val}/{color,gray}/*.jpg

The result is a torchvision ``ImageFolder`` layout with two classes:
``color`` (colour photographs) and ``gray`` (grayscale photographs). Every
file is a real photograph (or a crop of one) from the image files that ship
inside the scikit-image wheel (``skimage/data/``), downsized so that the
shorter side is 96 px (PIL bicubic, aspect ratio kept) and saved as JPEG
quality 90. Grayscale photos are stored as 1-channel JPEGs; torchvision's
default loader converts them to RGB.
"""

import argparse
import os

from PIL import Image

SHORT_SIDE = 96
JPEG_QUALITY = 90

# Per-source provenance, quoted from the ``skimage.data`` function docstrings
# (scikit-image 0.26.0). skimage/data/README.txt itself states no licenses.
SOURCES = {
    "astronaut.png": dict(
        function="skimage.data.astronaut",
        author="NASA (photograph of astronaut Eileen Collins)",
        source="This image was downloaded from the NASA Great Images database "
               "<https://flic.kr/p/r9qvLn>",
        license="No known copyright restrictions, released into the public domain.",
    ),
    "chelsea.png": dict(
        function="skimage.data.chelsea",
        author="Stefan van der Walt",
        source="Chelsea the cat.",
        license="No copyright restrictions.  CC0 by the photographer (Stefan van der Walt).",
    ),
    "coffee.png": dict(
        function="skimage.data.coffee",
        author="Rachel Michetti",
        source="This photograph is courtesy of Pikolo Espresso Bar.",
        license="No copyright restrictions.  CC0 by the photographer (Rachel Michetti).",
    ),
    "rocket.jpg": dict(
        function="skimage.data.rocket",
        author="SpaceX",
        source="Launch photo of DSCOVR on Falcon 9 by SpaceX. This image was downloaded from "
               "SpaceX Photos <https://www.flickr.com/photos/spacexphotos/16511594820/in/photostream/>.",
        license="The image was captured by SpaceX and released in the public domain "
                "<http://arstechnica.com/tech-policy/2015/03/elon-musk-puts-spacex-photos-into-the-public-domain/>.",
    ),
    "hubble_deep_field.jpg": dict(
        function="skimage.data.hubble_deep_field",
        author="NASA (Hubble Space Telescope)",
        source="Hubble eXtreme Deep Field. This image was downloaded from HubbleSite "
               "<http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/>.",
        license="The image was captured by NASA and may be freely used in the public domain "
                "<http://www.nasa.gov/audience/formedia/features/MP_Photo_Guidelines.html>.",
    ),
    "retina.jpg": dict(
        function="skimage.data.retina",
        author="Mikael Häggström (Häggström, Mikael (2014). \"Medical gallery of Mikael "
               "Häggström 2014\". WikiJournal of Medicine 1 (2). DOI:10.15347/wjm/2014.008)",
        source="This image was downloaded from wikimedia "
               "<https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg>.",
        license="This file is made available under the Creative Commons CC0 1.0 Universal "
                "Public Domain Dedication.",
    ),
    "camera.png": dict(
        function="skimage.data.camera",
        author="Lav Varshney",
        source="Gray-level \"camera\" image (the version used since scikit-image 0.18).",
        license="No copyright restrictions. CC0 by the photographer (Lav Varshney).",
    ),
    "clock_motion.png": dict(
        function="skimage.data.clock",
        author="Stefan van der Walt",
        source="Motion blurred clock. This photograph of a wall clock was taken while moving "
               "the camera in an approximately horizontal direction.",
        license="Released into the public domain by the photographer (Stefan van der Walt).",
    ),
    "grass.png": dict(
        function="skimage.data.grass",
        author="linolafett on DeviantArt (per the source URL)",
        source="The original image was downloaded from DeviantArt "
               "<https://www.deviantart.com/linolafett/art/Grass-01-434853879>; scikit-image "
               "cropped it to (512, 512) and converted it to grayscale uint8.",
        license="licensed under the Creative Commons CC0 License.",
    ),
    "gravel.png": dict(
        function="skimage.data.gravel",
        author="CC0Textures (texture \"Gravel04\")",
        source="The original image was downloaded from CC0Textures "
               "<https://cc0textures.com/view.php?tex=Gravel04>; scikit-image rescaled it, "
               "cropped the top-left (512, 512) region and converted it to grayscale uint8.",
        license="licensed under the Creative Commons CC0 License.",
    ),
    "microaneurysms.png": dict(
        function="skimage.data.microaneurysms",
        author="Andreas Maier (owner); High-Resolution Fundus (HRF) Image Database, "
               "<https://www5.cs.fau.de/research/data/fundus-images/>",
        source="Detail from an image of the retina (green channel). The image is a crop of "
               "image 07_dr.JPG from the High-Resolution Fundus (HRF) Image Database.",
        license="No copyright restrictions. CC0 given by owner (Andreas Maier).",
    ),
}

# (split, class, output name, scikit-image data file, crop box (left, upper, right, lower) or None)
ITEMS = [
    # ---- colour photographs ----
    ("train", "color", "astronaut.jpg", "astronaut.png", None),
    ("train", "color", "astronaut_face.jpg", "astronaut.png", (120, 20, 330, 230)),
    ("train", "color", "astronaut_shuttle.jpg", "astronaut.png", (340, 20, 490, 330)),
    ("train", "color", "chelsea.jpg", "chelsea.png", None),
    ("train", "color", "coffee.jpg", "coffee.png", None),
    ("train", "color", "coffee_cup.jpg", "coffee.png", (150, 0, 450, 300)),
    ("train", "color", "rocket.jpg", "rocket.jpg", None),
    ("train", "color", "rocket_pad.jpg", "rocket.jpg", (200, 0, 520, 427)),
    ("train", "color", "hubble_deep_field.jpg", "hubble_deep_field.jpg", None),
    ("train", "color", "hubble_deep_field_topleft.jpg", "hubble_deep_field.jpg", (0, 0, 400, 400)),
    ("train", "color", "retina.jpg", "retina.jpg", None),
    ("train", "color", "retina_optic_disc.jpg", "retina.jpg", (100, 400, 550, 850)),
    ("val", "color", "chelsea_face.jpg", "chelsea.png", (120, 0, 420, 300)),
    ("val", "color", "hubble_deep_field_bottomright.jpg", "hubble_deep_field.jpg", (600, 472, 1000, 872)),
    ("val", "color", "retina_macula.jpg", "retina.jpg", (550, 450, 1000, 900)),
    # ---- grayscale photographs ----
    ("train", "gray", "camera.jpg", "camera.png", None),
    ("train", "gray", "camera_cameraman.jpg", "camera.png", (180, 60, 420, 300)),
    ("train", "gray", "clock_motion.jpg", "clock_motion.png", None),
    ("train", "gray", "clock_motion_center.jpg", "clock_motion.png", (100, 50, 300, 250)),
    ("train", "gray", "grass.jpg", "grass.png", None),
    ("train", "gray", "grass_topleft.jpg", "grass.png", (0, 0, 256, 256)),
    ("train", "gray", "gravel.jpg", "gravel.png", None),
    ("train", "gray", "gravel_topleft.jpg", "gravel.png", (0, 0, 256, 256)),
    ("train", "gray", "microaneurysms.jpg", "microaneurysms.png", None),
    ("val", "gray", "camera_tripod.jpg", "camera.png", (200, 250, 440, 512)),
    ("val", "gray", "grass_bottomright.jpg", "grass.png", (256, 256, 512, 512)),
    ("val", "gray", "gravel_bottomright.jpg", "gravel.png", (256, 256, 512, 512)),
]

SKIPPED = """\
## Bundled scikit-image images that were deliberately NOT used

- `moon.png` (`skimage.data.moon`): the docstring states no source or license.
- `coins.png` (`skimage.data.coins`, Brooklyn Museum) and `ihc.png`
  (`skimage.data.immunohistochemistry`, CMMI): the docstrings only say
  "No known copyright restrictions." with no explicit license grant; left out
  to be conservative.
- `motorcycle_left.png` / `motorcycle_right.png` (`skimage.data.stereo_motorcycle`,
  Middlebury 2014 stereo benchmark): the docstring states no license.
- `lfw_subset.npy` (`skimage.data.lfw_subset`, face crops from Labeled Faces in the
  Wild stored as a NumPy array): the docstring states no license.
- `brick.png` (`skimage.data.brick`, CC0Textures, CC0): CC0, but heavily
  perspective-warped and we could not confirm it is a photograph rather than a
  generated texture; left out.
- `cell.png` (`skimage.data.cell`, CC0): a quantitative phase image computed
  from a hologram, not a photograph.
- `color.png`, `logo.png`, `horse.png`, `chessboard_*.png`, `phantom.png`,
  `text.png`, `page.png`, `no_time_for_that_tiny.gif`, `multipage*.tif`:
  synthetic drawings / test patterns / scans, not photographs.
"""


def resize_short_side(im, short=SHORT_SIDE):
    w, h = im.size
    s = short / min(w, h)
    size = (max(short, round(w * s)), max(short, round(h * s)))
    return im.resize(size, Image.Resampling.BICUBIC)


def main():
    import skimage
    import skimage.data

    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(here, "data"), help="output folder")
    args = p.parse_args()

    src_dir = os.path.dirname(skimage.data.__file__)
    out = args.out

    # Remove previously generated JPEGs in the managed class folders only.
    for split in ("train", "val"):
        for cls in ("color", "gray"):
            d = os.path.join(out, split, cls)
            if os.path.isdir(d):
                for f in os.listdir(d):
                    if f.endswith(".jpg"):
                        os.remove(os.path.join(d, f))

    rows = []
    for split, cls, name, src, box in ITEMS:
        path = os.path.join(src_dir, src)
        if not os.path.exists(path):
            raise SystemExit(f"{src} is not bundled with this scikit-image ({skimage.__version__})")
        im = Image.open(path)
        im.load()
        im = im.convert("RGB" if cls == "color" else "L")
        if box is not None:
            im = im.crop(box)
        im = resize_short_side(im)
        d = os.path.join(out, split, cls)
        os.makedirs(d, exist_ok=True)
        im.save(os.path.join(d, name), "JPEG", quality=JPEG_QUALITY)
        rows.append((f"{split}/{cls}/{name}", src, box, im.size))

    lines = [
        "# Demo dataset sources",
        "",
        "Tiny two-class dataset (`color` = colour photographs, `gray` = grayscale",
        "photographs) in torchvision `ImageFolder` layout, for smoke-testing the MAE code.",
        "",
        f"All images come from the data files bundled inside the scikit-image "
        f"{skimage.__version__} wheel (`skimage/data/`). "
        "**The images were downsized for this repo**: optionally cropped (box given as "
        "`(left, upper, right, lower)` in pixels of the original file), then resized so that "
        f"the shorter side is {SHORT_SIDE} px (aspect ratio kept, PIL bicubic) and saved as "
        f"JPEG quality {JPEG_QUALITY}. Grayscale photos are stored as 1-channel JPEGs.",
        "Regenerate with `python demo/make_demo_data.py` (needs scikit-image and Pillow).",
        "",
        "scikit-image's `skimage/data/README.txt` states no per-image licenses; the "
        "author/source/license text below is quoted from the corresponding `skimage.data` "
        "function docstrings. (The scikit-image package as a whole is distributed under "
        "BSD-3-Clause per its `LICENSE.txt`; the per-image statements are the more specific ones.)",
        "",
        "## Files",
        "",
        "| file | scikit-image data file | crop box | size (w x h) |",
        "|---|---|---|---|",
    ]
    for f, src, box, size in rows:
        b = "full image" if box is None else str(box)
        lines.append(f"| `{f}` | `{src}` | {b} | {size[0]} x {size[1]} |")
    lines += ["", "## Original sources and licenses", ""]
    used = []
    for _, _, _, src, _ in ITEMS:
        if src not in used:
            used.append(src)
    for src in used:
        m = SOURCES[src]
        lines += [
            f"### `{src}` (`{m['function']}`)",
            "",
            f"- Author: {m['author']}",
            f"- Source: {m['source']}",
            f"- License (as stated by scikit-image): \"{m['license']}\"",
            "",
        ]
    lines.append(SKIPPED)
    with open(os.path.join(out, "SOURCES.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {len(rows)} images and SOURCES.md to {out}")


if __name__ == "__main__":
    main()
