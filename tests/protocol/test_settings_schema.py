"""The settings schema: every setting once, strict validation that names the setting, defaults a server can replace,
its wire form, and the command-line flags built from it."""

from __future__ import annotations

import argparse

import pytest

from protocol import InvalidSettings
from protocol.settings import (GENERATE, KINDS, REPROCESS, REQUESTS, SECTIONS, SETTINGS, TEXTURE, Schema, Setting,
                               sampler_setting_name, sampler_values)
from protocol.settings_cli import add_setting_arguments, flag, given_settings


def test_the_table_is_consistent():
    names = [s.name for s in SETTINGS.settings]
    assert len(names) == len(set(names))
    for s in SETTINGS.settings:
        assert s.kind in KINDS and s.section in SECTIONS and s.requests and set(s.requests) <= set(REQUESTS)
        assert s.check(s.default) == s.default, s.name
        assert s.label and s.help
        if s.choices:
            assert all(type(c.value) is s.python_type for c in s.choices), s.name


@pytest.mark.parametrize("request_kind, raw, named", [
    (GENERATE, {"seed": True}, "seed"),  # a bool is never an int
    (GENERATE, {"faces": "100"}, "faces"),
    (GENERATE, {"shape_guidance_strength": [1.0, 2.0]}, "shape_guidance_strength"),
    (GENERATE, {"seed": -1}, "seed"),
    (GENERATE, {"seed": 2**31}, "seed"),
    (GENERATE, {"texture_size": 1000}, "texture_size"),
    (GENERATE, {"pipeline_type": "2048"}, "pipeline_type"),
    (GENERATE, {"alpha_cutoff": float("nan")}, "alpha_cutoff"),
    (GENERATE, {"remove_background": 1}, "remove_background"),
    (GENERATE, {"warp_drive": 9}, "warp_drive"),
    (REPROCESS, {"seed": 3}, "seed"),  # a generation setting where only asset settings belong
    (TEXTURE, {"pipeline_type": "512"}, "pipeline_type"),
    (GENERATE, {"texture_guidance_interval_start": 0.95}, "texture_guidance_interval_start"),  # > its end 0.9
])
def test_bad_settings_are_refused_naming_the_setting(request_kind, raw, named):
    with pytest.raises(InvalidSettings) as info:
        SETTINGS.check(request_kind, raw)
    assert named in info.value.message and info.value.hint
    assert info.value.code.value == "invalid_settings"


def test_check_normalises_and_resolve_fills_defaults():
    checked = SETTINGS.check(GENERATE, {"alpha_cutoff": 1, "seed": 7})
    assert checked == {"alpha_cutoff": 1.0, "seed": 7} and type(checked["alpha_cutoff"]) is float
    full = SETTINGS.resolve(REPROCESS, {"faces": 20_000})
    assert full["faces"] == 20_000 and full["texture_size"] == 2048
    assert set(full) == {s.name for s in SETTINGS.for_request(REPROCESS)}
    assert "seed" not in full


def test_non_map_settings_are_refused():
    with pytest.raises(InvalidSettings, match="map"):
        SETTINGS.check(GENERATE, [("seed", 1)])


def test_with_defaults_replaces_and_checks_defaults():
    schema = SETTINGS.with_defaults({"shape_steps": 20, "pipeline_type": "512"})
    assert schema.resolve(GENERATE, {})["shape_steps"] == 20
    assert schema["pipeline_type"].default == "512" and SETTINGS["pipeline_type"].default == "1024_cascade"
    with pytest.raises(InvalidSettings, match="shape_steps"):
        SETTINGS.with_defaults({"shape_steps": 0})
    with pytest.raises(InvalidSettings, match="unknown"):
        SETTINGS.with_defaults({"nope": 1})


def test_wire_form_round_trips_and_skips_what_an_older_client_cannot_show():
    wire = SETTINGS.with_defaults({"seed": 5}).to_wire()
    assert Schema.from_wire(wire) == SETTINGS.with_defaults({"seed": 5})
    newer = {**wire, "settings": [*wire["settings"],
                                   {**wire["settings"][0], "name": "hologram", "kind": "quaternion"}]}
    assert "hologram" not in Schema.from_wire(newer)
    with pytest.raises(InvalidSettings):
        Schema.from_wire({"settings": [{"name": "x", "kind": "int", "section": "main"}]})
    with pytest.raises(InvalidSettings):
        Schema.from_wire({"settings": [{**wire["settings"][0], "default": "not an int"}]})


def test_sampler_values_are_read_back_per_stage():
    full = SETTINGS.resolve(GENERATE, {sampler_setting_name("texture", "steps"): 3})
    assert sampler_values(full, "texture") == {"steps": 3, "guidance_strength": 1.0, "guidance_rescale": 0.0,
                                               "guidance_interval_start": 0.6, "guidance_interval_end": 0.9,
                                               "rescale_t": 3.0}


def test_cli_flags_follow_the_schema():
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser, GENERATE)
    args = parser.parse_args(["--pipeline-type", "512", "--seed", "9", "--no-remove-background", "--texture-size",
                              "1024", "--shape-guidance-interval-start", "0.5"])
    assert given_settings(args, GENERATE) == {"pipeline_type": "512", "seed": 9, "remove_background": False,
                                              "texture_size": 1024, "shape_guidance_interval_start": 0.5}
    assert given_settings(parser.parse_args([]), GENERATE) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--texture-size", "1000"])
    assert flag(SETTINGS["max_num_tokens"]) == "--max-num-tokens"


def test_a_setting_from_a_newer_server_validates_like_any_other():
    extra = Setting("detail", "float", 0.5, "Detail", "How much", (GENERATE,), "advanced", "shape", 0.0, 1.0)
    schema = Schema((*SETTINGS.settings, extra))
    assert Schema.from_wire(schema.to_wire())["detail"] == extra
    with pytest.raises(InvalidSettings, match="detail"):
        schema.check(GENERATE, {"detail": 2.0})
