"""palette's guarantees under hostile use: Ctrl-C, models in train mode, tied weights, numbers and
types at the edges, damaged files, the command line's exits, meta tensors, thread counts, string
padding and files that cannot be written. A few representative cases per class (README,
"Guarantees")."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from palette import PaletteSpec, Recipe, allocate_bits, palettize
from palette._jsonio import LoadError, atomic_path
from palette.allocate import budget_bytes
from palette.palettize import untouched
from palette.probe import Sensitivity, measure, probe_sensitivity
from palette.recipe import Candidates, tied_layers

ROOT = Path(__file__).resolve().parent.parent
SMALL = Candidates(min_numel=0, nbits=(2, 4), granularities=("per_tensor",))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class BNNet(nn.Module):
    """Convs with string padding, BatchNorm and Dropout: what train mode and 'same' padding break."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 32, 3, padding="same")
        self.bn = nn.BatchNorm2d(32)
        self.drop = nn.Dropout(0.5)
        self.c2 = nn.Conv2d(32, 16, 3, padding="valid")
        self.c3 = nn.Conv2d(16, 4, 5, padding="same", dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(torch.relu(self.c2(self.drop(torch.relu(self.bn(self.c1(x)))))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.c = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.tanh(self.a(x))))


def _state(model: nn.Module) -> tuple:
    return ([(n, t.detach().clone()) for n, t in model.state_dict().items()],
            [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])


def _same(a: tuple, b: tuple) -> bool:
    return (all(n1 == n2 and torch.equal(t1, t2) for (n1, t1), (n2, t2) in zip(a[0], b[0]))
            and a[1] == b[1] and a[2] == b[2])


# -- train mode: the model untouched, results repeatable --------------------------------------------


def test_train_mode_model_is_left_exactly_as_it_was_and_results_repeat() -> None:
    torch.manual_seed(0)
    model = BNNet().train()
    model.bn.running_mean.uniform_(-1, 1)  # something to lose
    x = (torch.randn(4, 4, 12, 12),)
    before = _state(model)
    m1 = measure(model, PaletteSpec(2), x)
    m2 = measure(model, PaletteSpec(2), x)
    assert m1.psnr == m2.psnr  # Dropout off during analysis
    assert _same(before, _state(model))
    recipe = allocate_bits(model, budget_bits=3, inputs=x, candidates=SMALL, progress=False)
    assert set(recipe.layers) == {"c1", "c2", "c3"}  # string padding probed
    assert _same(before, _state(model))
    assert model.training and all(m.training for m in model.modules())


def test_untouched_restores_on_exception_and_keyboard_interrupt() -> None:
    model = BNNet().train()
    before = _state(model)
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc), untouched(model, freeze=True) as hooks:
            hooks.append(model.c1.register_forward_hook(lambda *a: None))
            model.train()  # the block changes flags and statistics
            model(torch.randn(2, 4, 8, 8))
            raise exc()
        assert _same(before, _state(model))
        assert not model.c1._forward_hooks


# -- tied weights ------------------------------------------------------------------------------------


def test_tied_weight_is_one_layer_counted_once_with_one_palette() -> None:
    model = Tied()
    assert tied_layers(model) == {"a": ["b"]}
    recipe = Recipe.from_specs(model, PaletteSpec(4), min_numel=0)
    assert list(recipe.layers) == ["a", "c"]
    assert recipe.size_16bit_bytes == 2 * sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"a and b share one weight.*2b and 4b"):
        palettize(model, {"a": PaletteSpec(2), "b": PaletteSpec(4)}, progress=False)
    palettize(model, {"b": PaletteSpec(2)}, progress=False)  # either name, the one weight
    assert model.a.weight.unique().numel() <= 4 and model.b.weight is model.a.weight
    # the fast probe sees both uses of the weight (close to the exhaustive error)
    x = (torch.randn(16, 64),)
    fresh = Tied()
    fast = probe_sensitivity(fresh, x, SMALL, progress=False).error("a", PaletteSpec(2))
    exact = probe_sensitivity(fresh, x, SMALL, method="exhaustive", progress=False).error("a", PaletteSpec(2))
    assert 0.5 < fast / exact < 2


def test_palettizing_again_with_the_same_spec_changes_nothing() -> None:
    torch.manual_seed(0)
    for spec in (PaletteSpec(4, "per_grouped_channel", 16, per_channel_scale=True), PaletteSpec(2, cluster_dim=2)):
        model = nn.Sequential(nn.Linear(64, 64))
        palettize(model, spec, min_numel=0, progress=False)
        w = model[0].weight.detach().clone()
        palettize(model, spec, min_numel=0, progress=False)
        assert torch.equal(w, model[0].weight)


# -- numbers and types at the edges ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [(dict(nbits=4.0), "nbits"), (dict(cluster_dim=1.0), "cluster_dim"),
                                           (dict(nbits=True), "nbits"), (dict(per_channel_scale=1), "per_channel_scale"),
                                           (dict(granularity="per_grouped_channel", group_size=8.0), "group_size")])
def test_spec_types_are_checked_at_the_boundary(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        PaletteSpec(**kwargs)


def test_numpy_numbers_are_accepted_and_saved(tmp_path) -> None:
    spec = PaletteSpec(np.int64(4), "per_grouped_channel", np.int32(16), per_channel_scale=np.bool_(True))
    assert type(spec.nbits) is int and type(spec.group_size) is int and spec.per_channel_scale is True
    recipe = Recipe.from_specs(nn.Sequential(nn.Linear(32, 32)), spec, min_numel=0)
    recipe.seed = np.int64(3)
    recipe.info["note"] = np.float32(0.5)
    recipe.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json").seed == 3


def test_budgets_and_probe_options_at_the_edges() -> None:
    model = Tied()
    x = (torch.randn(8, 64),)
    sens = probe_sensitivity(model, x, SMALL, progress=False, n_probes=2)
    for bad in (dict(budget_gb=float("nan")), dict(budget_bits=-1), dict(budget_gb="1"), dict(budget_gb=True)):
        with pytest.raises(ValueError, match="budget"):
            allocate_bits(model, inputs=x, sensitivity=sens, candidates=SMALL, progress=False, **bad)
    with pytest.raises(ValueError, match="n_probes"):
        allocate_bits(model, budget_bits=3, n_probes=1.5, inputs=x, candidates=SMALL, progress=False)
    with pytest.warns(UserWarning, match="nothing is palettized"):
        huge = allocate_bits(model, budget_gb=1e308, inputs=x, sensitivity=sens, candidates=SMALL, progress=False)
    assert not huge.palettized
    # a budget of exactly the smallest size is accepted (decimal arithmetic, no float rounding)
    smallest = allocate_bits(model, budget_bits=2.02, inputs=x, sensitivity=sens, candidates=SMALL, progress=False,
                             calibrate=False)
    exact = allocate_bits(model, budget_gb=smallest.size_bytes / 1e9, inputs=x, sensitivity=sens, candidates=SMALL,
                          progress=False, calibrate=False)
    assert exact.size_bytes == smallest.size_bytes
    assert budget_bytes(0.3, None, 0, 0) == 300_000_000  # 0.3 * 1e9 is 299999999.99999994 in floats


def test_meta_model_says_the_weights_are_not_loaded() -> None:
    model = nn.Sequential(nn.Linear(64, 64, device="meta"))
    for call in (lambda: allocate_bits(model, budget_bits=3, inputs=(torch.randn(2, 64),), progress=False),
                 lambda: measure(model, PaletteSpec(4), (torch.randn(2, 64),))):
        with pytest.raises(ValueError, match="weights are not loaded"):
            call()


# -- files -------------------------------------------------------------------------------------------


def test_damaged_and_hand_edited_files_name_the_file(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    Recipe.from_specs(model, PaletteSpec(4), min_numel=0).save(tmp_path / "r.json")
    good = json.loads((tmp_path / "r.json").read_text())
    cases = {
        "utf8": b"\xff\xfe{}", "deep": b"[" * 50_000 + b"]" * 50_000,
        "nan": json.dumps({**good, "predicted_psnr": float("nan")}).encode(),
        "negative": json.dumps({**good, "fixed_bytes": -1}).encode(),
        "list": json.dumps({**good, "model": [1, 2]}).encode(),
        "huge": json.dumps(good).replace('"seed": 0', '"seed": 1e400').encode(),
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.json").write_bytes(data)
        for reader in (Recipe.load, Sensitivity.load):
            with pytest.raises(LoadError, match=f"{name}.json"):
                reader(tmp_path / f"{name}.json")


def test_damaged_cache_palettes_and_mlpackage(tmp_path) -> None:
    from palette.export import export_palettes, load_palettes
    from palette.export.verify import verify_mlpackage
    from palette.probe.cache import Cache

    cache = Cache(tmp_path / "cache", "fp")
    cache.save_tensors("unit-0.pt", {"a": torch.ones(2)})
    (tmp_path / "cache" / "unit-0.pt").write_bytes(b"not a pickle")
    with pytest.warns(UserWarning, match="damaged probe cache file"):
        assert cache.load_tensors("unit-0.pt") is None  # a miss: computed again
    model = nn.Sequential(nn.Linear(64, 64))
    palettize(model, PaletteSpec(4), min_numel=0, progress=False)
    export_palettes(model, tmp_path / "p.safetensors")
    data = (tmp_path / "p.safetensors").read_bytes()
    for i, cut in enumerate((data[:40], b"\x08" + data[1:], data[:-7])):
        (tmp_path / f"d{i}.safetensors").write_bytes(cut)
        with pytest.raises(LoadError, match=f"d{i}.safetensors"):
            load_palettes(tmp_path / f"d{i}.safetensors")
    pkg = tmp_path / "x.mlpackage"
    pkg.mkdir()
    (pkg / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0", "itemInfoEntries": {}}')
    with pytest.raises(ValueError, match="x.mlpackage"):
        verify_mlpackage(pkg, {})


def test_atomic_writes_keep_user_files_and_leave_nothing_behind(tmp_path) -> None:
    recipe = Recipe.from_specs(nn.Sequential(nn.Linear(64, 64)), PaletteSpec(4), min_numel=0)
    (tmp_path / "x.json.tmp").write_text("mine")
    recipe.save(tmp_path / "x.json")
    assert (tmp_path / "x.json.tmp").read_text() == "mine"
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        recipe.save(tmp_path / "d")
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "keep.json") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert (tmp_path / "keep.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "keep.json", "x.json", "x.json.tmp"]


# -- the command line --------------------------------------------------------------------------------


def _tiny_bert(folder: Path) -> Path:
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=256, vocab_size=500, max_position_embeddings=64)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**cfg))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "tiny.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "tiny.safetensors"


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "palette", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _interrupt_when(proc: subprocess.Popen, marker: str, timeout: float = 300) -> tuple[int, str]:
    """Send SIGINT once `marker` shows on stderr (plus a moment), return (exit status, stderr)."""
    buf: list[str] = []
    reader = threading.Thread(target=lambda: buf.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    t0 = time.monotonic()
    while marker not in "".join(buf) and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    return proc.returncode, "".join(buf)


@pytest.mark.parametrize("marker", ["fit palettes", "probe passes"])
def test_ctrl_c_mid_clustering_and_mid_probe_exits_130_and_keeps_files(tmp_path, marker) -> None:
    model = _tiny_bert(tmp_path / "m")
    out = tmp_path / "sens.json"
    out.write_text("the user's own file")
    # enough work (4096 passes) that the interrupt lands mid-run, however fast the passes are
    proc = _cli("analyze", "--model", str(model), "-o", str(out), "--samples", "16", "--probes", "256",
                "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    rc, err = _interrupt_when(proc, marker)
    assert marker in err, err[-2000:]
    assert rc == 130, err[-2000:]
    assert err.rstrip().endswith("palette: interrupted")
    assert "Traceback" not in err and "SystemError" not in err
    assert out.read_text() == "the user's own file"
    leftovers = [p.name for p in tmp_path.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]
    assert not leftovers


def test_cli_user_errors_exit_2_with_one_line(tmp_path) -> None:
    from palette.cli import main

    model = _tiny_bert(tmp_path / "m")
    (tmp_path / "bad.safetensors").write_bytes(b"\x50\x00\x00\x00\x00\x00\x00\x00garbage")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    (tmp_path / "outdir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "bad.json").write_bytes(b"\xff")
    cases = [
        (["analyze", "--model", str(tmp_path / "bad.safetensors"), "--config", str(tmp_path / "m" / "config.json")],
         "bad.safetensors"),
        (["analyze", "--model", str(tmp_path / "empty")], "empty"),
        (["analyze", "--model", str(model), "-o", str(tmp_path / "outdir")], "outdir"),
        (["apply", "--model", str(model), "--recipe", str(tmp_path / "bad.json"), "-o", str(tmp_path / "file.txt")],
         "file.txt"),
        (["apply", "--model", str(model), "--recipe", str(tmp_path / "bad.json"), "-o", str(tmp_path / "new")],
         "bad.json"),
        (["allocate", "--model", str(model), "--sensitivity", str(tmp_path / "bad.json"), "--budget-bits", "3",
          "-o", str(tmp_path / "r.json")], "bad.json"),
        (["allocate", "--model", str(model), "--budget-gb", "1e400", "-o", str(tmp_path / "r.json")], "budget-gb"),
    ]
    for argv, name in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main([*argv, "-q"])
            except SystemExit as e:  # argparse
                rc = e.code
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("palette") or "Traceback" in ln]
        assert rc == 2, (argv, err.getvalue())
        assert "Traceback" not in err.getvalue() and name in lines[-1], (argv, err.getvalue())
    assert (tmp_path / "file.txt").read_text() == "x" and not (tmp_path / "new").exists()


# -- determinism -------------------------------------------------------------------------------------

_THREADS_SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from torch import nn
from palette import allocate_bits
from palette.recipe import Candidates
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(4, 48, 3, padding="same"), nn.GELU(), nn.Conv2d(48, 48, 3, padding=1), nn.GELU(),
                      nn.Conv2d(48, 4, 3, padding="same"))
x = (torch.randn(6, 4, 16, 16),)
r = allocate_bits(model, budget_bits=3, inputs=x, candidates=Candidates(min_numel=0), n_probes=4, progress=False)
r.save(sys.argv[2])
"""


def test_recipe_bytes_do_not_depend_on_the_thread_count(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for n in (1, 2):
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(n), str(tmp_path / f"r{n}.json")], check=True,
                       env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert (tmp_path / "r1.json").read_bytes() == (tmp_path / "r2.json").read_bytes()


def test_ctrl_c_inside_a_numba_kernel_is_a_keyboard_interrupt_once_it_returns() -> None:
    from palette.cluster import fit_palettes_batch

    specs = [PaletteSpec(b, "per_grouped_channel", 16) for b in (1, 2, 4, 8)]
    fit_palettes_batch([(torch.randn(64, 64), specs, None)])  # compiled
    w = torch.randn(256, 4096)
    t0 = time.perf_counter()
    fit_palettes_batch([(w, specs, None)])
    took = time.perf_counter() - t0
    timer = threading.Timer(took / 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):  # not numba's SystemError
            fit_palettes_batch([(w, specs, None)])
            time.sleep(5)  # the signal came late: still a KeyboardInterrupt, here
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
