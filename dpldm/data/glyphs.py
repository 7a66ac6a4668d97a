"""Procedurally generated public glyphs: `glyphs:digits` (the SVHN stand-in) and `glyphs:letters` (EMNIST letters).

Each image is one character drawn from a fixed list of faces — handwriting and printed TrueType/OpenType fonts
that Debian packages, and Hershey stroke fonts (`hershey-fonts-data`, drawn as pen strokes) — then distorted
and normalised like MNIST:

1. face, class and every random draw come from `numpy.random.default_rng([seed, split, index])`: record i is a
   pure function of (kind, split, seed, i), so shards can be written in any order by any number of processes
   and `--limit N` gives a prefix of the same set. `seed` is public (default 0); train and test use different
   streams;
2. pen: Hershey strokes are drawn with a random width; fonts get a random outline (`stroke_width`) that
   thickens their strokes;
3. a random affine map (rotation ±12°, shear ±0.35, aspect 0.75–1.25) and an elastic distortion (a smoothed
   random displacement field, Simard et al. 2003);
4. MNIST normalisation: crop to the ink, scale the longer side to 20 px (anti-aliased), then place in 28x28 so
   that the centre of mass lies at the centre.

Classes: digits "0".."9"; letters "a".."z" (26 classes, upper or lower case at random, as EMNIST letters
merges the cases). Sizes: train 60,000, test 10,000 (limit with `--limit`); labels are balanced (i mod K).
"""
from __future__ import annotations

import functools
import string
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dpldm.data.record import Record
from dpldm.errors import DpldmError

FONT_ROOT = Path("/usr/share/fonts")
HERSHEY_ROOT = Path("/usr/share/hershey-fonts")
# (Debian package, font files relative to FONT_ROOT). Handwriting faces first, then printed faces for variety.
FONT_PACKAGES: list[tuple[str, list[str]]] = [
    ("fonts-dkg-handwriting", [f"truetype/fifthhorseman/dkg{s}.ttf" for s in ("", "BI", "Bd", "It")]),
    ("fonts-breip", ["truetype/breip/Breip.ttf"]),
    ("fonts-bwht", [f"opentype/bwht/BecauseWe{s}-Regular.otf"
                    for s in ("Build", "Connect", "Create", "Learn", "Mentor", "Organize")]),
    ("fonts-kristi", ["truetype/kristi/Kristi.ttf"]),
    ("fonts-rufscript", ["truetype/rufscript/Rufscript010.ttf"]),
    ("fonts-sjfonts", ["truetype/sjfonts/Delphine.ttf", "truetype/sjfonts/SteveHand.ttf"]),
    ("fonts-tlwg-purisa-ttf", [f"truetype/tlwg/Purisa{s}.ttf" for s in ("", "-Bold", "-Oblique", "-BoldOblique")]),
    ("fonts-comic-neue", [f"opentype/comic-neue/ComicNeue-{s}.otf" for s in ("Regular", "Bold", "Italic", "Light")]),
    ("fonts-humor-sans", ["truetype/humor-sans/Humor-Sans.ttf"]),
    ("fonts-dancingscript", ["opentype/dancingscript/DancingScript-Regular.otf"]),
    ("fonts-ecolier-court", ["truetype/ecolier-court/Ecolier-court.ttf"]),
    ("fonts-femkeklaver", ["truetype/femkeklaver/femkeklaver.ttf"]),
    ("fonts-staypuft", ["truetype/staypuft/StayPuft.ttf"]),
    ("fonts-isabella", ["truetype/isabella/Isabella.ttf"]),
    ("fonts-klaudia-berenika", [f"truetype/klaudia-berenika/{s}.ttf" for s in ("Klaudia", "Klaudia-Oblique",
                                                                              "Berenika", "Berenika-Oblique")]),
    ("fonts-lobstertwo", ["opentype/lobstertwo/LobsterTwo-Regular.otf", "opentype/lobstertwo/LobsterTwo-Italic.otf"]),
    ("fonts-urw-base35", [f"opentype/urw-base35/{s}.otf" for s in (
        "Z003-MediumItalic", "NimbusSans-Regular", "NimbusSans-Italic", "NimbusRoman-Regular", "NimbusRoman-Italic",
        "URWGothic-Book", "URWBookman-Light", "C059-Italic", "P052-Roman", "NimbusMonoPS-Regular")]),
    ("fonts-dejavu-core", [f"truetype/dejavu/{s}.ttf" for s in ("DejaVuSans", "DejaVuSans-Oblique", "DejaVuSerif",
                                                               "DejaVuSansMono")]),
    ("fonts-liberation", [f"truetype/liberation/Liberation{s}.ttf" for s in ("Sans-Regular", "Sans-Italic",
                                                                            "Serif-Italic", "SansNarrow-Regular")]),
    ("fonts-freefont-ttf", [f"truetype/freefont/{s}.ttf" for s in ("FreeSans", "FreeSerifItalic", "FreeMono")]),
    ("fonts-okolaks", ["truetype/okolaks/okolaksRegular.ttf", "truetype/okolaks/okolaksRegularItalic.ttf"]),
    ("fonts-sil-andika", ["truetype/andika/Andika-Regular.ttf", "truetype/andika/Andika-Italic.ttf"]),
]
# Hershey stroke fonts whose 96 glyphs are ASCII 32..127 (one glyph per line)
HERSHEY_FONTS = ["futural", "futuram", "rowmans", "rowmand", "timesr", "timesi", "timesib", "scripts", "scriptc",
                 "cursive"]
APT_PACKAGES = [p for p, _ in FONT_PACKAGES] + ["hershey-fonts-data"]
KINDS = {"digits": list(string.digits), "letters": list(string.ascii_lowercase)}
SIZES = {"train": 60000, "test": 10000}
CANVAS = 96          # drawing canvas (px); the glyph is about 60 px tall on it
FONT_SIZE = 64


@functools.lru_cache(maxsize=None)
def faces() -> tuple[tuple[str, str], ...]:
    """The fixed face list: ("font", path) and ("hershey", name); a missing file is an error naming its package."""
    out = []
    for package, files in FONT_PACKAGES:
        for rel in files:
            path = FONT_ROOT / rel
            if not path.is_file():
                raise DpldmError(f"source glyphs: font file {path} is missing; `make setup` installs it "
                                 f"(apt-get install {package})")
            out.append(("font", str(path)))
    for name in HERSHEY_FONTS:
        path = HERSHEY_ROOT / f"{name}.jhf"
        if not path.is_file():
            raise DpldmError(f"source glyphs: {path} is missing; `make setup` installs it "
                             "(apt-get install hershey-fonts-data)")
        out.append(("hershey", str(path)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


@functools.lru_cache(maxsize=None)
def _hershey(path: str) -> dict[str, list[np.ndarray]]:
    """{character: [polyline (n,2) arrays]} of a .jhf file whose lines are ASCII 32..127 in order."""
    lines = [ln.rstrip("\n") for ln in Path(path).read_text(encoding="latin-1").splitlines() if ln.strip()]
    if len(lines) < 95:
        raise DpldmError(f"source glyphs: {path}: expected 96 glyph lines (ASCII 32..127), found {len(lines)}")
    glyphs = {}
    for code, line in zip(range(32, 128), lines):
        body = line[8:]
        pairs = [body[k:k + 2] for k in range(2, len(body) - 1, 2)]      # the first pair is the glyph's margins
        strokes, cur = [], []
        for p in pairs:
            if p == " R":
                strokes.append(cur)
                cur = []
            else:
                cur.append((ord(p[0]) - ord("R"), ord(p[1]) - ord("R")))
        strokes.append(cur)
        glyphs[chr(code)] = [np.array(s, dtype=np.float64) for s in strokes if s]
    return glyphs


@functools.lru_cache(maxsize=None)
def _has_glyph(path: str, ch: str) -> bool:
    """Whether a font draws `ch` as itself (not empty, not its .notdef box)."""
    font = _font(path)
    mask = np.asarray(font.getmask(ch))
    if mask.size == 0 or mask.max() < 128:
        return False
    missing = np.asarray(font.getmask("\U000F0000"))
    return not (mask.shape == missing.shape and np.array_equal(mask, missing))


def _draw_font(path: str, ch: str, rng: np.random.Generator) -> np.ndarray:
    img = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(img).text((CANVAS / 2, CANVAS / 2), ch, fill=255, font=_font(path), anchor="mm",
                             stroke_width=int(rng.integers(0, 4)), stroke_fill=255)
    return np.asarray(img)


def _draw_hershey(path: str, ch: str, rng: np.random.Generator) -> np.ndarray:
    strokes = _hershey(path)[ch]
    pts = np.concatenate(strokes)
    lo, hi = pts.min(0), pts.max(0)
    scale = 60.0 / max(hi[1] - lo[1], hi[0] - lo[0], 1.0)
    centre = (lo + hi) / 2
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    width = int(rng.integers(4, 11))
    for s in strokes:
        xy = [(float(x), float(y)) for x, y in (s - centre) * scale + CANVAS / 2]
        if len(xy) == 1:
            xy = xy * 2
        draw.line(xy, fill=255, width=width, joint="curve")
        r = width / 2                                                   # round pen tips
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(img)


def _distort(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random affine map (rotation, shear, aspect) and an elastic distortion, about the canvas centre."""
    from scipy.ndimage import gaussian_filter, map_coordinates
    angle = np.deg2rad(rng.uniform(-12, 12))
    shear = rng.uniform(-0.35, 0.35)
    aspect = rng.uniform(0.75, 1.25)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fwd = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([1.0, aspect])     # acts on (x, y)
    inv = np.linalg.inv(fwd)
    c = (CANVAS - 1) / 2
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float64)
    alpha, sigma = rng.uniform(0, 90), 8.0                                       # elastic strength (px), smoothness
    dx = gaussian_filter(rng.uniform(-1, 1, (CANVAS, CANVAS)), sigma) * alpha
    dy = gaussian_filter(rng.uniform(-1, 1, (CANVAS, CANVAS)), sigma) * alpha
    ox, oy = xx - c + dx, yy - c + dy
    sx = inv[0, 0] * ox + inv[0, 1] * oy + c
    sy = inv[1, 0] * ox + inv[1, 1] * oy + c
    return map_coordinates(a.astype(np.float32), [sy, sx], order=1, mode="constant", cval=0.0)


def mnist_normalise(a: np.ndarray, box: int = 20, size: int = 28) -> np.ndarray:
    """Crop to the ink, scale the longer side to `box` px (aspect kept, anti-aliased), and centre the result in
    a size x size image by its centre of mass (LeCun et al.'s MNIST recipe). uint8 [size, size]."""
    ys, xs = np.nonzero(a > 16)
    if len(ys) == 0:
        raise DpldmError("source glyphs: a glyph came out empty (no ink after distortion)")
    crop = Image.fromarray(np.clip(a[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 0, 255).astype(np.uint8))
    w, h = crop.size
    s = box / max(w, h)
    crop = crop.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    g = np.asarray(crop, dtype=np.float64)
    total = g.sum()
    cy = float((np.arange(g.shape[0])[:, None] * g).sum() / max(total, 1e-9))
    cx = float((np.arange(g.shape[1])[None, :] * g).sum() / max(total, 1e-9))
    top = int(np.clip(round(size / 2 - 0.5 - cy), 0, size - g.shape[0]))
    left = int(np.clip(round(size / 2 - 0.5 - cx), 0, size - g.shape[1]))
    out = np.zeros((size, size), dtype=np.uint8)
    out[top:top + g.shape[0], left:left + g.shape[1]] = np.asarray(crop)
    return out


def render(kind: str, split: str, seed: int, index: int) -> tuple[np.ndarray, int, str]:
    """Glyph `index` of (kind, split, seed): (uint8 [28,28] image, label, origin "face:char")."""
    chars = KINDS[kind]
    label = index % len(chars)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    ch = chars[label]
    if kind == "letters" and rng.random() < 0.5:
        ch = ch.upper()
    table = faces()
    for _ in range(64):      # a font without this character: draw another face
        face, path = table[int(rng.integers(len(table)))]
        if face == "hershey" or _has_glyph(path, ch):
            break
    else:
        raise DpldmError(f"source glyphs: no face draws {ch!r}")
    a = _draw_hershey(path, ch, rng) if face == "hershey" else _draw_font(path, ch, rng)
    return mnist_normalise(_distort(a, rng)), label, f"{Path(path).name}:{ch}"


class GlyphSource:
    """`glyphs:digits[:SEED]` / `glyphs:letters[:SEED]`: rendered on demand (random access, deterministic)."""

    def __init__(self, kind: str, split: str, seed: int = 0):
        if kind not in KINDS:
            raise DpldmError(f"source glyphs:{kind}: expected glyphs:digits or glyphs:letters")
        faces()    # fail early, naming a missing font package
        self.kind, self.split, self.seed = kind, split, seed
        self.name = f"glyphs:{kind}" + (f":{seed}" if seed else "")
        self.class_names = list(KINDS[kind])

    def __len__(self) -> int:
        return SIZES[self.split]

    def record(self, i: int) -> Record:
        image, label, origin = render(self.kind, self.split, self.seed, i)
        return Record(i, image, label, None, origin)

    def __iter__(self) -> Iterator[Record]:
        return (self.record(i) for i in range(len(self)))


def glyph_source(spec: str, split: str) -> GlyphSource:
    """Parse `glyphs:KIND[:SEED]` (SEED a non-negative public integer, default 0)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise DpldmError(f"source {spec!r}: expected glyphs:digits, glyphs:letters or glyphs:KIND:SEED")
    seed = 0
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise DpldmError(f"source {spec!r}: SEED must be a non-negative integer; got {parts[2]!r}")
        seed = int(parts[2])
    return GlyphSource(parts[1], split, seed)
