"""The hybrid layer pattern: one string that describes the whole layer stack.

The language is Megatron-LM's ``--hybrid-layer-pattern``, extended with fusion groups:

    symbol  layer                       kind
    M       Mamba2                      sequence mixer
    G       Gated DeltaNet              sequence mixer
    *       self-attention              sequence mixer
    D       DeepSeek sparse attention   sequence mixer
    +       MLA                         sequence mixer
    -       MLP                         channel mixer
    E       MoE                         channel mixer

    |       pipeline-stage boundary (main decoder only); a segment may be empty, as in
            Megatron-Core ("||M*" is three stages, the first two empty)
    /       multi-token-prediction (MTP) depth: ``main/mtp/mtp/...``, every MTP part identical;
            trailing ``/`` with nothing after them mean "no MTP"
    [XY]    fusion group: one sequence mixer X then one channel mixer Y, built as ONE
            physical block (X its sequence mixer, Y its channel mixer)

Two ways of counting layers, both needed downstream:

* physical blocks (a fusion group counts once) drive module containers and pipeline stages;
* canonical sub-layers (every symbol counts) drive checkpoint keys. A fused block's two
  sub-layers get consecutive canonical indices, and the numbering is global over the whole
  main decoder (it does not restart at a ``|``). Each MTP depth is numbered on its own,
  starting at 0.

``parse_hybrid_pattern`` checks every rule up front and raises ``PatternError`` (a
``ValueError``) whose message quotes the pattern with a caret under the offending character.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "CHANNEL_MIXERS",
    "SEQUENCE_MIXERS",
    "SYMBOLS",
    "SYMBOL_NAMES",
    "HybridPattern",
    "PatternError",
    "channel_symbol",
    "is_fused",
    "parse_hybrid_pattern",
    "sequence_symbol",
]

# Insertion order is the order used by layer_counts() and by error messages.
SYMBOL_NAMES = {
    "M": "Mamba2",
    "*": "attention",
    "-": "MLP",
    "E": "MoE",
    "G": "Gated DeltaNet",
    "D": "DeepSeek sparse attention",
    "+": "MLA",
}
SYMBOLS = frozenset(SYMBOL_NAMES)
SEQUENCE_MIXERS = frozenset("MG*D+")
CHANNEL_MIXERS = frozenset("-E")
assert SEQUENCE_MIXERS | CHANNEL_MIXERS == SYMBOLS and not SEQUENCE_MIXERS & CHANNEL_MIXERS

PIPE = "|"
MTP_SEPARATOR = "/"
GROUP_OPEN = "["
GROUP_CLOSE = "]"

# '*' is plain self-attention; 'D' and '+' replace it with DeepSeek-style attention, and a model
# is built with one attention flavour, so the two families may not share a pattern.
_ATTENTION = "*"
_DEEPSEEK_ATTENTION = frozenset("D+")


def _listed(symbols: frozenset[str]) -> str:
    """The given symbols, sequence mixers first, space separated (for messages)."""
    return " ".join(s for s in "MG*D+-E" if s in symbols)


_GROUP_HINT = (
    f"a fusion group is one sequence mixer ({_listed(SEQUENCE_MIXERS)}) followed by one "
    f"channel mixer ({_listed(CHANNEL_MIXERS)}), e.g. [*-] or [ME]"
)
_SYMBOL_HINT = (
    "valid symbols: "
    + ", ".join(f"{s} ({name})" for s, name in SYMBOL_NAMES.items())
    + "; separators: | (pipeline stage), / (MTP depth), [ ] (fusion group)"
)
_MAIN_HINT = (
    "the main decoder needs at least one layer; '|' segments may be empty (e.g. ||M*), but not "
    "all of them"
)
_MTP_HINT = (
    "after the main decoder, each '/' starts one MTP depth and every depth repeats the same "
    "layers, e.g. M*M-/MM/MM; trailing '/' with nothing after them mean no MTP"
)
_INDENT = "  "  # indent of the quoted pattern and of the caret line in error messages


class PatternError(ValueError):
    """A hybrid layer pattern that breaks a rule of the language.

    Attributes:
        reason: what is wrong, in one line.
        text: the pattern as given (None when the input was not a string).
        position: 0-based index into ``text`` of the offending character, ``len(text)``
            when something is missing at the very end (e.g. the empty pattern), or None when
            no single character is to blame.
        hint: what would be valid instead.
    """

    def __init__(
        self,
        reason: str,
        text: str | None = None,
        position: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.text = text
        self.position = position
        self.hint = hint
        super().__init__(_format_error(reason, text, position, hint))

    def __reduce__(self):
        # Keep the structured fields when pickled (e.g. sent between processes).
        return type(self), (self.reason, self.text, self.position, self.hint)


def _format_error(reason: str, text: str | None, position: int | None, hint: str | None) -> str:
    lines = [f"invalid hybrid layer pattern: {reason}"]
    if text is not None:
        # One column per character so the caret lines up: blank out tabs, newlines etc.
        lines.append(_INDENT + "".join(c if c.isprintable() else " " for c in text))
        if position is not None:
            lines.append(_INDENT + " " * position + "^")
    if hint:
        lines.append(hint)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Blocks: a block is a str of one symbol, or of two symbols for a fusion group.


def is_fused(block: str) -> bool:
    """True if ``block`` is a fusion group (a sequence mixer and a channel mixer in one block).

    Raises ValueError if ``block`` is not a valid block.
    """
    _check_block(block)
    return len(block) == 2


def sequence_symbol(block: str) -> str | None:
    """The sequence-mixer symbol of ``block``, or None if it has none ("-" -> None).

    Raises ValueError if ``block`` is not a valid block.
    """
    _check_block(block)
    return block[0] if block[0] in SEQUENCE_MIXERS else None


def channel_symbol(block: str) -> str | None:
    """The channel-mixer symbol of ``block``, or None if it has none ("M" -> None).

    Raises ValueError if ``block`` is not a valid block.
    """
    _check_block(block)
    return block[-1] if block[-1] in CHANNEL_MIXERS else None


def _check_block(block: str) -> None:
    """Raise ValueError unless ``block`` is one symbol or a (sequence, channel) pair."""
    if isinstance(block, str) and (
        (len(block) == 1 and block in SYMBOLS)
        or (len(block) == 2 and block[0] in SEQUENCE_MIXERS and block[1] in CHANNEL_MIXERS)
    ):
        return
    raise ValueError(
        f"{block!r} is not a block: a block is one symbol ({_listed(SYMBOLS)}) or a sequence "
        f"mixer followed by a channel mixer, e.g. '*-'"
    )


def _render(blocks: tuple[str, ...]) -> str:
    """Pattern text of a run of blocks; fused blocks get their brackets back."""
    return "".join(f"{GROUP_OPEN}{b}{GROUP_CLOSE}" if len(b) == 2 else b for b in blocks)


def _check_index(index: int, size: int, what: str, pattern: HybridPattern) -> int:
    """``index`` as an int in ``range(size)``; IndexError otherwise (negatives are refused:
    an index from the end is more likely a bug than a wish here)."""
    index = operator.index(index)
    if not 0 <= index < size:
        raise IndexError(
            f"{what} {index} is out of range for pattern {str(pattern)!r}: "
            f"valid indices are range({size})"
        )
    return index


def _canonical_layers(blocks: tuple[str, ...], block_index: int) -> tuple[int, ...]:
    start = sum(len(b) for b in blocks[:block_index])
    return tuple(range(start, start + len(blocks[block_index])))


# --------------------------------------------------------------------------------------------
# The parsed pattern.


@dataclass(frozen=True)
class HybridPattern:
    """A validated hybrid layer pattern; immutable, hashable, compared by value.

    Fields:
        stages: the main decoder's pipeline segments, each a tuple of blocks.
        mtp_blocks: the blocks of one MTP depth (``()`` when there is no MTP).
        mtp_depths: how many times the MTP part repeats (0 when there is no MTP).

    Build one with ``parse_hybrid_pattern``. Constructing it directly checks the same rules
    and raises PatternError (or TypeError for fields of the wrong type).
    """

    stages: tuple[tuple[str, ...], ...]
    mtp_blocks: tuple[str, ...] = ()
    mtp_depths: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.stages, tuple) and all(isinstance(s, tuple) for s in self.stages)):
            raise TypeError(f"stages must be a tuple of tuples of blocks, got {self.stages!r}")
        if not isinstance(self.mtp_blocks, tuple):
            raise TypeError(f"mtp_blocks must be a tuple of blocks, got {self.mtp_blocks!r}")
        if type(self.mtp_depths) is not int:
            raise TypeError(f"mtp_depths must be an int, got {self.mtp_depths!r}")
        for block in self.blocks + self.mtp_blocks:
            if not (isinstance(block, str) and 1 <= len(block) <= 2 and set(block) <= SYMBOLS):
                raise PatternError(f"{block!r} is not a block", hint=_GROUP_HINT)
        if self.mtp_depths < 0 or (self.mtp_depths == 0) != (not self.mtp_blocks):
            raise PatternError(
                f"mtp_blocks={self.mtp_blocks!r} and mtp_depths={self.mtp_depths} disagree",
                hint="give both (MTP blocks and a depth >= 1) or neither",
            )
        # The text form is the one definition of validity: render and re-parse so that direct
        # construction cannot bypass a rule (the error then quotes the rendered pattern).
        parsed = _parse(str(self))
        assert parsed == (self.stages, self.mtp_blocks, self.mtp_depths), (parsed, self)

    def __str__(self) -> str:
        """The normalized pattern text; ``parse_hybrid_pattern(str(p)) == p``."""
        main = PIPE.join(_render(stage) for stage in self.stages)
        return main + (MTP_SEPARATOR + _render(self.mtp_blocks)) * self.mtp_depths

    # -- main decoder ------------------------------------------------------------------------

    @property
    def blocks(self) -> tuple[str, ...]:
        """Physical blocks of the main decoder, in order, across all stages."""
        return tuple(block for stage in self.stages for block in stage)

    @property
    def num_blocks(self) -> int:
        """Number of physical blocks of the main decoder (a fusion group counts once)."""
        return sum(len(stage) for stage in self.stages)

    @property
    def num_layers(self) -> int:
        """Number of canonical sub-layers of the main decoder (every symbol counts)."""
        return sum(len(block) for block in self.blocks)

    @property
    def num_stages(self) -> int:
        """Number of pipeline segments (``|``-separated parts) of the main decoder."""
        return len(self.stages)

    def canonical_layers(self, block_index: int) -> tuple[int, ...]:
        """Canonical indices (1 or 2 consecutive ints) of main-decoder block ``block_index``.

        Raises IndexError if ``block_index`` is not in ``range(num_blocks)``.
        """
        index = _check_index(block_index, self.num_blocks, "block index", self)
        return _canonical_layers(self.blocks, index)

    def physical_block(self, canonical_index: int) -> int:
        """Index of the main-decoder block that holds canonical sub-layer ``canonical_index``.

        The inverse of ``canonical_layers``. Raises IndexError if ``canonical_index`` is not
        in ``range(num_layers)``.
        """
        remaining = _check_index(canonical_index, self.num_layers, "canonical layer index", self)
        for block_index, block in enumerate(self.blocks):
            if remaining < len(block):
                return block_index
            remaining -= len(block)
        raise AssertionError("unreachable: index was range-checked")

    def stage_of_block(self, block_index: int) -> int:
        """Pipeline stage (0-based) that owns main-decoder block ``block_index``.

        Raises IndexError if ``block_index`` is not in ``range(num_blocks)``.
        """
        remaining = _check_index(block_index, self.num_blocks, "block index", self)
        for stage_index, stage in enumerate(self.stages):
            if remaining < len(stage):
                return stage_index
            remaining -= len(stage)
        raise AssertionError("unreachable: index was range-checked")

    def stage_block_range(self, stage_index: int) -> range:
        """Global indices of the blocks in pipeline stage ``stage_index``.

        Raises IndexError if ``stage_index`` is not in ``range(num_stages)``.
        """
        index = _check_index(stage_index, self.num_stages, "stage index", self)
        start = sum(len(stage) for stage in self.stages[:index])
        return range(start, start + len(self.stages[index]))

    # -- multi-token prediction --------------------------------------------------------------

    @property
    def mtp_num_layers(self) -> int:
        """Canonical sub-layers in ONE MTP depth (0 when there is no MTP)."""
        return sum(len(block) for block in self.mtp_blocks)

    def mtp_canonical_layers(self, block_index: int) -> tuple[int, ...]:
        """Canonical indices of block ``block_index`` within one MTP depth (numbered from 0).

        Every depth has the same blocks, so this does not depend on the depth.
        Raises IndexError if ``block_index`` is not in ``range(len(mtp_blocks))``.
        """
        index = _check_index(block_index, len(self.mtp_blocks), "MTP block index", self)
        return _canonical_layers(self.mtp_blocks, index)

    # -- totals ------------------------------------------------------------------------------

    def layer_counts(self) -> dict[str, int]:
        """Sub-layers per symbol, main decoder plus every MTP depth; every symbol is a key."""
        counts = dict.fromkeys(SYMBOL_NAMES, 0)
        for block in self.blocks:
            for symbol in block:
                counts[symbol] += 1
        for block in self.mtp_blocks:
            for symbol in block:
                counts[symbol] += self.mtp_depths
        return counts


def parse_hybrid_pattern(text: str) -> HybridPattern:
    """Parse and validate a hybrid layer pattern such as ``"M[*-]|[ME]/MM/MM"``.

    Leading and trailing whitespace is ignored; any other whitespace is an error.
    Raises PatternError (a ValueError) at the first broken rule, with ``position`` indexing
    into ``text`` as given.
    """
    stages, mtp_blocks, mtp_depths = _parse(text)
    return HybridPattern(stages, mtp_blocks, mtp_depths)


# --------------------------------------------------------------------------------------------
# The parser: one left-to-right pass that fails at the first problem.

_Located = tuple[str, int]  # a block and the position of its first character ('[' if fused)


def _parse(text: str) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...], int]:
    """(stages, mtp_blocks, mtp_depths) of ``text``; raises PatternError."""
    if not isinstance(text, str):
        raise PatternError(f"expected a str, got {type(text).__name__}")
    return _Parser(text).run()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.begin = len(text) - len(text.lstrip())
        self.end = len(text.rstrip())
        # parts[0] is the main decoder, parts[1:] the MTP depths; a part is a list of stages,
        # a stage a list of located blocks.
        self.parts: list[list[list[_Located]]] = [[[]]]
        self.stage_opened_by: int | None = None  # position of the separator before this stage
        self.group_start: int | None = None  # position of the open '[', if any
        self.group: list[tuple[str, int]] = []  # symbols seen since that '['
        self.first_attention: int | None = None  # where '*' first appeared
        self.first_deepseek: int | None = None  # where 'D' or '+' first appeared
        # Where the first empty MTP part is to blame (see close_stage): an error only once a
        # non-empty MTP part shows that the '/' were not all trailing.
        self.empty_mtp_part: int | None = None

    def fail(self, reason: str, position: int | None, hint: str | None = None) -> NoReturn:
        raise PatternError(reason, self.text, position, hint)

    @property
    def stage(self) -> list[_Located]:
        return self.parts[-1][-1]

    @property
    def in_mtp(self) -> bool:
        return len(self.parts) > 1

    def run(self):
        if self.begin >= self.end:
            self.fail("the pattern is empty", len(self.text), "write at least one layer, e.g. M*M-")
        for i in range(self.begin, self.end):
            c = self.text[i]
            if c in SYMBOLS:
                self.symbol(c, i)
            elif c == GROUP_OPEN:
                self.open_group(i)
            elif c == GROUP_CLOSE:
                self.close_group(i)
            elif c in (PIPE, MTP_SEPARATOR):
                self.separator(c, i)
            elif c.isspace():
                self.fail(
                    f"whitespace {c!r} at position {i}",
                    i,
                    "remove it; only leading and trailing whitespace is ignored",
                )
            else:
                self.fail(f"unknown symbol {c!r} at position {i}", i, _SYMBOL_HINT)
        return self.finish()

    def symbol(self, c: str, i: int) -> None:
        self.check_no_empty_mtp_part_before()
        self.check_attention_flavour(c, i)
        if self.group_start is not None:
            self.group.append((c, i))
        else:
            self.stage.append((c, i))

    def check_attention_flavour(self, c: str, i: int) -> None:
        if c == _ATTENTION:
            other = self.first_deepseek
            self.first_attention = i if self.first_attention is None else self.first_attention
        elif c in _DEEPSEEK_ATTENTION:
            other = self.first_attention
            self.first_deepseek = i if self.first_deepseek is None else self.first_deepseek
        else:
            return
        if other is not None:
            o = self.text[other]
            self.fail(
                f"{c!r} ({SYMBOL_NAMES[c]}) at position {i} cannot be combined with {o!r} "
                f"({SYMBOL_NAMES[o]}) at position {other}",
                i,
                "a model uses one attention flavour: either '*' (self-attention) or "
                "'D' / '+' (DeepSeek sparse attention / MLA), not both",
            )

    def open_group(self, i: int) -> None:
        self.check_no_empty_mtp_part_before()
        if self.group_start is not None:
            self.fail(
                f"'[' at position {i} opens a fusion group inside the one opened at position "
                f"{self.group_start}; fusion groups cannot be nested",
                i,
                _GROUP_HINT,
            )
        self.group_start, self.group = i, []

    def close_group(self, i: int) -> None:
        start = self.group_start
        if start is None:
            self.fail(f"']' at position {i} has no matching '['", i, _GROUP_HINT)
        group = self.group
        # Point at the first place where the expected symbol is not: ']' when symbols are
        # missing, the third symbol when there are too many, else the misplaced symbol.
        if not group:
            self.fail(f"empty fusion group '[]' at position {start}", i, _GROUP_HINT)
        if len(group) == 1:
            self.fail(
                f"fusion group at position {start} holds one symbol; it needs two", i, _GROUP_HINT
            )
        if len(group) > 2:
            self.fail(
                f"fusion group at position {start} holds {len(group)} symbols; it needs two",
                group[2][1],
                _GROUP_HINT,
            )
        (seq, seq_at), (chan, chan_at) = group
        if seq not in SEQUENCE_MIXERS:
            self.fail(
                f"{seq!r} ({SYMBOL_NAMES[seq]}) at position {seq_at} is a channel mixer; "
                f"a fusion group starts with a sequence mixer",
                seq_at,
                _GROUP_HINT,
            )
        if chan not in CHANNEL_MIXERS:
            self.fail(
                f"{chan!r} ({SYMBOL_NAMES[chan]}) at position {chan_at} is a sequence mixer; "
                f"the second symbol of a fusion group must be a channel mixer",
                chan_at,
                _GROUP_HINT,
            )
        self.stage.append((seq + chan, start))
        self.group_start, self.group = None, []

    def separator(self, c: str, i: int) -> None:
        if self.group_start is not None:
            self.fail(
                f"{c!r} at position {i} is inside the fusion group opened at position "
                f"{self.group_start}",
                i,
                "close the fusion group with ']' first; " + _GROUP_HINT,
            )
        if c == PIPE and self.in_mtp:
            self.fail(
                f"'|' at position {i} is in an MTP part",
                i,
                "pipeline stages ('|') belong to the main decoder, before the first '/'",
            )
        self.close_stage(i)
        if c == PIPE:
            self.parts[-1].append([])
        else:
            self.close_part(i)
            self.parts.append([[]])
        self.stage_opened_by = i

    def close_stage(self, at: int | None) -> None:
        """End the current stage; ``at`` is the separator ending it (None at end of text).

        Empty pipeline segments are legal (Megatron-Core parses "||M" as three stages), as long
        as the main decoder holds a layer somewhere. An empty MTP part is only noted here: it is
        an error once another MTP part holds layers (Megatron-Core reads trailing '/' with
        nothing after them as "no MTP")."""
        if self.stage:
            return
        if self.in_mtp:
            if self.empty_mtp_part is None:
                # Blame the separator that ends the empty part, else the one that opened it.
                self.empty_mtp_part = at if at is not None else self.stage_opened_by
            return
        if at is None or self.text[at] == MTP_SEPARATOR:
            self.check_main_decoder_has_a_layer(at)

    def check_main_decoder_has_a_layer(self, at: int | None) -> None:
        """The main decoder ends (at '/' ``at``, or at the end of the text for None)."""
        if any(self.parts[0]):
            return
        if at is not None:
            self.fail(
                f"the main decoder is empty: '/' at position {at} comes before any layer",
                at,
                "put the main decoder's layers before the first '/', e.g. M*M-/MM",
            )
        self.fail("the main decoder has no layer: every '|' segment is empty", self.end, _MAIN_HINT)

    def check_no_empty_mtp_part_before(self) -> None:
        """A layer of an MTP part: an empty MTP part noted earlier is now an error."""
        if self.in_mtp and self.empty_mtp_part is not None:
            position = self.empty_mtp_part
            self.fail(f"empty MTP part at position {position}", position, _MTP_HINT)

    def close_part(self, at: int | None) -> None:
        """Refuse an MTP part that differs from the first one; ``at`` as in close_stage."""
        if len(self.parts) < 3:
            return  # the main decoder and the first MTP part set no expectation
        expected = [block for block, _ in self.parts[1][0]]
        found = self.parts[-1][0]
        if not found or not expected:
            return  # an empty part: close_stage and finish decide
        depth = len(self.parts) - 1
        reason = (
            f"MTP depth {depth} ({_render(tuple(b for b, _ in found))}) differs from MTP depth 1 "
            f"({_render(tuple(expected))})"
        )
        for j, (block, position) in enumerate(found):
            if j >= len(expected) or block != expected[j]:
                self.fail(f"{reason} at position {position}", position, _MTP_HINT)
        if len(found) < len(expected):
            position = at if at is not None else self.end
            self.fail(f"{reason}: layers missing at position {position}", position, _MTP_HINT)

    def finish(self):
        if self.group_start is not None:
            self.fail(
                f"'[' at position {self.group_start} is never closed",
                self.group_start,
                _GROUP_HINT,
            )
        self.close_stage(None)
        self.close_part(None)
        mtp_parts = [stages[0] for stages in self.parts[1:]]
        if not any(mtp_parts):
            del self.parts[1:]  # "main/" or "main//": trailing '/' mean no MTP
        elif self.empty_mtp_part is not None:  # the last part is empty, an earlier one is not
            position = self.empty_mtp_part
            self.fail(f"empty MTP part at position {position}", position, _MTP_HINT)
        stages = tuple(tuple(block for block, _ in stage) for stage in self.parts[0])
        mtp_blocks = tuple(block for block, _ in self.parts[1][0]) if self.in_mtp else ()
        return stages, mtp_blocks, len(self.parts) - 1
