import math

import pytest
import torch

from lmgen_fast import SamplingParams
from lmgen_fast.core.params import PackedParams, as_row_params, min_p_threshold


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", "hot"),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.2),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("repetition_penalty_range", -1),
        ("repetition_penalty_range", 2.5),
        ("top_k", 3.5),
        ("top_k", True),
        ("seed", -1),
        ("seed", 2**63),
        ("seed", 1.5),
        ("penalty_scope", "prompt"),
        ("penalty_mode", "twice"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.01),
        ("frequency_penalty", math.inf),
        ("presence_penalty", 1e39),
        ("logprobs", 21),
        ("logprobs", -1),
        ("logprobs_mode", "filtered"),
        ("n", 0),
        ("n", 1.5),
        ("stop", ""),
        ("stop", 7),
        ("stop_token_ids", -3),
        ("stop_token_ids", "eos"),
        ("min_tokens", -1),
        ("include_stop_str_in_output", "yes"),
        ("logit_bias", math.inf),
        ("logit_bias", -2),
        ("allowed_token_ids", 2.5),
        ("regex", ""),
    ],
)
def test_invalid_value_names_field_and_value(field, value):
    # List-valued fields get the bad value as one element (a stop id, a bias, an id).
    wrap = {"stop_token_ids": lambda v: [1, v], "allowed_token_ids": lambda v: [v],
            "logit_bias": lambda v: {3: v} if isinstance(v, float) else {v: 1.0}}
    given = wrap.get(field, lambda v: v)(value)
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: given})
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_defaults_are_the_articles():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.repetition_penalty, p.repetition_penalty_range) == (
        1.0, 50, 1.0, 10
    )
    assert p.seed is None and p.penalty_scope == "generated" and p.penalty_mode == "per_occurrence"


def test_immutable_and_hashable():
    p = SamplingParams(seed=3)
    with pytest.raises(AttributeError):
        p.temperature = 2.0
    assert p == SamplingParams(seed=3) and hash(p) == hash(SamplingParams(seed=3))


def test_job_fields_are_normalised_and_hashable():
    p = SamplingParams(stop="</answer>", stop_token_ids=[9, 4], logit_bias={7: -1, 2: 3.5},
                       allowed_token_ids=[9, 1, 9], json_schema={"type": "object", "a": 1})
    assert p.stop == ("</answer>",) and p.stop_token_ids == (9, 4)
    assert p.logit_bias == ((2, 3.5), (7, -1.0))
    assert p.allowed_token_ids == (1, 9)
    assert p.structured == ("json_schema", '{"a": 1, "type": "object"}')
    assert hash(p) == hash(SamplingParams(**{k: getattr(p, k) for k in vars(p)}))
    assert SamplingParams().structured is None and SamplingParams().n == 1


def test_one_grammar_per_row_and_no_empty_allowed_list():
    with pytest.raises(ValueError, match="at most one"):
        SamplingParams(regex="a+", grammar="root ::= \"a\"")
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        SamplingParams(allowed_token_ids=[])


@pytest.mark.parametrize("field, value", [("stop_token_ids", [3, 8]),
                                          ("logit_bias", {8: 1.0}),
                                          ("allowed_token_ids", [0, 8])])
def test_ids_outside_the_vocabulary_are_named(field, value):
    p = SamplingParams(**{field: value})
    p.check_vocab(9)
    with pytest.raises(ValueError, match=f"{field} has token id 8, outside .*\\[0, 8\\)"):
        p.check_vocab(8)


def test_valid_edge_values_accepted():
    SamplingParams(temperature=0, top_k=-5, repetition_penalty_range=0, seed=2**63 - 1)


def test_packed_rows():
    rows = [SamplingParams(temperature=0.5, top_k=-1, seed=7), SamplingParams(penalty_mode="once")]
    packed = PackedParams.from_rows(rows, "cpu")
    assert packed.top_k.tolist() == [0, 50]
    assert packed.seeded.tolist() == [True, False]
    assert packed.once.tolist() == [False, True]
    assert packed.seed.tolist() == [7, 0]


def test_row_count_must_match():
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        as_row_params([SamplingParams()] * 3, 2)


def test_packed_filters_keep_the_users_values():
    rows = [SamplingParams(top_p=0.9999999, min_p=0.1, logprobs_mode="processed"),
            SamplingParams()]
    packed = PackedParams.from_rows(rows, "cpu")
    assert packed.top_p.dtype == torch.float64 and packed.top_p.tolist() == [0.9999999, 1.0]
    assert packed.min_p.tolist() == [0.1, 0.0]
    assert packed.processed.tolist() == [True, False]


def test_min_p_threshold_is_the_smallest_float32_at_or_above_the_log():
    values = [1e-30, 1e-5, 0.013, 0.1, 0.25, 0.5, 0.7777, 0.999999, 1.0]
    values += torch.rand(200, generator=torch.Generator().manual_seed(0)).tolist()
    t = min_p_threshold(values)
    assert t.dtype == torch.float32
    for m, ti in zip(values, t.tolist(), strict=True):
        below = float(torch.nextafter(torch.tensor(ti), torch.tensor(-math.inf)))
        assert below < math.log(m) <= ti
    assert min_p_threshold([0.0, 1.0]).tolist() == [-math.inf, 0.0]
