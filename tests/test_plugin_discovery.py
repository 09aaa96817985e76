"""Plugins found through real entry points: listing, failures, strict mode, allow/block lists."""

from __future__ import annotations

import json

from tests.helpers import SMALL

GOOD_PLUGIN = '''
import attrs
import inferopt

@attrs.frozen
class Halve(inferopt.Optimizer):
    """Scale every Linear bias by a factor (a toy, but it really changes the tensors)."""
    name = "scale-bias"
    summary = "multiply Linear biases by a factor"
    factor: float = inferopt.option(1.0, min=0.0, max=10.0, help="the factor")

    def apply(self, model, ctx):
        import torch
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.mul_(self.factor)
        ctx.details["factor"] = self.factor
        return model

@inferopt.hookimpl
def inferopt_register_optimizers(register):
    register(Halve)
'''

BROKEN_IMPORT = "raise RuntimeError('this plugin is broken on purpose')\n"

MISSPELLED_HOOK = '''
import inferopt

@inferopt.hookimpl
def inferopt_register_optimisers(register):
    pass
'''

RAISING_HOOK = '''
import inferopt

@inferopt.hookimpl
def inferopt_register_metrics(register):
    raise ValueError("metric discovery exploded")
'''


def test_entry_point_plugin_is_listed_with_distribution_and_hooks(cli_subprocess, plugin_env):
    env = plugin_env("inferopt-scale-bias", {"scale_bias": "scale_bias_plugin"},
                     {"scale_bias_plugin": GOOD_PLUGIN})
    result = cli_subprocess("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    plugin = next(p for p in listing["plugins"] if p["name"] == "scale_bias")
    assert plugin["distribution"] == "inferopt-scale-bias"
    assert plugin["version"] == "1.2.3"
    assert plugin["hooks"] == ["inferopt_register_optimizers"]
    [opt] = plugin["provides"]["optimizer"]
    assert opt["name"] == "scale-bias"
    assert opt["options"][0]["name"] == "factor"
    # built-ins come through the same door
    assert {"cpu", "int8", "latency", "demo"} <= {p["name"] for p in listing["plugins"]}


def test_plugins_lists_the_options_of_sources_too(cli):
    result = cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    by_name = {(kind, item["name"]): item
               for p in json.loads(result.stdout)["plugins"]
               for kind, items in p["provides"].items() for item in items}
    synthetic = {o["name"]: o for o in by_name[("data source", "synthetic")]["options"]}
    assert synthetic["dtype"]["default"] == "float32" and synthetic["dtype"]["choices"]
    assert synthetic["batches"]["min"] == 1
    assert "label" in {o["name"] for o in by_name[("data source", "csv")]["options"]}
    assert by_name[("model source", "demo")]["options"] == []  # a spec without options


def test_third_party_optimizer_runs_beside_builtins(cli, plugin_env):
    env = plugin_env("inferopt-scale-bias", {"scale_bias": "scale_bias_plugin"},
                     {"scale_bias_plugin": GOOD_PLUGIN})
    result = cli("run", *SMALL, "--optimize", "scale-bias:factor=0", "--optimize", "int8",
                 "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [s["name"] for s in report["steps"]] == ["scale-bias", "int8"]
    assert report["steps"][0]["details"] == {"factor": 0.0}
    assert report["plugins"]["scale_bias"]["distribution"] == "inferopt-scale-bias"
    # zeroing all biases really changed the outputs
    assert report["optimized"]["metrics"]["fidelity"]["max_abs_err"] > 0


def test_plugin_that_fails_to_import_is_reported_and_run_still_works(cli, plugin_env):
    env = plugin_env("inferopt-broken", {"broken": "broken_plugin"},
                     {"broken_plugin": BROKEN_IMPORT})
    listing = cli("plugins", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    failed = json.loads(listing.stdout)["failed"]
    assert failed == [{"name": "broken", "distribution": "inferopt-broken", "version": "1.2.3",
                       "error": "RuntimeError: this plugin is broken on purpose"}]
    human = cli("plugins", env=env)
    assert "broken" in human.stdout and "broken on purpose" in human.stdout

    run = cli("run", *SMALL, "--json", env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["optimized"]["metrics"]["accuracy"]["top1"] > 0.9
    assert any("broken" in w for w in report["warnings"])


def test_strict_mode_turns_a_broken_plugin_into_an_error(cli, plugin_env):
    env = plugin_env("inferopt-broken", {"broken": "broken_plugin"},
                     {"broken_plugin": BROKEN_IMPORT})
    result = cli("run", *SMALL, "--strict-plugins", env=env)
    assert result.returncode == 2
    assert "plugin 'broken' from inferopt-broken failed" in result.stderr
    env["INFEROPT_STRICT_PLUGINS"] = "1"
    assert cli("plugins", env=env).returncode == 2


def test_misspelled_hook_and_raising_hook_are_isolated(cli, plugin_env):
    env = plugin_env(
        "inferopt-misc",
        {"typo": "typo_plugin", "raiser": "raiser_plugin"},
        {"typo_plugin": MISSPELLED_HOOK, "raiser_plugin": RAISING_HOOK},
    )
    listing = json.loads(cli("plugins", "--json", env=env).stdout)
    errors = {f["name"]: f["error"] for f in listing["failed"]}
    assert "unknown hook(s) inferopt_register_optimisers" in errors["typo"]
    assert "metric discovery exploded" in errors["raiser"]
    names = {p["name"] for p in listing["plugins"]}
    assert "latency" in names and "typo" not in names


def test_allow_and_block_lists(cli, plugin_env):
    env = plugin_env("inferopt-broken", {"broken": "broken_plugin"},
                     {"broken_plugin": BROKEN_IMPORT})
    blocked = json.loads(cli("plugins", "--json",
                             env={**env, "INFEROPT_BLOCK_PLUGINS": "broken, int8"}).stdout)
    names = {p["name"] for p in blocked["plugins"]}
    assert "int8" not in names and blocked["failed"] == []
    assert set(blocked["skipped"]) == {"broken", "int8"}

    allowed = json.loads(cli("plugins", "--json",
                             env={"INFEROPT_PLUGINS": "cpu,latency"}).stdout)
    assert sorted(p["name"] for p in allowed["plugins"]) == ["cpu", "latency"]

    # a blocked optimizer is then unknown, with a message that lists what is available
    result = cli("run", "--optimize", "int8", env={"INFEROPT_BLOCK_PLUGINS": "int8"})
    assert result.returncode == 2
    assert "unknown optimizer 'int8'" in result.stderr


def test_duplicate_names_name_both_plugins(cli, plugin_env):
    dup = GOOD_PLUGIN.replace('name = "scale-bias"', 'name = "int8"')
    env = plugin_env("inferopt-dup", {"dup": "dup_plugin"}, {"dup_plugin": dup})
    listing = json.loads(cli("plugins", "--json", env=env).stdout)
    [failure] = [f for f in listing["failed"] if f["name"] == "dup"]
    assert "registered twice" in failure["error"]
    assert "'int8'" in failure["error"] and "'dup'" in failure["error"]


def test_version_lists_plugins(cli):
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("inferopt 0.1.0")
    assert "int8 0.1.0 (inferopt)" in result.stdout
