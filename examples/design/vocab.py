"""Names and constants of the design world: formats, goals, layouts, palettes, colour classes.

One canonical order for every categorical field (the seed mixed ``[goal, tone, format]`` and
``[goal, format, tone]``; here a design's metadata is always ``goal, format, tone``). Integer
labels are positions in these tuples.

Colour classes (the structure map's channel 2): ``0`` is the background, whatever its RGB (the
background colour is jittered per design, so it is a class of its own and never shares an id with
black); ``1 + 3 * palette + slot`` is slot ``slot`` of palette ``palette``. So there are
``NUM_COLORS = 19`` classes (the seed had 18 with the background merged into black).

Hierarchy values are integers out of ``HIERARCHY_SCALE`` (stored exactly as uint8 codes); each
element of a design has its own value, so the hierarchy map tells the elements apart.
"""
from __future__ import annotations

__all__ = [
    "BACKGROUND_ID",
    "BACKGROUND_JITTER",
    "ELEMENT_TYPES",
    "FORMATS",
    "GOALS",
    "GRAMMAR_NAMES",
    "HIERARCHY_LEVELS",
    "HIERARCHY_SCALE",
    "LATENT_NAMES",
    "LAYOUTS",
    "MAX_BODY",
    "MAX_IMAGES",
    "NUM_COLORS",
    "PALETTES",
    "PALETTE_BACKGROUNDS",
    "PALETTE_RGB",
    "WORDS",
    "color_id",
    "color_rgb",
]

FORMATS: tuple[str, ...] = ("poster", "social_post", "flyer", "banner")
GOALS: tuple[str, ...] = ("promote_event", "announce_product", "share_info", "inspire", "educate",
                          "advertise", "celebrate", "inform", "motivate", "brand_awareness")
# Where the headline's box sits decides the layout (see layout.py): the rendering reveals it.
LAYOUTS: tuple[str, ...] = ("left_aligned", "center_aligned", "right_aligned", "split")
PALETTES: tuple[str, ...] = ("monochrome", "vibrant", "pastel", "corporate", "warm", "cool")
GRAMMAR_NAMES: tuple[str, ...] = ("alignment", "contrast", "whitespace", "hierarchy")
ELEMENT_TYPES: tuple[str, ...] = ("headline", "subheadline", "body", "cta", "image")
# The discrete latents a rendering reveals, in the order of ``Latents`` and the stored ``latents`` field.
LATENT_NAMES: tuple[str, ...] = ("palette", "layout", "has_subheadline", "has_cta", "num_body", "num_images")
MAX_BODY, MAX_IMAGES = 3, 2

# Slot 0: headline and body ink, CTA button; slot 1: subheadline ink, image fill; slot 2: CTA text, image motif.
PALETTE_RGB: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((20, 20, 20), (90, 90, 90), (160, 160, 160)),  # monochrome
    ((255, 0, 110), (58, 134, 255), (255, 190, 11)),  # vibrant
    ((109, 104, 117), (255, 200, 221), (189, 224, 254)),  # pastel
    ((0, 48, 73), (102, 155, 188), (247, 127, 0)),  # corporate
    ((157, 2, 8), (232, 93, 4), (250, 163, 7)),  # warm
    ((3, 4, 94), (0, 150, 199), (144, 224, 239)),  # cool
)
# Base background of each palette; a design adds a uniform integer jitter in
# [-BACKGROUND_JITTER, BACKGROUND_JITTER] per channel (clipped to 0..255). The ranges never reach
# one of the palette's own colours, so the RGB image tells the background from every element.
PALETTE_BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (238, 238, 232), (28, 22, 48), (246, 240, 236), (242, 245, 248), (252, 240, 222), (228, 244, 248))
BACKGROUND_JITTER = 22
NUM_COLORS = 1 + 3 * len(PALETTES)
BACKGROUND_ID = 0

HIERARCHY_SCALE = 20
# Per element type: the value of the first element of that type; later body blocks and images
# step down by one level each (body 10, 9, 8; images 12, 11).
HIERARCHY_LEVELS: dict[str, int] = {"headline": 20, "cta": 18, "subheadline": 16, "image": 12, "body": 10}

# Texts are drawn from this list independently of goal and format (word lengths set glyph widths,
# so goal-dependent texts would leak the goal through the rendering beyond the tables).
WORDS: tuple[str, ...] = (
    "summer", "jazz", "night", "new", "launch", "learn", "more", "today", "join", "us", "free", "open",
    "studio", "design", "week", "city", "market", "fresh", "ideas", "the", "future", "of", "work", "live",
    "music", "art", "fair", "grand", "opening", "sale", "now", "on", "your", "best", "life", "starts",
    "here", "read", "guide", "tips", "and", "tricks", "for", "every", "day", "shop", "local", "good",
    "food", "coffee", "club", "members", "only", "spring", "collection", "meet", "team", "build", "with",
    "data", "science", "in", "practice", "a", "festival", "lights", "run", "win", "big", "save", "time",
)


def color_id(palette: int, slot: int) -> int:
    """Colour class of ``slot`` (0..2) of palette ``palette`` (0..5); the background is 0."""
    if not 0 <= palette < len(PALETTES) or not 0 <= slot < 3:
        raise ValueError(f"(palette, slot): expected palette in 0..{len(PALETTES) - 1} and slot in 0..2, "
                         f"got {(palette, slot)}")
    return 1 + 3 * palette + slot


def color_rgb(cid: int) -> tuple[int, int, int]:
    """RGB (uint8 values) of a non-background colour class."""
    if not 1 <= cid < NUM_COLORS:
        raise ValueError(f"cid: expected 1..{NUM_COLORS - 1} (0 is the per-design background), got {cid}")
    return PALETTE_RGB[(cid - 1) // 3][(cid - 1) % 3]
