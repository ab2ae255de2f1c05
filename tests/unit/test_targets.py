"""Target selection: one full-match syntax, loud errors for patterns that select nothing."""

import pytest

import deltaw
from deltaw.adapters.targets import select_modules
from tests.conftest import make_tiny_llama


def test_all_linear_takes_every_linear_but_the_output_head(tiny):
    report = deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=2))
    assert len(report.selection.modules) == 2 * 7
    assert "lm_head" not in report.selection.modules
    assert type(tiny.lm_head).__name__ == "Linear"


def test_patterns_are_full_matched_against_dotted_names(tiny):
    selection = select_modules(tiny, [r"model\.layers\.0\.self_attn\.(q|v)_proj"])
    assert selection.modules == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    everywhere = select_modules(tiny, [r".*\.q_proj"])
    assert everywhere.modules == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]


def test_a_string_means_the_same_as_a_list_holding_it(tiny):
    assert select_modules(tiny, r".*\.v_proj").modules == select_modules(tiny, [r".*\.v_proj"]).modules


def test_report_counts_modules_per_pattern(tiny):
    report = deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=2, targets=[r".*\.q_proj", r".*mlp\..*"]))
    assert {p: len(n) for p, n in report.selection.per_pattern.items()} == {r".*\.q_proj": 2, r".*mlp\..*": 6}
    text = str(report)
    assert "8 modules" in text and "trainable" in text and "%" in text


def test_a_pattern_matching_nothing_is_an_error_with_close_names(tiny):
    with pytest.raises(deltaw.TargetError) as info:
        select_modules(tiny, ["q_proj"])
    message = str(info.value)
    assert "'q_proj' matches no module" in message
    assert r".*\\.q_proj" in message  # the suggested fix
    assert "self_attn" in message  # close module names are listed


def test_one_bad_pattern_among_good_ones_is_still_an_error(tiny):
    with pytest.raises(deltaw.TargetError, match="qproj"):
        select_modules(tiny, [r".*\.v_proj", r".*\.qproj"])


def test_pattern_matching_a_non_linear_module_is_an_error(tiny):
    with pytest.raises(deltaw.TargetError, match="LlamaMLP, and no linear layer"):
        select_modules(tiny, [r"model\.layers\.0\.mlp"])


def test_exclude_removes_modules_and_must_match_something(tiny):
    selection = select_modules(tiny, "all-linear", exclude=[r".*\.down_proj", r"model\.layers\.1\..*"])
    assert "model.layers.0.mlp.down_proj" not in selection.modules
    assert not any(name.startswith("model.layers.1.") for name in selection.modules)
    assert len(selection.modules) == 6
    with pytest.raises(deltaw.TargetError, match="exclude pattern"):
        select_modules(tiny, "all-linear", exclude=["nothing_here"])


def test_invalid_regex_is_an_error(tiny):
    with pytest.raises(deltaw.TargetError, match="not a valid regular expression"):
        select_modules(tiny, ["model.(layers"])


def test_tied_output_head_is_refused():
    model = make_tiny_llama(tie=True)
    with pytest.raises(deltaw.TargetError, match="tied"):
        select_modules(model, ["lm_head"])
    assert "lm_head" not in select_modules(model, "all-linear").modules


def test_untied_output_head_can_be_targeted_explicitly(tiny):
    assert select_modules(tiny, ["lm_head"]).modules == ["lm_head"]


def test_failed_add_lora_leaves_the_model_unchanged(tiny):
    with pytest.raises(deltaw.TargetError):
        deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=2, targets=["nope"]))
    assert deltaw.list_adapters(tiny) == []
    assert all(p.requires_grad for p in tiny.parameters())
    assert type(tiny.model.layers[0].self_attn.q_proj).__name__ == "Linear"
