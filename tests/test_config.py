"""A bad config is refused at load with one line naming the key; the stage contract
(engine.core.registry) is checked whole, the same way by `recserve check-config` and the server."""
import copy
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.cli import main as cli
from engine.core import registry
from engine.core.config import load_config, parse_config
from engine.core.errors import ConfigError
from engine.core.registry import BudgetParams, Policy, RouteParams

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny.toml"


@pytest.mark.parametrize("name", ["tiny", "default", "large"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / f"configs/{name}.toml")
    assert cfg.pipeline.recall and cfg.pipeline.stages
    for exp in cfg.experiments:
        assert cfg.variant(exp) is not cfg


def _variant(tmp_path: Path, text: str) -> Path:
    """A config file beside copies of the tiny config's side files."""
    for f in ("whitelist_tiny.toml", "blocklist_tiny.toml"):
        shutil.copy(ROOT / "configs" / f, tmp_path / f)
    path = tmp_path / "variant.toml"
    path.write_text(text)
    return path


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
    ("share = 0.25", "share = nan", "experiments.greedy.share: must be a finite number"),
    ("keep = 300\n", "keep = 300\nbudget_ms = 5.0\n", "stage.coarse_trees.budget_ms: unknown key"),
    ('rule = "seen"', 'rule = "seen"\nmax_per_author = 3', "stage.drop_seen.max_per_author: only rule author_cap"),
    ('kind = "recall_hot"', 'kind = "recall_hot"\ninline = "yes"', "stage.hot.inline: expected bool"),
    ('file = "whitelist_tiny.toml"', 'file = "whitelist_tyni.toml"', "stage.whitelist.file: "),
    ('blocklist = "blocklist_tiny.toml"', 'blocklist = "broken.toml"', "stage.drop_blocked.blocklist: "),
])
def test_bad_config_refused_naming_the_key(tmp_path, old, new, key):
    text = TINY.read_text()
    assert old in text
    bad = _variant(tmp_path, text.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg


def test_order_of_stage_columns_is_checked(tmp_path):
    bad = _variant(tmp_path, TINY.read_text().replace('"coarse_trees", "coarse_dnn"', '"coarse_dnn", "coarse_trees"'))
    with pytest.raises(ConfigError, match="pipeline.stages: 'coarse_dnn' reads feat:item_e, which no earlier "
                                          "stage writes"):
        load_config(bad)


def test_inline_follows_the_kinds_policy_unless_the_config_says_otherwise(tiny_config):
    cfg = load_config(tiny_config)
    assert cfg.stage["ann"][1].inline is False and cfg.stage["hot"][1].inline is True   # allowed / default
    cfg = load_config(tiny_config, ["stage.ann.inline=true", "stage.hot.inline=false"])
    assert cfg.stage["ann"][1].inline is True and cfg.stage["hot"][1].inline is False


def _raw(**stage_sections) -> dict:
    raw = tomllib.loads(TINY.read_text())
    raw["stage"].update(stage_sections)
    return raw


def test_check_config_refuses_what_the_server_refuses_with_the_same_line(tmp_path, capsys):
    """Nine routes overflow the uint8 route bitmask: refused at load, before any bundle is read."""
    text = TINY.read_text()
    routes = 'recall = ["ann", "hot", "cold_start", "whitelist"'
    assert routes in text
    extra = [f"hot{i}" for i in range(5)]
    text = text.replace(routes, routes + "".join(f', "{n}"' for n in extra))
    path = _variant(tmp_path, text + "".join(f'\n[stage.{n}]\nkind = "recall_hot"\nk = 10\n' for n in extra))
    assert cli.main(["check-config", str(path)]) == 2
    checked = capsys.readouterr().err.strip()
    assert checked == f"recserve: {path}: pipeline.recall: at most 8 routes (uint8 route bitmask), got 9"
    served = subprocess.run([sys.executable, "-m", "engine.cli.main", "serve", "--config", str(path), "--bundle",
                             str(tmp_path / "no-bundle")], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert served.returncode != 0
    assert served.stderr.strip().splitlines()[-1] == checked.replace("recserve:", "recserve serve:", 1)


@dataclass
class _Params:
    pass


@dataclass
class _Budget(BudgetParams):
    pass


@pytest.fixture
def kinds():
    """Registers the test's kinds (name -> register kwargs) and removes them afterwards."""
    added = []

    def add(name, params=_Params, **kw):
        registry.register(name, params, **kw)(lambda p, env: None)
        added.append(name)
    yield add
    for name in added:
        registry.unregister(name)


def test_a_read_of_what_only_a_skippable_stage_writes_is_refused(kinds):
    kinds("test_needs_tasks", reads=(registry.TASK_SCORES,))
    raw = _raw(strict={"kind": "test_needs_tasks"})
    raw["pipeline"]["stages"].append("strict")
    raw.pop("experiments")
    with pytest.raises(ConfigError, match="^pipeline.stages: 'strict' reads score:task:\\*, which only the skippable "
                                          "stage 'fine' writes$"):
        parse_config(raw, str(TINY))


def test_inline_is_refused_where_the_kind_forbids_it(kinds):
    kinds("test_pool_only", RouteParams, recall=True)
    raw = _raw(remote={"kind": "test_pool_only", "inline": True, "k": 10})
    raw["pipeline"]["recall"].append("remote")
    with pytest.raises(ConfigError, match="^stage.remote.inline: kind 'test_pool_only' never runs inline"):
        parse_config(raw, str(TINY))
    raw["stage"]["remote"]["inline"] = False
    assert parse_config(copy.deepcopy(raw), str(TINY)).stage["remote"][1].inline is False


@pytest.mark.parametrize("params,kw,says", [
    (_Params, {"policy": Policy(skippable=True)}, "skippable kinds, and only they"),
    (_Budget, {}, "skippable kinds, and only they"),
    (_Params, {"recall": True}, "recall routes, and only they"),
    (RouteParams, {"recall": True, "reads": ("score:trees",)}, "a recall route reads ctx values only"),
    (_Params, {"policy": Policy(inline="default")}, "only recall routes choose where they run"),
    (_Params, {"reads": ("ctx:nothing_here",)}, "RequestContext has no value 'nothing_here'"),
    (_Params, {"writes": ("scores:x",)}, "expected <score|feat|ctx>:<name>"),
])
def test_a_declaration_the_engine_cannot_honour_is_refused_at_registration(params, kw, says):
    with pytest.raises(ValueError, match=says):
        registry.register("test_bad_kind", params, **kw)(lambda p, env: None)
    assert registry.kind("test_bad_kind") is None


def test_overrides_apply_on_top_and_keep_the_experiments(tiny_config):
    cfg = load_config(tiny_config, ["ray.split_fine=true", "serving.tree_runtime='native'"])
    assert cfg.ray.split_fine and cfg.serving.tree_runtime == "native"
    assert set(cfg.experiments) == set(load_config(tiny_config).experiments)
    for bad, says in ((["ray.nope=1"], "ray.nope: unknown key"), (["ray.split_fine"], "KEY=TOML value"),
                      (["ray.fine_max_batch=0"], "fine_max_batch")):
        with pytest.raises(ConfigError, match=says):
            load_config(tiny_config, bad)
