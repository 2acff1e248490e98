"""Our pattern parser accepts and rejects what Megatron-Core's does.

The table holds the patterns of Megatron-LM's own tests, each with the verdict those tests
assert for Megatron-Core's parser (`megatron/core/models/hybrid/hybrid_layer_allocation.py`,
`parse_hybrid_pattern`): `tests/unit_tests/ssm/test_hybrid_layer_allocation.py` (the class
named in the source column) and the `--hybrid-layer-pattern` of every
`tests/functional_tests/test_cases/hybrid/*/model_config.yaml`. Megatron-Core cannot be
installed here (it needs Python 3.12+), so the verdicts are data, copied with their source.

Where we differ on purpose, the pattern is in DIFFERENCES with the reason, and the README's
"Coming from Megatron-LM" section lists it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_hybrid.pattern import PatternError, parse_hybrid_pattern

REPO = Path(__file__).resolve().parents[1]
UNIT = "test_hybrid_layer_allocation.py::"
FUNCTIONAL = "functional_tests/test_cases/hybrid/"
ACCEPTED, REJECTED = True, False

# (pattern, Megatron-Core's verdict, where Megatron-LM's tests assert it)
MEGATRON_PATTERNS = [
    ("M*-M*-M*-", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("MMMMMMMMM", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("MM*-MM*-", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("E", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("", ACCEPTED, UNIT + "TestValidateSegmentLayers, TestGetHybridTotalLayerCount"),
    ("GGG*GGG*", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("GEGEGE*E", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("MDMD", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("M+M+", ACCEPTED, UNIT + "TestValidateSegmentLayers"),
    ("M*X", REJECTED, UNIT + "TestValidateSegmentLayers"),
    ("MDM*-", REJECTED, UNIT + "TestValidateSegmentLayers (attention with DSA)"),
    ("M+M*-", REJECTED, UNIT + "TestValidateSegmentLayers (attention with MLA)"),
    ("M*M*", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("MMMM", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("M", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("M-M-|M-M*-", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("M-M-|M-M*-|M-M-|M-M*-", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("||M", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount (empty segments)"),
    ("M|M", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("M*M*/MM/MM", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("M-M-|M-M*-/MM/MM", ACCEPTED, UNIT + "TestGetHybridTotalLayerCount"),
    ("M|M|M|M", ACCEPTED, UNIT + "TestGetHybridTotalPipelineSegmentCount"),
    ("*M*M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("MM-*", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("DM", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("+M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M*|M*", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M*M*/MM", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("MMMM/*M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M/M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M*M*/MM/MM/MM", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("MMMM/*M/*M/*M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M*/*/*/*", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M/M/M/M/M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M*M*/MM/M*", REJECTED, UNIT + "TestParseHybridPattern (MTP parts differ)"),
    ("M*M*/MM/MM/M", REJECTED, UNIT + "TestParseHybridPattern (MTP parts differ)"),
    ("MMMM/*M/M*", REJECTED, UNIT + "TestParseHybridPattern (MTP parts differ)"),
    ("M*X*", REJECTED, UNIT + "TestParseHybridPattern"),
    ("MaMM", REJECTED, UNIT + "TestParseHybridPattern"),
    ("M*M*1", REJECTED, UNIT + "TestParseHybridPattern"),
    ("M*M*/MX", REJECTED, UNIT + "TestParseHybridPattern"),
    ("M*M*/Ma/Ma", REJECTED, UNIT + "TestParseHybridPattern"),
    ("M*M*/MM/Ma", REJECTED, UNIT + "TestParseHybridPattern"),
    ("M*M*/M|M/M|M", REJECTED, UNIT + "TestParseHybridPattern ('|' in MTP)"),
    ("/MM/MM", ACCEPTED, UNIT + "TestParseHybridPattern (empty main pattern)"),
    ("M*M*/", ACCEPTED, UNIT + "TestParseHybridPattern (trailing separator)"),
    ("M*M*M*M*/MMM/MMM", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("MM-MM-/*M/*M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("*****/M/M/M/M", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("MEME/MM/MM", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("GEGEGE*E/GG/GG", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("MDMD/MD/MD", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("M+M+/M+/M+", ACCEPTED, UNIT + "TestParseHybridPattern"),
    ("MG*-E", ACCEPTED, UNIT + "TestGetHybridLayerCounts"),
    ("MGD-E", ACCEPTED, UNIT + "TestGetHybridLayerCounts"),
    ("MG+-E", ACCEPTED, UNIT + "TestGetHybridLayerCounts"),
    ("GMGM", ACCEPTED, UNIT + "TestGetHybridLayerCounts"),
    ("G*GM*", ACCEPTED, UNIT + "TestGetHybridLayerCounts"),
    ("+M+M", ACCEPTED, UNIT + "TestGetHybridLayerCounts"),
    ("MM|M*|M-|ME", ACCEPTED, UNIT + "TestSelectPipelineSegment"),
    ("||M*", ACCEPTED, UNIT + "TestSelectPipelineSegment (empty segments)"),
    ("MMM|M|MMMMM", ACCEPTED, UNIT + "TestSelectPipelineSegment"),
    (
        "M-M-M-M*-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        ACCEPTED,
        FUNCTIONAL + "hybrid_dynamic_inference_tp1_pp1_dp8_583m (and 2b, static inference)",
    ),
    ("MEM*EMEM*EME*", ACCEPTED, FUNCTIONAL + "hybrid_flextron_nightly_tp2_pp1_ep2_dgx_h100_1N8G"),
    (
        "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
        ACCEPTED,
        FUNCTIONAL + "hybrid_mr_mcore_te_tp{1,2}_pp1_cp{1,4}_dgx_a100_1N8G",
    ),
    (
        "M-M-M-M*-M-|M-M-M*-M-M-|M-M*-M-M-M-|M*-M-M-M-M-",
        ACCEPTED,
        FUNCTIONAL + "hybrid_mr_mcore_te_tp1_pp2_vpp2 and tp1_pp4 (cp1_dgx_a100_1N8G)",
    ),
    (
        "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        ACCEPTED,
        FUNCTIONAL + "hybrid_nemotron_v3_pico_7b_a1b_tp1_ep8_QAD_dgx_h100_1N8G",
    ),
]

# Patterns on which we differ from Megatron-Core's parser on purpose: pattern -> (Megatron-Core's
# verdict, read from hybrid_layer_allocation.py where its tests do not cover it; our reason).
DIFFERENCES = {
    "": (ACCEPTED, "a model without layers: nothing to train"),
    "|": (ACCEPTED, "every '|' segment empty: a model without layers"),
    "/MM/MM": (ACCEPTED, "MTP without a main decoder: nothing to predict from"),
    " M*": (REJECTED, "leading and trailing whitespace (from shell or YAML quoting) is ignored"),
    "M*/M+": (
        ACCEPTED,
        "Megatron-Core checks '*' against 'D'/'+' per part (main, each MTP depth); we check the "
        "model as a whole, which is built with one attention flavour",
    ),
    "[M-]*-": (REJECTED, "fusion groups [XY] are ours alone"),
}


def ours_accepts(pattern: str) -> bool:
    try:
        parse_hybrid_pattern(pattern)
    except PatternError:
        return False
    return True


def test_the_table_covers_at_least_forty_of_megatrons_patterns():
    patterns = [row[0] for row in MEGATRON_PATTERNS]
    assert len(set(patterns)) == len(patterns) >= 40
    assert {verdict for _, verdict, _ in MEGATRON_PATTERNS} == {ACCEPTED, REJECTED}


@pytest.mark.parametrize(
    "pattern,megatron,source",
    [row for row in MEGATRON_PATTERNS if row[0] not in DIFFERENCES],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_we_accept_and_reject_what_megatron_core_does(pattern, megatron, source):
    assert ours_accepts(pattern) == megatron, f"{pattern!r} ({source})"


@pytest.mark.parametrize("pattern", sorted(DIFFERENCES))
def test_each_listed_difference_is_real(pattern):
    megatron, _ = DIFFERENCES[pattern]
    assert ours_accepts(pattern) != megatron
    table = {row[0]: row[1] for row in MEGATRON_PATTERNS}
    assert table.get(pattern, megatron) == megatron  # agrees with the table where both have it


def test_the_readme_lists_every_difference():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Coming from Megatron-LM") :]
    # One table row per difference, the pattern as a quoted string (a '|' escaped, as a
    # Markdown table needs): | `"M\|"` | ... |
    quoted = re.findall(r'^\| `("[^`]*")` \|', section, flags=re.MULTILINE)
    assert {json.loads(text.replace("\\|", "|")) for text in quoted} == set(DIFFERENCES)


def test_empty_segments_parse_as_megatron_core_splits_them():
    # select_pipeline_segment("||M*") gives segment 2 the layers and segments 0 and 1 none.
    assert parse_hybrid_pattern("||M*").stages == ((), (), ("M", "*"))
    assert parse_hybrid_pattern("MMM|M|MMMMM").stages == (("M",) * 3, ("M",), ("M",) * 5)
