"""Specification of the hybrid layer pattern language (megatron_hybrid.pattern).

Error positions chosen where the brief left a choice (each has a test below):
* "M[]" -> 2: the ']' where a sequence mixer was expected; "[M]" -> 2 likewise.
* "[M*-]" -> 3: the first symbol beyond two.
* differing MTP parts -> the first block of the later part that differs from depth 1, or the
  place where its missing layers should be.
* empty MTP part -> the separator that ends it, else the one that opens it ("M-/MM/" -> 5).
* no layer in the main decoder -> the '/' that ends it, else the end of the text ("|" -> 1).
* position == len(text) means "something is missing at the very end" (e.g. "" -> 0).
"""

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_hybrid.pattern import (
    CHANNEL_MIXERS,
    SEQUENCE_MIXERS,
    SYMBOL_NAMES,
    SYMBOLS,
    HybridPattern,
    PatternError,
    channel_symbol,
    is_fused,
    parse_hybrid_pattern,
    sequence_symbol,
)

EXAMPLE = "M[*-]|[ME]/MM/MM"


def error_of(text) -> PatternError:
    with pytest.raises(PatternError) as info:
        parse_hybrid_pattern(text)
    return info.value


def position_of_error(text) -> int | None:
    return error_of(text).position


# -- the worked example ----------------------------------------------------------------------


@pytest.fixture
def example() -> HybridPattern:
    return parse_hybrid_pattern(EXAMPLE)


def test_example_stages_hold_blocks_of_one_or_two_symbols(example):
    assert example.stages == (("M", "*-"), ("ME",))


def test_example_blocks_are_the_main_decoder_blocks_in_order(example):
    assert example.blocks == ("M", "*-", "ME")


def test_example_mtp_blocks_and_depths(example):
    assert example.mtp_blocks == ("M", "M")
    assert example.mtp_depths == 2


def test_example_fused_group_counts_once_as_block_twice_as_layer(example):
    assert example.num_blocks == 3
    assert example.num_layers == 5


def test_example_canonical_layers_of_fused_block_are_consecutive(example):
    assert example.canonical_layers(1) == (1, 2)


def test_example_canonical_layers_are_global_across_stages(example):
    assert [example.canonical_layers(b) for b in range(3)] == [(0,), (1, 2), (3, 4)]


def test_example_layer_counts_include_every_mtp_depth_and_every_symbol(example):
    assert example.layer_counts() == {"M": 6, "*": 1, "-": 1, "E": 1, "G": 0, "D": 0, "+": 0}


def test_example_str_is_normalized_and_round_trips(example):
    assert str(example) == EXAMPLE
    assert parse_hybrid_pattern(str(example)) == example


def test_physical_block_inverts_canonical_layers(example):
    assert [example.physical_block(i) for i in range(5)] == [0, 1, 1, 2, 2]


def test_stage_of_block_and_num_stages(example):
    assert example.num_stages == 2
    assert [example.stage_of_block(b) for b in range(3)] == [0, 0, 1]


def test_stage_block_range_gives_global_block_indices(example):
    assert example.stage_block_range(0) == range(0, 2)
    assert example.stage_block_range(1) == range(2, 3)


def test_mtp_canonical_layers_restart_at_zero_for_one_depth():
    p = parse_hybrid_pattern("M-/[M-]E/[M-]E")
    assert p.mtp_canonical_layers(0) == (0, 1)
    assert p.mtp_canonical_layers(1) == (2,)
    assert p.mtp_num_layers == 3


# -- accepted variants -----------------------------------------------------------------------


def test_trailing_slash_means_no_mtp():
    p = parse_hybrid_pattern("M-/")
    assert p == parse_hybrid_pattern("M-")
    assert p.mtp_depths == 0 and p.mtp_blocks == ()
    assert str(p) == "M-"


def test_leading_and_trailing_whitespace_is_ignored():
    assert parse_hybrid_pattern("  M[*-]\n") == parse_hybrid_pattern("M[*-]")


def test_symbols_not_implemented_yet_still_parse():
    assert parse_hybrid_pattern("G[D-]+E").blocks == ("G", "D-", "+", "E")


def test_brackets_are_allowed_in_mtp_parts():
    assert parse_hybrid_pattern("M/[*E]/[*E]").mtp_blocks == ("*E",)


def test_pattern_is_hashable_and_equal_by_value():
    assert {parse_hybrid_pattern("M|M"), parse_hybrid_pattern("M|M")} == {
        HybridPattern((("M",), ("M",)))
    }
    assert parse_hybrid_pattern("M|M") != parse_hybrid_pattern("MM")


# -- rejected patterns, with the position of the problem -------------------------------------


def test_unclosed_bracket_points_at_it():
    assert position_of_error("M[*-") == 1


def test_unmatched_closing_bracket_points_at_it():
    assert position_of_error("M*-]") == 3


def test_nested_bracket_points_at_inner_opening():
    assert position_of_error("[[*-]]") == 1


def test_empty_group_points_at_closing_bracket():
    assert position_of_error("M[]") == 2


def test_group_of_one_symbol_points_at_closing_bracket():
    assert position_of_error("[M]") == 2


def test_group_of_three_symbols_points_at_third_symbol():
    assert position_of_error("[M*-]") == 3


def test_group_with_channel_mixer_first_points_at_it():
    assert position_of_error("[-*]") == 1


def test_group_of_two_sequence_mixers_points_at_second():
    assert position_of_error("[MM]") == 2


def test_group_of_two_channel_mixers_points_at_first():
    assert position_of_error("[-E]") == 1


def test_pipe_inside_group_points_at_pipe():
    assert position_of_error("[M|-]") == 2


def test_slash_inside_group_points_at_slash():
    assert position_of_error("[M/-]") == 2


def test_unknown_symbol_points_at_it():
    assert position_of_error("M-X") == 2


def test_interior_whitespace_points_at_it():
    assert position_of_error("M -") == 1


def test_different_mtp_parts_point_at_first_differing_block():
    assert position_of_error("M-/M/MM") == 6
    assert position_of_error("M-/M-/ME") == 7
    assert position_of_error("M-/[M-]/M-") == 8


def test_shorter_mtp_part_points_where_layers_are_missing():
    assert position_of_error("M-/MM/M") == 7
    assert position_of_error("M-/MM/M/MM") == 7


def test_pipe_in_mtp_part_points_at_pipe():
    assert position_of_error("M-/M|M") == 4


def test_attention_with_deepseek_sparse_attention_points_at_later_symbol():
    assert position_of_error("M*-D") == 3
    assert position_of_error("D-*") == 2


def test_attention_with_mla_points_at_later_symbol_even_across_mtp():
    assert position_of_error("M*[+-]") == 3
    assert position_of_error("M*/+") == 3


def test_empty_pattern_points_at_its_end():
    assert position_of_error("") == 0
    assert position_of_error("   ") == 3


def test_empty_main_decoder_points_at_slash():
    assert position_of_error("/M") == 0


def test_empty_pipeline_segments_are_stages_as_in_megatron_core():
    assert parse_hybrid_pattern("||M*").stages == ((), (), ("M", "*"))
    assert parse_hybrid_pattern("M||[M-]").stages == (("M",), (), ("M-",))
    assert parse_hybrid_pattern("M|").stages == (("M",), ())
    assert parse_hybrid_pattern("M|/M").stages == (("M",), ())
    assert str(parse_hybrid_pattern("|M*|")) == "|M*|"


def test_main_decoder_without_any_layer_points_at_its_end():
    assert position_of_error("|") == 1
    assert position_of_error("||/M") == 2
    assert "every '|' segment is empty" in str(error_of("||"))


def test_trailing_slashes_with_nothing_after_them_mean_no_mtp():
    for text in ("M-/", "M-//", "M-///"):
        p = parse_hybrid_pattern(text)
        assert (p.mtp_blocks, p.mtp_depths, str(p)) == ((), 0, "M-")


def test_empty_mtp_part_beside_a_non_empty_one_points_at_adjacent_slash():
    assert position_of_error("M-//MM") == 3
    assert position_of_error("M-/MM/") == 5
    assert position_of_error("M-/MM//") == 6
    assert position_of_error("M-//[M-]") == 3


def test_non_string_is_a_pattern_error_without_position():
    assert position_of_error(None) is None


# -- error messages --------------------------------------------------------------------------


def test_pattern_error_is_a_value_error():
    assert isinstance(error_of("M-X"), ValueError)


@pytest.mark.parametrize("text", ["M[*-", "M-X", "[[*-]]", "M-/M/MM", "M*/+", "||"])
def test_message_quotes_pattern_with_caret_under_position(text):
    error = error_of(text)
    lines = str(error).splitlines()
    quoted = next(i for i, line in enumerate(lines) if line.endswith(text))
    indent = len(lines[quoted]) - len(text)
    caret_line = lines[quoted + 1]
    assert caret_line.strip() == "^"
    assert caret_line.index("^") - indent == error.position


def test_message_says_what_a_fusion_group_must_be():
    message = str(error_of("M[*-"))
    assert "never closed" in message
    assert "sequence mixer" in message and "channel mixer" in message


def test_message_lists_valid_symbols_for_unknown_symbol():
    message = str(error_of("M-X"))
    assert all(f"{symbol} ({name})" in message for symbol, name in SYMBOL_NAMES.items())


def test_error_keeps_its_fields_through_pickle():
    error = pickle.loads(pickle.dumps(error_of("M-X")))
    assert (error.text, error.position) == ("M-X", 2)


# -- direct construction and indexing --------------------------------------------------------


def test_direct_construction_enforces_the_same_rules():
    with pytest.raises(PatternError):
        HybridPattern((("-*",),))
    with pytest.raises(PatternError):
        HybridPattern(((), ()))  # no layer in the main decoder
    with pytest.raises(PatternError):
        HybridPattern((("M",),), ("M",), 0)
    with pytest.raises(TypeError):
        HybridPattern([["M"]])


def test_out_of_range_indices_raise_index_error(example):
    for call in (
        lambda: example.canonical_layers(3),
        lambda: example.canonical_layers(-1),
        lambda: example.physical_block(5),
        lambda: example.stage_of_block(3),
        lambda: example.stage_block_range(2),
        lambda: parse_hybrid_pattern("M").mtp_canonical_layers(0),
    ):
        with pytest.raises(IndexError, match="out of range"):
            call()


# -- blocks and constants --------------------------------------------------------------------


def test_block_helpers_split_fused_and_single_blocks():
    assert (is_fused("M"), sequence_symbol("M"), channel_symbol("M")) == (False, "M", None)
    assert (is_fused("-"), sequence_symbol("-"), channel_symbol("-")) == (False, None, "-")
    assert (is_fused("*-"), sequence_symbol("*-"), channel_symbol("*-")) == (True, "*", "-")


def test_block_helpers_reject_non_blocks():
    for bad in ("", "X", "-*", "MM", "M*-"):
        with pytest.raises(ValueError):
            is_fused(bad)


def test_symbol_constants_partition_the_seven_symbols():
    assert SEQUENCE_MIXERS == frozenset("MG*D+") and CHANNEL_MIXERS == frozenset("-E")
    assert SYMBOLS == SEQUENCE_MIXERS | CHANNEL_MIXERS == frozenset(SYMBOL_NAMES)
    assert len(SYMBOLS) == 7


# -- properties ------------------------------------------------------------------------------


def _render(blocks):
    return "".join(f"[{b}]" if len(b) == 2 else b for b in blocks)


def _blocks_without(banned):
    """Every valid block (single symbol or fused pair) that avoids the ``banned`` symbols."""
    seq = sorted(SEQUENCE_MIXERS - set(banned))
    chan = sorted(CHANNEL_MIXERS)
    return st.sampled_from(seq + chan + [s + c for s in seq for c in chan])


# One attention flavour per model: either no '*' or no 'D' / '+'.
_BLOCK_RUNS = [
    st.lists(_blocks_without(banned), min_size=1, max_size=6).map(tuple) for banned in ("*", "D+")
]


@st.composite
def valid_patterns(draw):
    """(text, stages, mtp_blocks, mtp_depths) of a random valid pattern."""
    run = _BLOCK_RUNS[draw(st.integers(0, 1))]
    # '|' segments may be empty, but the main decoder holds a layer somewhere.
    stages = draw(st.lists(run | st.just(()), min_size=1, max_size=4).filter(any))
    stages = tuple(stages)
    depths = draw(st.integers(0, 3))
    mtp = draw(run) if depths else ()
    text = "|".join(_render(stage) for stage in stages) + ("/" + _render(mtp)) * depths
    if not depths:
        text += "/" * draw(st.integers(0, 2))  # trailing '/' mean no MTP
    return text, stages, mtp, depths


PROPERTY = settings(max_examples=200, deadline=None)


@PROPERTY
@given(valid_patterns())
def test_property_parse_gives_drawn_structure_and_str_round_trips(case):
    text, stages, mtp, depths = case
    p = parse_hybrid_pattern(text)
    assert (p.stages, p.mtp_blocks, p.mtp_depths) == (stages, mtp, depths)
    assert parse_hybrid_pattern(str(p)) == p


@PROPERTY
@given(valid_patterns())
def test_property_canonical_layers_enumerate_range_of_num_layers(case):
    p = parse_hybrid_pattern(case[0])
    layers = [p.canonical_layers(b) for b in range(p.num_blocks)]
    assert [i for group in layers for i in group] == list(range(p.num_layers))
    for block, group in zip(p.blocks, layers, strict=True):
        assert len(group) == len(block) == (2 if is_fused(block) else 1)


@PROPERTY
@given(valid_patterns())
def test_property_physical_block_inverts_canonical_layers(case):
    p = parse_hybrid_pattern(case[0])
    for b in range(p.num_blocks):
        assert all(p.physical_block(i) == b for i in p.canonical_layers(b))


@PROPERTY
@given(valid_patterns())
def test_property_layer_counts_sum_to_main_plus_mtp_layers(case):
    p = parse_hybrid_pattern(case[0])
    mtp_layers = sum(len(p.mtp_canonical_layers(j)) for j in range(len(p.mtp_blocks)))
    counts = p.layer_counts()
    assert set(counts) == SYMBOLS
    assert sum(counts.values()) == p.num_layers + p.mtp_depths * mtp_layers


@PROPERTY
@given(valid_patterns())
def test_property_num_blocks_counts_blocks_of_all_stages(case):
    p = parse_hybrid_pattern(case[0])
    assert p.num_blocks == len(p.blocks) == sum(len(s) for s in p.stages)
    assert [p.stage_of_block(b) for b in range(p.num_blocks)] == [
        s for s in range(p.num_stages) for _ in p.stage_block_range(s)
    ]


@PROPERTY
@given(st.text(alphabet="MG*D+-E|/[]X \t", max_size=24))
def test_property_any_text_parses_or_raises_pattern_error_with_position_in_text(text):
    try:
        p = parse_hybrid_pattern(text)
    except PatternError as error:
        assert error.position is not None
        assert 0 <= error.position <= len(text)  # == len(text): missing at the very end
    else:
        assert parse_hybrid_pattern(str(p)) == p
