"""Sweep files: validation errors, grid/list/conditional/seed expansion, planning (ids, params, FLOPs, GPU-hours)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.sweep import expand, load_sweep, plan_sweep, sweep_runs_dir
from ultramem.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- validation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expected"), [
    ("name: s\nparameters: {seed: {values: []}}\n", ["parameters.seed", "empty grid"]),
    ("name: s\nparameters: {}\n", ["parameters", "empty grid"]),
    ("name: s\n", ["parameters", "empty grid"]),
    ("name: s\nmethod: random\nparameters: {seed: {value: 1}}\n", ["method", "'grid', 'list', 'isoflop' or 'lr_scan'"]),
    ("name: s\nmethod: isoflop\nparameters: {seed: {value: 1}}\n", ["isoflop", "give both or neither"]),
    ("name: s\nparameters: {seed: {distribution: uniform, min: 0, max: 1}}\n", ["parameters.seed.distribution",
                                                                               "unknown key"]),
    ("name: s\nparameters: {seed: {values: [1], value: 2}}\n", ["parameters.seed", "exactly one of"]),
    ("name: s\nparmeters: {seed: {value: 1}}\n", ["parmeters", "unknown key"]),
    ("name: 'a b'\nparameters: {seed: {value: 1}}\n", ["name", "letters, digits"]),
    ("name: s\nseeds: [0]\nparameters: {seed: {values: [1, 2]}}\n", ["seeds", "given twice"]),
    ("name: s\nparameters: {seed: {value: 1}}\nresources: {default: {cpus: 0}}\n",
     ["resources.default.cpus", "greater than 0"]),
    ("name: s\nparameters: {seed: {value: 1}}\nresources: {default: {gpus: 2, nproc: 4}}\n",
     ["resources.default", "one GPU per process"]),
    ("name: s\nparameters: {seed: {value: 1}}\nresources: {rules: [{min_param: 5}]}\n",
     ["resources.rules.0.min_param", "unknown key"]),
])
def test_invalid_sweep_files_name_the_file_and_field(tmp_path, body, expected):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg, msg


@pytest.mark.parametrize(("key", "expected"), [
    ("model.memroy.top_m", "unknown key 'memroy' under model; allowed: "),
    ("model.memory.topm", "unknown key 'topm' under model.memory; allowed: "),
    ("train.learning_rate", "unknown key 'learning_rate' under train; allowed: "),
    ("train.lr.peak", "'train.lr' is a value, not a mapping"),
    ("optimizer.lr", "unknown key 'optimizer' under the run config; allowed: "),
])
def test_unknown_parameter_keys_are_refused_with_allowed_names(tmp_path, key, expected):
    path = write(tmp_path, f"name: s\nparameters: {{{key}: {{values: [1, 2]}}}}\n")
    with pytest.raises(ConfigError, match="parameters." + key.replace(".", r"\.")) as err:
        load_sweep(path)
    assert expected in str(err.value)


def test_valid_deep_keys_are_accepted(tmp_path):
    path = write(tmp_path, """
        name: s
        parameters:
          model.memory.top_m: {values: [4, 8]}
          model.moe.num_experts: {value: 4}
          model.preset: {value: dense-tiny}
          data.embedded.facts: {value: 100}
          parallel.memory_parallel.mode: {value: none}
          wandb.tags: {value: [a, b]}
        """)
    sweep, _ = load_sweep(path)
    assert list(sweep.parameters) == ["model.memory.top_m", "model.moe.num_experts", "model.preset",
                                      "data.embedded.facts", "parallel.memory_parallel.mode", "wandb.tags"]


def test_conditional_and_rule_keys_are_checked(tmp_path):
    path = write(tmp_path, """
        name: s
        parameters: {seed: {value: 0}}
        conditional: [{when: {model.famly: moe}, parameters: {seed: {value: 1}}}]
        """)
    with pytest.raises(ConfigError, match=r"conditional\[0\]\.when\.model\.famly: unknown key 'famly'"):
        load_sweep(path)
    path = write(tmp_path, """
        name: s
        parameters: {seed: {value: 0}}
        conditional: [{when: {model.family: moe}, parameters: {}}]
        """)
    with pytest.raises(ConfigError, match=r"conditional\.0\.parameters"):
        load_sweep(path)


def test_list_method_needs_equal_lengths(tmp_path):
    path = write(tmp_path, """
        name: s
        method: list
        parameters: {seed: {values: [0, 1, 2]}, train.lr: {values: [0.1, 0.2]}}
        """)
    with pytest.raises(ConfigError, match="equal lengths; got seed: 3, train.lr: 2"):
        load_sweep(path)


def test_missing_base_file_is_reported(tmp_path):
    path = write(tmp_path, "name: s\nbase: nowhere.yaml\nparameters: {seed: {value: 0}}\n")
    with pytest.raises(ConfigError, match="base: file 'nowhere.yaml' not found"):
        load_sweep(path)


def test_yaml_tags_are_not_evaluated(tmp_path):
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\nparameters: {{seed: {{value: 0}}}}\n")
    with pytest.raises(ConfigError, match="not valid YAML: could not determine a constructor"):
        load_sweep(path)
    assert not (tmp_path / "pwned").exists()


# ---- expansion -----------------------------------------------------------------------------------------------


def test_grid_conditional_and_seeds_expand_like_a_naive_enumeration(tmp_path):
    path = write(tmp_path, """
        name: s
        base: {model: {family: dense}, train: {steps: 3}}
        parameters:
          model.family: {values: [dense, moe, ultramem]}
          model.d_model: {values: [32, 64]}
          train.lr: {value: 0.01}
        conditional:
          - when: {model.family: moe}
            parameters: {model.moe.num_experts: {values: [4, 8, 16]}}
          - when: {model.family: [ultramem, pkm]}
            parameters: {model.memory.top_m: {values: [2, 4]}, model.memory.heads: {value: 2}}
        seeds: [0, 1]
        """)
    sweep, base = load_sweep(path)
    got = [p.values for p in expand(sweep, base)]

    want = []
    for fam, d in itertools.product(["dense", "moe", "ultramem"], [32, 64]):
        point = {"model.family": fam, "model.d_model": d, "train.lr": 0.01}
        extra = [{}]
        if fam == "moe":
            extra = [{"model.moe.num_experts": e} for e in (4, 8, 16)]
        if fam == "ultramem":
            extra = [{"model.memory.top_m": m, "model.memory.heads": 2} for m in (2, 4)]
        for e in extra:
            for s in (0, 1):
                want.append({**point, **e, "seed": s})
    assert len(got) == 2 * (1 + 3 + 2) * 2 == 24
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, want))


def test_list_method_zips_and_constants_broadcast(tmp_path):
    path = write(tmp_path, """
        name: s
        method: list
        base: {model: {family: dense}}
        parameters:
          model.d_model: {values: [32, 64, 128]}
          model.n_layers: {values: [2, 4, 8]}
          train.lr: {value: 0.01}
        """)
    sweep, base = load_sweep(path)
    points = expand(sweep, base)
    assert [p.values for p in points] == [
        {"model.d_model": 32, "model.n_layers": 2, "train.lr": 0.01},
        {"model.d_model": 64, "model.n_layers": 4, "train.lr": 0.01},
        {"model.d_model": 128, "model.n_layers": 8, "train.lr": 0.01},
    ]
    cfg = points[1].config
    assert cfg["model"] == {"family": "dense", "d_model": 64, "n_layers": 4}
    assert cfg["train"]["lr"] == 0.01 and cfg["sweep"] == "s"


def test_base_from_a_relative_file_and_wandb_settings_reach_every_run(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "base.yaml").write_text("model: {family: dense}\ntrain: {steps: 5, log_every: 1}\n")
    path = write(tmp_path, """
        name: s
        base: cfg/base.yaml
        parameters: {seed: {values: [0, 1]}}
        wandb: {mode: offline, tags: [x]}
        """)
    sweep, base = load_sweep(path)
    for p in expand(sweep, base):
        assert p.config["train"] == {"steps": 5, "log_every": 1}
        assert p.config["wandb"] == {"mode": "offline", "tags": ["x"]}


def test_sweep_local_presets_expand_and_keep_their_name(tmp_path):
    path = write(tmp_path, """
        name: s
        presets:
          small: {family: dense, d_model: 32}
          small-deep: {preset: small, n_layers: 8}
        parameters: {model.preset: {values: [small, small-deep]}, model.n_heads: {value: 2}}
        conditional:
          - when: {model.d_model: 32}
            parameters: {train.lr: {value: 0.5}}
        """)
    sweep, base = load_sweep(path)
    points = expand(sweep, base)
    assert [p.preset for p in points] == ["small", "small-deep"]
    assert points[0].config["model"] == {"family": "dense", "d_model": 32, "n_heads": 2}
    assert points[1].config["model"] == {"preset": "small", "n_layers": 8, "n_heads": 2}
    # `when` sees the preset's fields (d_model 32 for both, through small-deep's parent)
    assert all(p.values["train.lr"] == 0.5 for p in points)


def test_runs_dir_default_env_and_explicit(tmp_path, monkeypatch):
    path = write(tmp_path, "name: grid-1\nparameters: {seed: {value: 0}}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ULTRAMEM_RUNS_DIR", raising=False)
    assert sweep_runs_dir(path) == tmp_path / "runs" / "grid-1"
    monkeypatch.setenv("ULTRAMEM_RUNS_DIR", str(tmp_path / "shared"))
    assert sweep_runs_dir(path) == tmp_path / "shared" / "grid-1"
    path = write(tmp_path, f"name: g\noutput_dir: {tmp_path}/elsewhere\nparameters: {{seed: {{value: 0}}}}\n")
    assert sweep_runs_dir(path) == tmp_path / "elsewhere"


def test_a_relative_output_dir_is_relative_to_the_sweep_file_from_any_directory(tmp_path, monkeypatch):
    (tmp_path / "sweeps").mkdir()
    path = write(tmp_path / "sweeps", "name: g\noutput_dir: ../runs/g\nbase: {model: {preset: dense-tiny}, "
                 "data: {source: embedded}}\nparameters: {seed: {value: 0}}\n")
    for cwd in (tmp_path, tmp_path / "sweeps", Path("/")):
        monkeypatch.chdir(cwd)
        assert sweep_runs_dir(path) == tmp_path / "sweeps" / ".." / "runs" / "g"
        assert plan_sweep(path).runs_dir.resolve() == (tmp_path / "runs" / "g").resolve()


# ---- planning (needs the model library's presets and accounting) -----------------------------------------------


def test_plan_resolves_ids_params_and_costs(tmp_path):
    from experiments.config import run_config_from_dict, run_id
    from experiments.resolve import resolve_run_config
    from ultramem.accounting import count_params
    from ultramem.presets import get_preset

    path = write(tmp_path, """
        name: p
        base: {data: {source: embedded}}
        parameters:
          model.preset: {values: [dense-tiny, moe-tiny, ultramem-tiny]}
          train.tokens: {values: [2e5, 5xN]}
        seeds: [0, 3]
        resources:
          default: {cpus: 1}
          rules: [{when: {model.family: moe}, memory_gb: 3}]
        """)
    plan = plan_sweep(path)
    assert len(plan.runs) == 12 and len({r.run_id for r in plan.runs}) == 12
    for run in plan.runs:
        # independent reference: resolve the same point by hand
        cfg = run_config_from_dict({"sweep": "p", "data": {"source": "embedded"}, "name": run.name,
                                    "seed": run.values["seed"], "model": {"preset": run.preset},
                                    "train": {"tokens": run.values["train.tokens"]}})
        resolved = resolve_run_config(cfg).model_dump(mode="json")
        assert run.run_id == run_id(resolved)
        # the preset with the tokenizer's vocabulary (byte: 256 + end-of-document)
        counts = count_params(get_preset(run.preset, {"vocab_size": 257}))
        assert run.total_params == counts.total and run.active_params == counts.active
        assert run.family == get_preset(run.preset).family == run.run_id.split("-")[0]
        assert run.flops == pytest.approx(run.flops_per_token * run.tokens)
        assert run.gpu_hours("h100", 0.5) == pytest.approx(run.flops / (989e12 * 0.5) / 3600)
        assert run.resources.memory_gb == (3 if run.family == "moe" else None)
        if run.values["train.tokens"] == "5xN":
            # '5xN' is rounded to whole optimizer steps of batch_size * seq_len tokens
            step = resolved["train"]["batch_size"] * resolved["train"]["seq_len"]
            assert abs(run.tokens - 5 * counts.active) <= step / 2


def test_plan_json_rows_and_cli(tmp_path):
    path = write(tmp_path, """
        name: p
        parameters: {model.preset: {values: [dense-tiny, ultramem-tiny]}, train.steps: {value: 10}}
        """)
    out = subprocess.run([sys.executable, "-m", "cli", "sweep", "plan", str(path), "--format", "json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["runs"]) == 2
    for row in data["runs"]:
        assert {"run_id", "family", "total_params", "active_params", "tokens", "flops"} <= set(row)
    assert data["totals"]["flops"] == pytest.approx(sum(r["flops"] for r in data["runs"]))
    table = subprocess.run([sys.executable, "-m", "cli", "sweep", "plan", str(path)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert table.returncode == 0 and "TOTAL" in table.stdout
    assert all(r["run_id"] in table.stdout for r in data["runs"])


def test_duplicate_runs_are_refused(tmp_path):
    path = write(tmp_path, """
        name: p
        parameters: {model.preset: {value: dense-tiny}, train.log_every: {values: [1, 2]}, train.steps: {value: 4}}
        """)
    with pytest.raises(ConfigError, match="resolve to the same run"):
        plan_sweep(path)


def test_bad_values_fail_at_plan_time_naming_the_run(tmp_path):
    path = write(tmp_path, """
        name: p
        parameters: {model.preset: {value: ultramem-tiny}, model.memory.value_expansion: {values: [4, 5]}}
        """)
    with pytest.raises(ConfigError, match=r"run 1: .*value_expansion=5.*perfect square"):
        plan_sweep(path)


def test_thousand_run_plan_imports_neither_torch_nor_ray(tmp_path):
    """The 2 s budget for 1,000 runs rests on planning being pure Python; timed in benchmarks/bench_scheduler.py."""
    path = write(tmp_path, """
        name: big
        parameters:
          model.preset: {values: [dense-t1, dense-t2, dense-t3, moe-tiny, ultramem-tiny]}
          train.lr: {values: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3, 5.0e-3, 6.0e-3, 7.0e-3, 8.0e-3, 9.0e-3, 1.0e-2]}
        seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
        """)
    code = ("import sys; from experiments.sweep import plan_sweep; p = plan_sweep(sys.argv[1]); "
            "print(len(p.runs), len({r.run_id for r in p.runs}), 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", "1000", "False", "False"]


def test_shipped_sweeps_plan(monkeypatch):
    monkeypatch.chdir(REPO)
    tiny = plan_sweep(REPO / "sweeps" / "tiny_cpu.yaml")
    assert {r.family for r in tiny.runs} == {"dense", "moe", "ultramem"}
    for fam in ("dense", "moe", "ultramem"):
        assert len({r.active_params for r in tiny.runs if r.family == fam}) >= 3
    assert all(r.resources.gpus == 0 for r in tiny.runs)

    paper = plan_sweep(REPO / "sweeps" / "paper_v1.yaml")
    assert len(paper.runs) == 9 and all(r.resources.gpus >= 1 for r in paper.runs)
    assert all(0.9e12 <= r.tokens <= 1.1e12 for r in paper.runs)

    mem = plan_sweep(REPO / "sweeps" / "memory_scaling.yaml")
    ultra = [r for r in mem.runs if r.family == "ultramem"]
    assert [r.family for r in mem.runs if r not in ultra] == ["dense"]  # the reference point
    assert len({r.total_params for r in ultra}) >= 3  # memory sizes
    assert len({r.config["model"]["memory"]["top_m"] for r in ultra}) >= 3
    # at one top-m, total params grow with the memory while activated params barely move (Fig. 6b's x-axis)
    at8 = sorted((r for r in ultra if r.config["model"]["memory"]["top_m"] == 8), key=lambda r: r.total_params)
    assert at8[-1].total_params > 5 * at8[0].total_params and at8[-1].active_params < 1.2 * at8[0].active_params


def test_study_sweeps_cover_what_the_committed_study_claims(monkeypatch):
    """docs/results: >= 5 activated sizes per family on two corpora, MoE and UltraMem of equal total params, and
    >= 4 memory sizes at one activated size."""
    monkeypatch.chdir(REPO)
    for name in ("study_shakespeare", "study_knowledge"):
        runs = plan_sweep(REPO / "sweeps" / f"{name}.yaml").runs
        by_size = {}
        for fam in ("dense", "moe", "ultramem"):
            sizes = sorted(r.active_params for r in runs if r.family == fam)
            assert len(set(sizes)) >= 5, (name, fam)
            by_size[fam] = sorted((r.active_params, r.total_params) for r in runs if r.family == fam)
        for (a_moe, t_moe), (a_um, t_um) in zip(by_size["moe"], by_size["ultramem"], strict=True):
            assert abs(t_moe / t_um - 1) < 0.05 and abs(a_moe / a_um - 1) < 0.05
        assert len({r.tokens for r in runs}) == 1  # equal data for every run
    mem = [r for r in plan_sweep(REPO / "sweeps" / "study_memory.yaml").runs if r.family == "ultramem"]
    assert len({r.total_params for r in mem}) >= 4
    # activated params move only with the key tables (n keys per side): +16% from n = 32 to 362
    assert max(r.active_params for r in mem) < 1.2 * min(r.active_params for r in mem)


def test_resource_nproc_becomes_the_runs_parallel_nproc(tmp_path):
    path = write(tmp_path, """
        name: p
        parameters: {model.preset: {values: [dense-t1, dense-t3]}, train.steps: {value: 10}, train.batch_size: {value: 8}}
        resources:
          default: {cpus: 1}
          rules: [{min_params: 5.0e5, cpus: 2, nproc: 2}]
        """)
    small, big = plan_sweep(path).runs
    assert (small.resources.nproc, small.config["parallel"]["nproc"]) == (1, 1)
    assert (big.resources.nproc, big.config["parallel"]["nproc"], big.resources.cpus) == (2, 2, 2)
    assert big.config["train"]["micro_batch_size"] == 4  # 8 sequences per step over 2 processes

    path.write_text(path.read_text().replace("train.steps: {value: 10}", "train.steps: {value: 10}, "
                                                                         "parallel.nproc: {value: 4}"))
    with pytest.raises(ConfigError, match="resources give nproc=2 but the run config sets parallel.nproc=4"):
        plan_sweep(path)


def test_official_227m_sweep_is_the_authors_iso_parameter_comparison():
    plan = plan_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "official_227m.yaml")
    assert {r.preset for r in plan.runs} == {"ultramem-227m-official", "memory_plus-227m", "ultramem_v2-227m",
                                             "moe-227m-64e-top8"}
    totals = [r.total_params for r in plan.runs]
    assert max(totals) / min(totals) < 1.01  # iso-parameter: 1.23-1.24B each
    assert all(r.tokens == 768 * 4096 * 158946 for r in plan.runs)  # 500B tokens


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_plans(monkeypatch, path):
    monkeypatch.chdir(REPO)
    plan = plan_sweep(path)
    assert plan.runs and len({r.run_id for r in plan.runs}) == len(plan.runs)


def test_the_seed_sweeps_have_eight_seeds_per_configuration(monkeypatch):
    monkeypatch.chdir(REPO)
    for name, points in (("seeds_tiny.yaml", 16), ("seeds_ablation_tiny.yaml", 6)):
        runs = plan_sweep(REPO / "sweeps" / name).runs
        seeds = {}
        for r in runs:
            seeds.setdefault(r.name.rsplit("-s", 1)[0], set()).add(r.config["seed"])
        assert len(seeds) == points and all(s == set(range(8)) for s in seeds.values()), name
