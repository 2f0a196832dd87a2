r"""Attention patterns: sparse masks and score modifications, each one small function used by the dense and
flex backends (the triton backend computes the windows; backends.py says which backend computes what).

Like the rules in masks.py, every function here is elementwise torch: the dense backend calls it on
broadcast grids of (query, key) pairs to materialise its mask, FlexAttention calls it on 0-d tensors
inside its mask_mod / score_mod. All of them read ORIGINAL positions (the `positions` tensor, -1 for
padding), never indices, so they mean the same thing in the permuted two-stream layout as in natural
order. The backends AND a pattern's masks with `two_stream_visible` and `is_real_token`: a pattern can
only hide more, never reveal what the MPNet rules or padding hide.

Masks (d = key position - query position):

    window:W          |d| <= W                                    (`within_window`, masks.py)
    neighbourhood:R   |d| <= R: in 1-D the same rule as window:R  (`within_radius` is `within_window`)
    dilated:W:D       |d| <= W*D and d % D == 0                   (`within_dilated_window`)
    global:W[:P...]   window W, plus positions P (default 0, <s>) see and are seen by all
    block:B           q // B == k // B                            (`same_block`)
    swin:B            block:B on even layers, blocks shifted by B//2 on odd layers (`same_shifted_block`)
    prefix:P          positions < P see each other; later ones see the prefix and positions <= their own
    (documents)       q and k in the same document: applied whenever `document_ids` are given

Score modifications, applied in the order written, after the relative-position bias:

    softcap:C         C * tanh(score / C)                         (`soft_cap`)
    alibi             score - slope_h * |d|, the standard geometric slopes  (`alibi`)

Several specs compose with commas (`block:64,softcap:30`): masks are intersected, score mods chained.
Document isolation is not a spec: it belongs to the batch (which tokens were packed together), not to
the model, so it is driven by the `document_ids` a caller passes (see packing.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError
from .masks import within_window

# ----------------------------------------------------------------------------------- mask rules

# A 1-D neighbourhood of radius r is |d| <= r: exactly the sliding window, so it is the same function.
# (NATTEN's neighbourhood attention also shifts the window inward at the sequence ends so every query
# sees 2r + 1 keys; that variant needs each row's length and is not what this name means here.)
within_radius = within_window


def within_dilated_window(q_position, kv_position, window: int, dilation: int):
    """Every dilation-th position, up to `window` steps of `dilation` either side: |d| <= w*D, D | d."""
    distance = kv_position - q_position
    return within_window(q_position, kv_position, window * dilation) & (distance % dilation == 0)


def global_or_within_window(q_position, kv_position, window: int, global_positions: tuple[int, ...]):
    """Longformer: the global positions see every position and every position sees them; the rest
    see their window."""
    keep = within_window(q_position, kv_position, window)
    for position in global_positions:
        keep = keep | (q_position == position) | (kv_position == position)
    return keep


def same_block(q_position, kv_position, block: int):
    """Non-overlapping blocks of `block` positions: [0, B), [B, 2B), ..."""
    return q_position // block == kv_position // block


def same_shifted_block(q_position, kv_position, block: int):
    """Swin's shifted partition in 1-D: the block borders move by B // 2, so the first block is
    [0, B//2) and the others straddle the plain blocks' borders. (Swin's cyclic shift plus its mask
    computes exactly this on a non-cyclic sequence: wrapped-around tokens never see each other.)"""
    shift = block // 2
    return same_block(q_position - shift, kv_position - shift, block)


def prefix_lm_visible(q_position, kv_position, prefix: int):
    """Prefix-LM: positions < prefix form a bidirectional block; a later position sees the prefix and
    every position up to its own (causal), and no prefix position sees past the prefix."""
    return (kv_position < prefix) | (kv_position <= q_position)


def same_document(q_document, kv_document):
    """Packed rows: a token attends only to tokens of its own document."""
    return q_document == kv_document


# ------------------------------------------------------------------------------ score rules


def soft_cap(score, cap: float):
    """Gemma 2's logit soft-capping: smooth, odd, bounded by +-cap, ~identity for |score| << cap."""
    return cap * torch.tanh(score / cap)


def alibi_slope(head, num_heads: int):
    """ALiBi's slope of `head` (Press et al.): 2^(-8(h+1)/H) for a power-of-two H. Otherwise the first
    c = 2^floor(log2 H) heads take c's slopes and the rest every other slope of 2c's series (odd
    powers), as the reference `get_slopes` does. Arithmetic on `head` only: no captured table."""
    c = 2 ** int(math.floor(math.log2(num_heads)))
    exponent = torch.where(head < c, (head + 1) * (8.0 / c), (2 * (head - c) + 1) * (4.0 / c))
    return torch.exp2(-exponent)


def alibi(score, head, q_position, kv_position, num_heads: int):
    """Linear distance penalty on ORIGINAL positions: score - slope_h * |d|."""
    return score - alibi_slope(head, num_heads) * (kv_position - q_position).abs()


# ------------------------------------------------------------------------------- a pattern


@dataclass(frozen=True)
class PatternPart:
    """One comma-separated piece of a spec, parsed once: what a backend asks of a pattern (which rules,
    which window) is read from these, never from the spec text again."""

    text: str  # as written, e.g. 'neighborhood:5'
    name: str  # the rule's name, aliases resolved ('neighbourhood')
    numbers: tuple = ()
    is_mask: bool = True  # else a score modification
    window: int | None = None  # W when the part's mask is exactly the sliding window |d| <= W


@dataclass(frozen=True)
class AttentionPattern:
    """A parsed spec: its masks (intersected) and score modifications (chained in order).

    masks: (q_position, kv_position, layer) -> bool; `layer` is the layer's parity (0 even, 1 odd).
    scores: (score, head, q_position, kv_position, num_heads) -> score.
    parts: the spec's pieces, one per rule (a pattern built by hand from functions has none).
    """

    spec: str = ""
    masks: tuple[Callable, ...] = ()
    scores: tuple[Callable, ...] = ()
    alternates: bool = False  # a mask differs on odd layers (swin)
    parts: tuple[PatternPart, ...] = ()

    @property
    def layer_variants(self) -> int:
        """How many attention states a forward pass needs: layer i uses state i % layer_variants."""
        return 2 if self.alternates else 1

    @property
    def window(self) -> int | None:
        """The narrowest sliding window among the parts (windows intersect: the smallest one rules); None
        when no part is a window."""
        # A list, not min(generator, default=...): torch.compile traces this (the triton backend's
        # supported_window) and cannot trace a generator with a default.
        windows = [part.window for part in self.parts if part.window is not None]
        return min(windows) if windows else None

    @property
    def masks_are_windows(self) -> bool:
        """Whether every mask is a sliding window (True without masks), so that `window` is the whole mask.
        Each window part holds one mask; a mask no part accounts for (built by hand) is not a window."""
        return len(self.masks) == sum(part.window is not None for part in self.parts)

    def parts_outside(self, names) -> list[str]:
        """The parts (as written) whose rule is not among `names`: what a backend supporting only those
        rules cannot apply."""
        return [part.text for part in self.parts if part.name not in names]

    def visible(self, q_position, kv_position, layer: int = 0, q_document=None, kv_document=None):
        """AND of the pattern's masks (and document isolation when documents are given). Python True
        when there is nothing to apply, so `rules & pattern.visible(...)` costs nothing then."""
        keep = True
        for mask in self.masks:
            keep = keep & mask(q_position, kv_position, layer)
        if q_document is not None:
            keep = keep & same_document(q_document, kv_document)
        return keep

    def modify_score(self, score, head, q_position, kv_position, num_heads: int):
        for modify in self.scores:
            score = modify(score, head, q_position, kv_position, num_heads)
        return score


def _positive(numbers):
    return all(x >= 1 for x in numbers)


@dataclass(frozen=True)
class _Entry:
    usage: str
    build: Callable  # (*numbers) -> AttentionPattern with one mask or one score rule
    arity: tuple[int, int | None]  # (fewest, most) arguments; None = any number
    number: type = int
    valid: Callable = _positive
    requirement: str = "positive integers"
    window: Callable | None = None  # numbers -> W, for the rules whose mask is the sliding window |d| <= W

    @property
    def name(self) -> str:
        return self.usage.partition(":")[0]


def _mask(rule, alternates=False):
    return AttentionPattern(masks=(rule,), alternates=alternates)


def _window(w):
    return _mask(lambda q, k, layer: within_window(q, k, w))


def _radius(r):
    return _mask(lambda q, k, layer: within_radius(q, k, r))


def _dilated(w, dilation):
    return _mask(lambda q, k, layer: within_dilated_window(q, k, w, dilation))


def _global(w, *positions):
    positions = positions or (0,)
    return _mask(lambda q, k, layer: global_or_within_window(q, k, w, positions))


def _block(b):
    return _mask(lambda q, k, layer: same_block(q, k, b))


def _swin(b):
    return _mask(lambda q, k, layer: same_shifted_block(q, k, b) if layer % 2 else same_block(q, k, b),
                 alternates=True)


def _prefix(p):
    return _mask(lambda q, k, layer: prefix_lm_visible(q, k, p))


def _softcap(cap):
    return AttentionPattern(scores=(lambda score, h, q, k, heads: soft_cap(score, cap),))


def _alibi():
    return AttentionPattern(scores=(alibi,))


PATTERNS: dict[str, _Entry] = {
    "window": _Entry("window:W", _window, (1, 1), window=lambda xs: xs[0]),
    "neighbourhood": _Entry("neighbourhood:R", _radius, (1, 1), window=lambda xs: xs[0]),  # within_radius
    "dilated": _Entry("dilated:W:D", _dilated, (2, 2)),
    "global": _Entry("global:W[:P...]", _global, (1, None),
                     valid=lambda xs: xs[0] >= 1 and all(p >= 0 for p in xs[1:]),
                     requirement="a positive window and global positions >= 0"),
    "block": _Entry("block:B", _block, (1, 1)),
    "swin": _Entry("swin:B", _swin, (1, 1), valid=lambda xs: xs[0] >= 2,
                   requirement="B >= 2, so that the shift B // 2 moves the blocks"),
    "prefix": _Entry("prefix:P", _prefix, (1, 1), valid=lambda xs: xs[0] >= 0, requirement="P >= 0"),
    "softcap": _Entry("softcap:C", _softcap, (1, 1), float,
                      valid=lambda xs: math.isfinite(xs[0]) and xs[0] > 0, requirement="a positive finite cap"),
    "alibi": _Entry("alibi", _alibi, (0, 0)),
}
PATTERNS["neighborhood"] = PATTERNS["neighbourhood"]
PATTERN_NAMES = frozenset(entry.name for entry in PATTERNS.values())  # every rule, aliases resolved
WINDOW_NAMES = frozenset(entry.name for entry in PATTERNS.values() if entry.window is not None)


class BadAttentionPattern(UserError):
    pass


def valid_patterns() -> str:
    usages = dict.fromkeys(entry.usage for entry in PATTERNS.values())
    return ", ".join(usages)


def _bad(spec: str, problem: str) -> BadAttentionPattern:
    return BadAttentionPattern(
        f"attention pattern '{spec}': {problem}; valid patterns are {valid_patterns()}, "
        "several joined by commas (e.g. block:64,softcap:30)")


def _parse_numbers(spec, part, entry, texts):
    fewest, most = entry.arity
    if len(texts) < fewest or (most is not None and len(texts) > most):
        raise _bad(spec, f"'{part}' should look like {entry.usage}")
    try:
        numbers = [entry.number(text) for text in texts]
    except ValueError:
        raise _bad(spec, f"'{part}' needs {entry.number.__name__} arguments ({entry.usage})") from None
    if not entry.valid(numbers):
        raise _bad(spec, f"'{part}' needs {entry.requirement}")
    return numbers


@functools.lru_cache(maxsize=None)
def parse_attention_pattern(spec: str | None) -> AttentionPattern:
    """'block:64,softcap:30' -> AttentionPattern. Cached: the same spec gives the same object (and the
    same rule functions), so FlexAttention's compiled kernels are reused from one batch to the next."""
    spec = (spec or "").strip()
    masks, scores, alternates, parts = [], [], False, []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, *texts = part.split(":")
        entry = PATTERNS.get(name.strip().lower())
        if entry is None:
            raise _bad(spec, f"unknown name '{name}'")
        numbers = _parse_numbers(spec, part, entry, texts)
        piece = entry.build(*numbers)
        masks += piece.masks
        scores += piece.scores
        alternates |= piece.alternates
        parts.append(PatternPart(part, entry.name, tuple(numbers), bool(piece.masks),
                                 entry.window(numbers) if entry.window else None))
    return AttentionPattern(spec, tuple(masks), tuple(scores), alternates, tuple(parts))


def window_spec(size: int | None) -> str | None:
    """A sliding window of `size` tokens written as the pattern it is ('window:SIZE'); None: no window."""
    return None if size is None else f"window:{int(size)}"


def as_pattern(pattern: str | AttentionPattern | None = None, window: int | None = None) -> AttentionPattern:
    """The pattern a backend applies: `pattern` (a spec or a parsed pattern), intersected with a
    sliding window when `window` (`sliding_window_size`, kept as shorthand for window:N) is set."""
    if isinstance(pattern, AttentionPattern):
        if window is None:
            return pattern
        pattern = pattern.spec
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"an attention pattern is a spec string or an AttentionPattern, not {pattern!r} "
                        "(a sliding window of W tokens is the pattern 'window:W', see window_spec)")
    parts = ([f"window:{int(window)}"] if window is not None else []) + ([pattern] if pattern else [])
    return parse_attention_pattern(",".join(parts))
