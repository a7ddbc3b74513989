"""A bad config is refused at load with one line naming the key."""
import shutil
from pathlib import Path

import pytest

from engine.core.config import load_config
from engine.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "default", "large"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / f"configs/{name}.toml")
    assert cfg.pipeline.recall and cfg.pipeline.stages
    for exp in cfg.experiments:
        assert cfg.variant(exp) is not cfg


@pytest.mark.parametrize("old,new,key", [
    ('"recall_ann"\nk = 500\n', '"recall_ann"\nk = "500"\n', "stage.ann.k: expected int"),
    ("keep = 100\n", "keep = 5000\n", "stage.coarse_dnn.keep: 5000 exceeds"),
    ('rule = "seen"', 'rule = "sen"', "stage.drop_seen.rule"),
    ("beam_width = 4", "beam_wdth = 4", "stage.rerank.beam_wdth: unknown key"),
    ("n_users = 2000", "n_users = -5", "data.n_users: must be > 0"),
    ("[serving]", "[serving]\nthreads = 2", "serving.threads: unknown key"),
    ('"stage.rerank.beam_width" = 1', '"stage.rerank.beam_width" = "one"',
     "experiments.greedy.set: stage.rerank.beam_width: expected int"),
    ('kind = "recall_hot"', 'kind = "recall_hott"', "stage.hot.kind: unknown kind"),
    ('kind = "rank_dnn"', 'kind = "recall_hot"', "stage.coarse_dnn.kind: 'recall_hot' belongs in pipeline.recall"),
    ("share = 0.25", "share = 1.5", "experiments: shares"),
])
def test_bad_config_refused_naming_the_key(tmp_path, old, new, key):
    text = (ROOT / "configs/tiny.toml").read_text()
    assert old in text
    for f in ("whitelist_tiny.toml", "blocklist_tiny.toml"):
        shutil.copy(ROOT / "configs" / f, tmp_path / f)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg


def test_order_of_stage_columns_is_checked(tmp_path):
    text = (ROOT / "configs/tiny.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('"coarse_trees", "coarse_dnn"', '"coarse_dnn", "coarse_trees"'))
    with pytest.raises(ConfigError, match="needs score 'trees'"):
        load_config(bad)


def test_overrides_apply_on_top_and_keep_the_experiments(tiny_config):
    cfg = load_config(tiny_config, ["ray.split_fine=true", "serving.tree_runtime='native'"])
    assert cfg.ray.split_fine and cfg.serving.tree_runtime == "native"
    assert set(cfg.experiments) == set(load_config(tiny_config).experiments)
    for bad, says in ((["ray.nope=1"], "ray.nope: unknown key"), (["ray.split_fine"], "KEY=TOML value"),
                      (["ray.fine_max_batch=0"], "fine_max_batch")):
        with pytest.raises(ConfigError, match=says):
            load_config(tiny_config, bad)
