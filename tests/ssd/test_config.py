import pytest

from ssd import config as C


@pytest.mark.parametrize("name", list(C.PRESETS))
def test_every_preset_round_trips_through_yaml_and_dict(name):
    cfg = C.preset(name)
    assert C.from_yaml(C.to_yaml(cfg)) == cfg
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert C.config_hash(C.from_yaml(C.to_yaml(cfg))) == C.config_hash(cfg)


def test_paper_presets_have_the_papers_default_box_counts():
    assert C.preset("ssd300_vgg16").anchors.num_default_boxes() == 8732
    assert C.preset("ssd512_vgg16").anchors.num_default_boxes() == 24564
    ssd300 = C.preset("ssd300_vgg16").anchors
    assert ssd300.feature_maps == (38, 19, 10, 5, 3, 1)
    assert ssd300.steps == (8, 16, 32, 64, 100, 300)
    assert ssd300.resolved_scales() == [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]


def test_scales_follow_the_papers_rule_when_not_given():
    a = C.AnchorConfig(
        feature_maps=(10, 5, 3, 1), scales=None, min_scale=0.2, max_scale=0.8, aspect_ratios=((2,),) * 4
    )
    # s_k = 0.2 + 0.6 (k - 1) / 3 for k = 1..4, then 1.0 for the last extra box
    assert a.resolved_scales() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_overrides_are_typed_and_nested():
    cfg = C.override(
        C.preset("tiny"),
        [
            "train.lr=0.05",
            "train.epochs=3",
            "data.augment=false",
            "anchors.min_scale=0.15",
            "model.backbone_weights=/x.pth",
        ],
    )
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 3 and cfg.data.augment is False
    assert cfg.anchors.min_scale == 0.15 and cfg.model.backbone_weights == "/x.pth"
    assert cfg.model.backbone == "tiny"  # untouched fields keep the preset's values


@pytest.mark.parametrize(
    ("assignment", "field"),
    [
        ("train.lr=-0.1", "train.lr"),
        ("train.epochs=two", "train.epochs"),
        ("train.nope=1", "train.nope"),
        ("model.backbone=resnet", "model.backbone"),
        ("anchors.scales=[0.1, 0.2]", "anchors.scales"),
        ("train.lr", "train.lr"),
        ("data.augment=3", "data.augment"),
    ],
)
def test_bad_values_fail_naming_the_field(assignment, field):
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
        C.override(C.preset("tiny"), [assignment])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(C.ConfigError, match="ssd300_vgg16"):
        C.preset("ssd9000")


def test_yaml_file_can_start_from_a_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  epochs: 7\n")
    cfg = C.load(path)
    assert cfg.name == "tiny" and cfg.train.epochs == 7
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "missing.yaml")


def test_flatten_gives_dotted_keys_for_tracking():
    flat = C.flatten(C.preset("tiny"))
    assert flat["train.lr"] == C.preset("tiny").train.lr
    assert flat["anchors.feature_maps"] == [16, 8, 4, 2, 1]


def test_scientific_notation_is_a_number_in_overrides_and_yaml():
    cfg = C.override(C.preset("tiny"), ["train.lr=1e-3", "train.weight_decay=5E-4"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005
    assert C.from_yaml("preset: tiny\ntrain:\n  lr: 2e-3\n").train.lr == 0.002


def test_batchnorm_backbones_refuse_a_batch_of_one():
    with pytest.raises(C.ConfigError, match=r"train\.batch_size"):
        C.override(C.preset("tiny"), ["train.batch_size=1"])
    assert C.override(C.preset("ssd300_vgg16"), ["train.batch_size=1"]).train.batch_size == 1
