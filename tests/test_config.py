"""Config: overrides, type checks, unknown keys, validation, model sizes, JSON files, presets,
and that every field is read by the code."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

import config as C
from config import (
    MODEL_SIZES,
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    parse_config,
    validate,
)

SOURCE = Path(__file__).resolve().parents[1] / "source"
FIELDS = [f.name for f in dataclasses.fields(Config)]


# ---- overrides ------------------------------------------------------------------------------


def test_overrides_with_dashes_and_underscores():
    cfg = parse_config(["--preset", "smoke", "--embed-dim", "64", "--num-heads", "4"])
    assert (cfg.embed_dim, cfg.num_heads) == (64, 4)
    assert cfg.depth == PRESETS["smoke"]()["depth"]  # untouched fields keep the preset
    cfg = apply_overrides(Config(), {"drop-path-rate": "0.2", "label_smoothing": 0})
    assert cfg.drop_path_rate == 0.2 and cfg.label_smoothing == 0.0
    assert isinstance(cfg.label_smoothing, float)


@pytest.mark.parametrize(
    "text,value",
    [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("off", False)],
)
def test_bool_overrides(text, value):
    cfg = parse_config(["--hflip", text, "--amp", text])
    assert cfg.hflip is value and cfg.amp is value


@pytest.mark.parametrize("text", ["0.1,0.2,0.3", "0.1, 0.2, 0.3", "0.1 0.2 0.3"])
def test_tuple_overrides(text):
    cfg = parse_config(["--mean", text, "--std", "1,2,3"])
    assert cfg.mean == (0.1, 0.2, 0.3)
    assert cfg.std == (1.0, 2.0, 3.0)


def test_int_and_float_coercion():
    cfg = apply_overrides(
        Config(), {"epochs": "5", "depth": 3.0, "lr": "2e-4", "batch_size": "1e2"}
    )
    assert (cfg.epochs, cfg.depth, cfg.batch_size) == (5, 3, 100)
    assert all(isinstance(v, int) for v in (cfg.epochs, cfg.depth, cfg.batch_size))
    assert cfg.lr == 2e-4


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("epochs", "abc", "integer"),
        ("epochs", "2.5", "integer"),
        ("epochs", True, "int"),
        ("lr", "fast", "number"),
        ("hflip", "maybe", "true or false"),
        ("mean", "a,b,c", "numbers"),
        ("mean", 0.5, "numbers"),
    ],
)
def test_type_errors_name_the_key_and_the_type(key, value, expected):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), {key: value})
    message = str(err.value)
    assert f"--{key}" in message
    assert expected in message
    assert "; got " in message


def test_underscore_options_on_the_command_line():
    cfg = parse_config(["--preset", "smoke", "--num_heads", "4", "--embed_dim", "64"])
    assert (cfg.num_heads, cfg.embed_dim) == (4, 64)


def test_type_error_from_the_command_line():
    with pytest.raises(ConfigError, match=r"--batch-size|--batch_size"):
        parse_config(["--batch-size", "many"])


def test_unknown_command_line_option_lists_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--embed-dimm", "64"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--embed-dimm" in err
    assert "valid config options are:" in err
    for name in ("--embed-dim", "--num-heads", "--max-minutes", "--model-path"):
        assert name in err


def test_unknown_keys_in_apply_overrides_list_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), {"embed_dimm": 3, "colour": "red"})
    message = str(err.value)
    assert "colour, embed_dimm" in message
    valid = message.split("valid keys are:")[1]
    assert all(name in valid for name in FIELDS)


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--preset", "imagenet"])
    assert "digits" in capsys.readouterr().err


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["--embed-dim", "100", "--num-heads", "3"],
            "embed_dim 100 is not divisible by num_heads 3",
        ),
        (
            ["--image-size", "30", "--patch-size", "4"],
            "image_size 30 is not divisible by patch_size 4",
        ),
        (
            ["--val-fraction", "0.6", "--test-fraction", "0.5"],
            "val_fraction and test_fraction must each be in [0, 1) and sum to less than 1",
        ),
        (["--val-fraction", "1.0"], "val_fraction and test_fraction"),
        (["--test-fraction", "-0.1"], "val_fraction and test_fraction"),
        (["--warmup-fraction", "1"], "warmup_fraction must be in [0, 1)"),
        (["--crop-scale", "0"], "crop_scale must be in (0, 1]"),
        (["--pool", "max"], "pool 'max' is not one of cls, mean, seq"),
        (["--select-metric", "loss"], "select_metric 'loss' is not one of accuracy, balanced_"),
        (["--depth", "0"], "depth must be at least 1"),
        (["--mean", "0.5,0.5"], "mean and std need 3 values"),
        (["--std", "0.5,0,0.5"], "std values must be positive"),
        (["--ema-decay", "1"], "ema_decay must be in [0, 1)"),
        (["--repeated-aug", "0"], "repeated_aug must be at least 1"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError) as err:
        parse_config(["--preset", "smoke", *overrides])
    assert message in str(err.value)


def test_validation_reports_every_problem_at_once():
    cfg = Config(embed_dim=100, num_heads=3, image_size=30, patch_size=4)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "embed_dim 100" in str(err.value) and "image_size 30" in str(err.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = validate(Config.from_dict(PRESETS[name]()))
    assert cfg.image_size % cfg.patch_size == 0
    assert cfg.embed_dim % cfg.num_heads == 0
    assert parse_config(["--preset", name]) == cfg


def test_config_main_exit_codes(capsys):
    assert C.main(["--preset", "smoke", "--depth", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["depth"] == 2
    assert C.main(["--embed-dim", "100", "--num-heads", "3"]) == 2
    assert "embed_dim 100" in capsys.readouterr().err


# ---- model sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_model_size_fills_the_shape(size):
    cfg = parse_config(["--preset", "cifar10", "--model-size", size])
    shape = MODEL_SIZES[size]
    assert cfg.model_size == size
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (
        shape["embed_dim"],
        shape["depth"],
        shape["num_heads"],
        shape["mlp_ratio"],
    )


def test_model_size_values():
    assert MODEL_SIZES["tiny"] == dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0)
    assert MODEL_SIZES["small"] == dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)
    assert MODEL_SIZES["base"] == dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)


@pytest.mark.parametrize("order", ["size first", "size last"])
def test_explicit_overrides_beat_model_size(order):
    args = ["--depth", "4", "--num-heads", "4"]
    argv = (
        ["--model-size", "small", *args]
        if order == "size first"
        else [*args, "--model-size", "small"]
    )
    cfg = parse_config(argv)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (384, 4, 4)


def test_unknown_model_size_is_refused():
    with pytest.raises(ConfigError, match="tiny, small, base or custom"):
        parse_config(["--model-size", "huge"])


# ---- JSON -----------------------------------------------------------------------------------


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"depth": 3, "embed-dim": 64, "mean": [0.1, 0.2, 0.3]}))
    cfg = parse_config(["--preset", "smoke", "--config", str(path)])
    assert (cfg.depth, cfg.embed_dim, cfg.mean) == (3, 64, (0.1, 0.2, 0.3))
    cfg = parse_config(["--preset", "smoke", "--config", str(path), "--depth", "5"])
    assert (cfg.depth, cfg.embed_dim) == (5, 64)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=re.escape(f"config file {missing} does not exist")):
        parse_config(["--config", str(missing)])


def test_bad_json_config_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"depth": 3,}')
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert f"config file {path} is not valid JSON" in str(err.value)
    assert "line 1" in str(err.value)  # where the syntax error is


def test_config_file_with_unknown_or_mistyped_key(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"detph": 3}))
    with pytest.raises(ConfigError, match="unknown config key.*detph"):
        parse_config(["--config", str(path)])
    path.write_text(json.dumps({"depth": "three"}))
    with pytest.raises(ConfigError, match="--depth expects an integer"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"depth"'])
def test_config_file_that_is_not_an_object(tmp_path, text):
    path = tmp_path / "list.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        parse_config(["--config", str(path)])


def test_json_round_trip(tmp_path):
    cfg = parse_config(
        [
            "--preset",
            "cifar10",
            "--depth",
            "3",
            "--hflip",
            "false",
            "--mean",
            "0.1,0.2,0.3",
            "--model-size",
            "custom",
        ]
    )
    path = tmp_path / "nested" / "config.json"
    cfg.to_json(path)
    values = json.loads(path.read_text())
    assert set(values) == set(FIELDS)
    again = Config.from_dict(values)
    assert again == cfg
    assert isinstance(again.mean, tuple)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_round_trip_of_a_named_model_size_keeps_explicit_shape():
    # A checkpoint stores model_size next to the shape; reloading must give the same shape
    # even when the shape was overridden after --model-size.
    cfg = parse_config(["--model-size", "small", "--depth", "4"])
    assert Config.from_dict(cfg.to_dict()) == cfg


# ---- help and fields ------------------------------------------------------------------------


def help_text(capsys, argv) -> str:
    with pytest.raises(SystemExit):
        C.build_parser(argv).parse_args(argv)
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_every_field_with_its_comment_and_default(capsys):
    text = help_text(capsys, ["--help"])
    defaults = Config.from_dict(PRESETS["digits"]())  # the default preset's values
    comments = C.field_help()
    assert set(comments) == set(FIELDS)  # every field has a comment, the one source
    section = text.split("config fields (defaults: the digits preset's values):")[1]
    for name in FIELDS:
        option = "--" + name.replace("_", "-") + " "  # the space: --data, not --data-dir
        assert option in section, name
        entry = section.split(option, 1)[1]
        # textwrap may break a line at a hyphen: compare without whitespace
        assert "".join(comments[name].split()) in "".join(entry[:400].split()), name
        assert f"(default: {C._show(getattr(defaults, name))})" in entry[:500], name
    assert "(Config default" not in text


def test_help_shows_the_chosen_presets_values_and_the_choices(capsys):
    digits = help_text(capsys, ["--preset", "digits", "--help"])
    image_size = digits.split("--image-size INT, --image_size INT")[1][:120]
    assert "side of the square model input, in pixels (1 to 4096) (default: 16)" in image_size
    cifar = help_text(capsys, ["--preset", "cifar10", "--help"])
    assert "(default: 32)" in cifar.split("--image-size INT, --image_size INT")[1][:120]
    assert "defaults: the cifar10 preset's values" in cifar
    for name, choices in C.CHOICES.items():
        if name != "resume":
            assert "{" + ",".join(choices) + "}" in digits, name
    assert "--hflip [true|false], --no-hflip" in digits
    assert "--resume [true|false|auto], --no-resume" in digits


def test_help_shows_preset_default(capsys):
    text = help_text(capsys, ["--help"])
    preset_help = text.rsplit("--preset", 1)[1].split("--config")[0]  # options, not usage
    assert "digits" in preset_help.split("}")[-1]  # after the choices: the default


@pytest.mark.parametrize(
    "argv,value",
    [
        (["--hflip"], True),
        (["--no-hflip"], False),
        (["--hflip", "false"], False),
        (["--hflip", "yes"], True),
        (["--cache_images", "off"], False),
        ([], None),
    ],
)
def test_boolean_options_bare_negated_or_valued(argv, value):
    args = C.build_parser(argv).parse_args(["--preset", "smoke", *argv])
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    assert given.get("hflip", given.get("cache_images")) is value
    if value is not None:
        cfg = C.config_from_args(args)
        assert (cfg.hflip if "hflip" in given else cfg.cache_images) is value


@pytest.mark.parametrize(
    "argv,value",
    [([], "false"), (["--resume"], "true"), (["--resume", "auto"], "auto"),
     (["--resume", "AUTO"], "auto"), (["--no-resume"], "false"), (["--resume", "true"], "true")],
)  # fmt: skip
def test_resume_is_true_false_or_auto(argv, value):
    assert parse_config(argv).resume == value
    # a config or checkpoint from before: a bool
    assert Config.from_dict({"resume": value == "true"}).resume in ("true", "false")


@pytest.mark.parametrize("argv", [["--resume", "maybe"], ["--no-hflip", "true"]])
def test_bad_boolean_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert "true" in capsys.readouterr().err


def test_layers_preset_pretrained_file_command_line_and_explicit_keys(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"depth": 3, "mean": [0.1, 0.2, 0.3]}))
    inferred = {"embed_dim": 64, "num_heads": 4, "depth": 12, "image_size": 32,
                "mean": [0.5, 0.5, 0.5], "patch_size": 8}  # fmt: skip
    calls = []

    def infer(spec):
        calls.append(spec)
        return inferred

    argv = ["--preset", "smoke", "--pretrained", "x.pth", "--config", str(path),
            "--image-size", "16", "--no-hflip"]  # fmt: skip
    layered = C.layer_config(C.build_parser(argv).parse_args(argv), infer=infer)
    cfg = layered.config
    assert calls == ["x.pth"]
    assert (cfg.embed_dim, cfg.num_heads, cfg.patch_size) == (64, 4, 8)  # pretrained > preset
    assert cfg.depth == 3 and cfg.mean == (0.1, 0.2, 0.3)  # the file > pretrained
    assert cfg.image_size == 16  # the command line > everything
    assert cfg.hflip is False and cfg.epochs == PRESETS["smoke"]()["epochs"]
    assert layered.explicit == {"pretrained", "depth", "mean", "image_size", "hflip"}
    plain = C.layer_config(C.build_parser([]).parse_args(["--preset", "smoke"]), infer=infer)
    assert plain.explicit == set() and calls == ["x.pth"]  # no --pretrained: nothing inferred


def _reads(field: str) -> list[str]:
    """Files in source/ (other than config.py) that read cfg.<field> (or config.<field>,
    getattr(x, "<field>"), x["<field>"])."""
    pattern = re.compile(
        rf"(?:\b\w*cfg|\bconfig)\.{field}\b|getattr\(\w+,\s*[\"']{field}[\"']|\[[\"']{field}[\"']\]"
    )
    return [
        p.name
        for p in sorted(SOURCE.glob("*.py"))
        if p.name != "config.py" and pattern.search(p.read_text())
    ]


# model_size is consumed where it is parsed: apply_overrides expands it into the shape fields.
CONSUMED_IN_CONFIG = {"model_size"}


@pytest.mark.parametrize("field", [f for f in FIELDS if f not in CONSUMED_IN_CONFIG])
def test_every_field_is_read_outside_config(field):
    assert _reads(field), f"Config.{field} is defined but never read in source/: a dead option"


def test_model_size_is_consumed_by_apply_overrides():
    assert "model_size" in (SOURCE / "config.py").read_text().split("def apply_overrides")[1]
