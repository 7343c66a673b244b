"""fastprune.patch(), python -m fastprune and FASTPRUNE_PATCH=1: torch.nn.utils.prune
computing with fastprune for code that cannot change its import
(docs/behaviour.md §Patch). The differential tests of test_prune_reference.py
also run through the patch (conftest.fast_impl)."""
import contextlib
import copy
import os
import pickle
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from torch.nn.utils.prune import L1Unstructured as EarlyL1
from torch.nn.utils.prune import global_unstructured as early_global
from torch.nn.utils.prune import l1_unstructured as early_l1

import fastprune
import fastprune.prune as FAST
from conftest import (
    REF, assert_mask_equal, assert_same_pruned_state, every_other, example_input, make_linear, make_net,
    pruning_hooks,
)

PATCH_MODULE = sys.modules["fastprune.patch"]  # the name fastprune.patch is the function
CLASSES = [getattr(REF, name) for name in FAST.__all__ if isinstance(getattr(REF, name, None), type)]
SUBPROCESS_TIMEOUT = 240  # seconds: a hang fails instead of stalling CI


@pytest.fixture(autouse=True)
def unpatched_around():
    """Every test starts and ends unpatched, whatever it does."""
    assert not fastprune.is_patched()
    yield
    leaked = fastprune.is_patched()
    fastprune.unpatch()
    assert not leaked, "the test left torch.nn.utils.prune patched"


def module_and_classes():
    """What the patch may touch: the module's attributes and its classes'
    dicts. (copyreg caches __slotnames__ on a class when one is first pickled.)"""
    return ({"module": dict(vars(REF))}
            | {cls.__name__: {k: v for k, v in vars(cls).items() if k != "__slotnames__"} for cls in CLASSES})


def assert_identical(before, after):
    for owner, attrs in before.items():
        assert attrs.keys() == after[owner].keys(), owner
        changed = [name for name, value in attrs.items() if after[owner][name] is not value]
        assert not changed, f"{owner}: {changed} not restored"


def kernel_ops(fn):
    """Names of the fastprune ops that ran during ``fn()`` (profiler records)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fastprune::")}


# ----------------------------------------------------------------------------
# patch / unpatch / patched
# ----------------------------------------------------------------------------

def test_round_trip_restores_every_object():
    before = module_and_classes()
    fastprune.patch()
    fastprune.patch()  # harmless
    during = module_and_classes()
    assert REF.l1_unstructured is FAST.l1_unstructured and REF._compute_norm is FAST._compute_norm
    assert all(during["module"][cls.__name__] is cls for cls in CLASSES), "torch's classes stay in the module"
    assert REF.BasePruningMethod.apply.__func__ is FAST.BasePruningMethod.apply.__func__
    for cls in CLASSES:
        assert during[cls.__name__]["compute_mask"] is before[cls.__name__]["compute_mask"]
    fastprune.unpatch()
    fastprune.unpatch()  # harmless
    assert_identical(before, module_and_classes())
    assert type(REF.L1Unstructured(0.2)) is REF.L1Unstructured and type(REF.Identity()) is REF.Identity


def test_patched_nests_and_restores_on_exceptions():
    before = module_and_classes()
    with pytest.raises(KeyError):
        with fastprune.patched():
            with fastprune.patched():
                assert fastprune.is_patched()
            assert fastprune.is_patched(), "the inner block leaves the outer one's patch"
            raise KeyError("x")
    assert not fastprune.is_patched()
    assert_identical(before, module_and_classes())
    fastprune.patch()
    with fastprune.patched():
        pass
    assert fastprune.is_patched(), "a block inside an explicit patch() leaves it on"
    fastprune.unpatch()


def test_failed_patch_puts_back_what_it_changed():
    before = module_and_classes()

    class Refuses:
        def __setattr__(self, name, value):
            raise RuntimeError("read-only")

    with mock.patch.object(PATCH_MODULE, "_replacements", side_effect=lambda: (
            [(REF, "identity", FAST.identity), (Refuses(), "x", 1)])):
        with pytest.raises(RuntimeError, match="read-only"):
            fastprune.patch()
    assert not fastprune.is_patched()
    assert_identical(before, module_and_classes())


def test_construction_gives_fastprune_twins():
    with fastprune.patched():
        for cls in CLASSES[1:]:  # BasePruningMethod is abstract
            args = {"PruningContainer": (), "Identity": (), "CustomFromMask": (torch.ones(2),),
                    "LnStructured": (0.5, 2)}.get(cls.__name__, (0.5,))
            obj = cls(*args)
            assert type(obj) is getattr(FAST, cls.__name__) and isinstance(obj, cls)
        assert REF.LnStructured(0.5, 2, dim=1).dim == 1
        with pytest.raises(TypeError, match=r"Identity\(\) takes no arguments"):
            REF.Identity(1)
        with pytest.raises(TypeError, match="Invalid type for amount"):
            REF.L1Unstructured("a")
        with pytest.raises(TypeError, match="abstract"):
            REF.BasePruningMethod()


def test_fast_paths_are_taken_through_torch_module():
    """The patch replaces no compute_mask of torch's classes, so fastprune does
    not mistake it for a user's override: the kernels run."""
    with fastprune.patched():
        assert "fastprune::unstructured_mask" in kernel_ops(lambda: REF.l1_unstructured(make_linear(), "weight", 0.5))
        assert "fastprune::unstructured_mask" in kernel_ops(lambda: early_l1(make_linear(), "weight", 0.5))
        assert "fastprune::unstructured_mask" in kernel_ops(lambda: EarlyL1.apply(make_linear(), "weight", 3))
        m = make_net()
        ops = kernel_ops(lambda: REF.global_unstructured([(m.conv, "weight"), (m.fc, "weight")],
                                                         pruning_method=REF.L1Unstructured, amount=0.3))
        assert "fastprune::global_unstructured_masks" in ops
        assert "fastprune::channel_norms" in kernel_ops(lambda: REF.ln_structured(make_net().conv, "weight", 1, 2, 0))
    assert not kernel_ops(lambda: REF.l1_unstructured(make_linear(), "weight", 0.5)), "unpatched: the reference"


def test_early_global_unstructured_prunes_as_the_reference():
    """A `from torch.nn.utils.prune import global_unstructured` taken before
    the patch runs torch's algorithm, with fastprune's methods inside."""
    ref = make_net()
    REF.global_unstructured([(ref.conv, "weight"), (ref.fc, "weight")], REF.L1Unstructured, amount=0.4)
    m = make_net()
    with fastprune.patched():
        early_global([(m.conv, "weight"), (m.fc, "weight")], REF.L1Unstructured, amount=0.4)
    assert type(pruning_hooks(m.fc)[0][1]) is FAST.CustomFromMask
    assert_same_pruned_state(ref, m)


def test_compute_mask_override_is_still_honoured_under_patch():
    """The upstream tests' mock of torch's compute_mask takes effect when patched too."""
    with fastprune.patched(), mock.patch.object(REF.L1Unstructured, "compute_mask", autospec=True,
                                                side_effect=lambda self, t, default_mask: default_mask) as cm:
        m = make_linear()
        REF.l1_unstructured(m, "weight", 0.5)
        cm.assert_called_once()
        assert bool((m.weight_mask == 1).all())


# ----------------------------------------------------------------------------
# Hooks made before, during and after the patch
# ----------------------------------------------------------------------------

def test_hooks_from_before_during_and_after_the_patch():
    """isinstance against torch's classes, is_pruned, remove and containers
    work on every mix; the result equals the reference's throughout."""
    steps = [lambda m: REF.l1_unstructured(m.fc, "weight", 0.3),
             lambda m: REF.random_structured(m.fc, "weight", 1, 0),
             lambda m: REF.l1_unstructured(m.fc, "weight", 4),
             lambda m: REF.l1_unstructured(m.conv, "weight", 0.2)]
    pure, mixed = make_net(), make_net()
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        step(pure)
        torch.manual_seed(i)
        with fastprune.patched() if i in (1, 2) else contextlib.nullcontext():
            step(mixed)
        assert_same_pruned_state(pure, mixed)
    container = pruning_hooks(mixed.fc)[0][1]
    assert type(container) is FAST.PruningContainer
    assert [type(h) for h in container] == [REF.L1Unstructured, FAST.RandomStructured, FAST.L1Unstructured]
    for hook in [*container, pruning_hooks(mixed.conv)[0][1]]:
        assert isinstance(hook, REF.BasePruningMethod) and isinstance(hook, EarlyL1) == (
            type(hook).__name__ == "L1Unstructured")
    with fastprune.patched():
        assert REF.is_pruned(mixed)
        REF.remove(mixed.fc, "weight")
    REF.remove(pure.fc, "weight")
    REF.remove(mixed.conv, "weight")
    REF.remove(pure.conv, "weight")
    assert not REF.is_pruned(mixed)
    assert_same_pruned_state(pure, mixed)


EVERY_OTHER_BEFORE = every_other(REF)  # a user method defined before any patch


class LoggedL1(REF.L1Unstructured):
    """A user subclass of torch's L1Unstructured, defined before any patch."""

    def compute_mask(self, t, default_mask):
        self.calls = getattr(self, "calls", 0) + 1
        return super().compute_mask(t, default_mask)


@pytest.mark.parametrize("defined", ["before", "during"])
def test_user_subclasses_under_the_patch(defined):
    """User methods (subclasses of torch's classes) work alone, in fastprune's
    container and in global_unstructured, as with the reference."""
    def run(patched):
        with fastprune.patched() if patched else contextlib.nullcontext():
            cls = EVERY_OTHER_BEFORE if defined == "before" else every_other(REF)
            m = make_net()
            hook = cls.apply(m.fc, "weight")
            REF.l1_unstructured(m.fc, "weight", 0.3)
            LoggedL1.apply(m.fc, "weight", amount=0.5)
            REF.global_unstructured([(m.conv, "weight"), (m.fc, "bias")], cls)
            REF.global_unstructured([(m.conv, "weight"), (m.fc, "bias")], REF.L1Unstructured, amount=0.2)
            return m, hook, pruning_hooks(m.fc)[0][1]
    pure, _, _ = run(False)
    m, hook, container = run(True)
    assert type(hook).__name__ == "EveryOther" and isinstance(hook, REF.BasePruningMethod)
    assert type(container) is FAST.PruningContainer and type(container[2]) is LoggedL1 and container[2].calls == 1
    assert_same_pruned_state(pure, m)


def test_pickle_and_deepcopy_of_mixed_modules():
    """Hooks made before and under the patch pickle and deep-copy, patched or
    not (torch's classes are still where the pickles name them)."""
    m, pure = make_net(), make_net()
    with torch.no_grad():
        for P, mod in ((REF, pure), (REF, m)):
            P.l1_unstructured(mod.fc, "weight", 0.3)
        with fastprune.patched():
            REF.l1_unstructured(m.fc, "weight", 0.2)
            REF.ln_structured(m.conv, "weight", 1, 2, 0)
        REF.l1_unstructured(pure.fc, "weight", 0.2)
        REF.ln_structured(pure.conv, "weight", 1, 2, 0)
    for patched in (True, False):
        with fastprune.patched() if patched else contextlib.nullcontext():
            copies = [pickle.loads(pickle.dumps(m)), copy.deepcopy(m)]
            pure_copy = pickle.loads(pickle.dumps(pure))
        for c in copies:
            assert_same_pruned_state(pure_copy, c)
            assert [type(h) for h in pruning_hooks(c.fc)[0][1]] == [REF.L1Unstructured, FAST.L1Unstructured]
            with torch.no_grad():  # (keeps the cached tensors as they were)
                x = example_input(c)
                torch.testing.assert_close(c(x), pure_copy(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# python -m fastprune and FASTPRUNE_PATCH=1 (subprocesses)
# ----------------------------------------------------------------------------

def run_python(args, cwd, env_patch=None, check_rc=None):
    env = {k: v for k, v in os.environ.items() if k != "FASTPRUNE_PATCH"}
    if env_patch is not None:
        env["FASTPRUNE_PATCH"] = env_patch
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


# An unmodified user script: it never names fastprune.
SCRIPT = '''\
import sys
import torch
import torch.nn.utils.prune as prune

def prune_once():
    m = torch.nn.Linear(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        prune.l1_unstructured(m, "weight", amount=0.5)
    kernel = any(e.name == "fastprune::unstructured_mask" for e in prof.events())
    return f"{type(m._forward_pre_hooks[next(iter(m._forward_pre_hooks))]).__module__} kernel={kernel}"

def worker(rank, out_dir):
    with open(f"{out_dir}/worker{rank}.txt", "w") as f:
        f.write(prune_once())

if __name__ == "__main__":
    print("name", __name__, "argv", sys.argv)
    print("main", prune_once())
    if "--spawn" in sys.argv:
        import torch.multiprocessing as mp
        mp.spawn(worker, args=(sys.argv[-1],), nprocs=2, join=True)
    sys.exit(int(sys.argv[1]))
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "user_script.py"
    path.write_text(SCRIPT)
    return path


def test_runner_runs_a_script_patched(script, tmp_path):
    proc = run_python(["-m", "fastprune", str(script), "3", "--flag", "a b"], cwd=tmp_path, check_rc=3)
    assert f"name __main__ argv ['{script}', '3', '--flag', 'a b']" in proc.stdout
    assert "main fastprune.prune kernel=True" in proc.stdout
    plain = run_python([str(script), "0"], cwd=tmp_path, check_rc=0)
    assert "main torch.nn.utils.prune kernel=False" in plain.stdout


def test_runner_runs_a_module_patched(script, tmp_path):
    proc = run_python(["-m", "fastprune", "-m", "user_script", "5", "x"], cwd=tmp_path, check_rc=5)
    assert "name __main__ argv" in proc.stdout and "'5', 'x']" in proc.stdout
    assert "main fastprune.prune kernel=True" in proc.stdout


def test_runner_help_and_bad_arguments(tmp_path):
    proc = run_python(["-m", "fastprune", "--help"], cwd=tmp_path, check_rc=0)
    assert "python -m fastprune script.py" in proc.stdout and "FASTPRUNE_PATCH=1" in proc.stdout
    assert "usage:" in run_python(["-m", "fastprune"], cwd=tmp_path, check_rc=2).stderr
    assert "no such file" in run_python(["-m", "fastprune", "missing.py"], cwd=tmp_path, check_rc=2).stderr


def test_runner_exception_exits_like_python(tmp_path):
    path = tmp_path / "fails.py"
    path.write_text("raise ValueError('boom')\n")
    proc = run_python(["-m", "fastprune", str(path)], cwd=tmp_path, check_rc=1)
    assert "ValueError: boom" in proc.stderr


def test_spawned_workers_are_patched(script, tmp_path):
    """torch.multiprocessing spawn workers re-import the script, not fastprune:
    FASTPRUNE_PATCH=1, inherited, patches them when they import torch."""
    run_python(["-m", "fastprune", str(script), "0", "--spawn", str(tmp_path)], cwd=tmp_path, check_rc=0)
    for rank in range(2):
        assert (tmp_path / f"worker{rank}.txt").read_text() == "fastprune.prune kernel=True"


@pytest.mark.parametrize("value,patched", [("1", True), ("0", False), ("", False)])
def test_environment_variable(value, patched, tmp_path):
    code = ("import torch.nn.utils.prune as p, sys; print(p.l1_unstructured.__module__, "
            "'fastprune' in sys.modules)")
    proc = run_python(["-c", code], cwd=tmp_path, env_patch=value, check_rc=0)
    assert proc.stdout.split() == (["fastprune.prune", "True"] if patched else ["torch.nn.utils.prune", "False"])


def test_environment_variable_other_values_warn(tmp_path):
    proc = run_python(["-W", "error", "-c", "import fastprune"], cwd=tmp_path, env_patch="yes")
    assert proc.returncode != 0 and "FASTPRUNE_PATCH='yes' ignored" in proc.stderr


# ----------------------------------------------------------------------------
# Frameworks that prune through torch.nn.utils.prune
# ----------------------------------------------------------------------------

# In the style of the official PyTorch pruning tutorial: LeNet, local,
# iterative, structured, global and custom pruning, then remove.
TUTORIAL = '''\
import hashlib
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, int(x.nelement() / x.shape[0]))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class FooBarPruningMethod(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


torch.manual_seed(0)
model = LeNet()
prune.random_unstructured(model.conv1, name="weight", amount=0.3)
prune.l1_unstructured(model.conv1, name="bias", amount=3)
prune.ln_structured(model.conv1, name="weight", amount=0.5, n=2, dim=0)
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Conv2d):
        prune.l1_unstructured(module, name="weight", amount=0.2)
    elif isinstance(module, torch.nn.Linear):
        prune.l1_unstructured(module, name="weight", amount=0.4)
params = ((model.conv2, "weight"), (model.fc1, "weight"), (model.fc2, "weight"), (model.fc3, "weight"))
prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.2)
FooBarPruningMethod.apply(model.fc3, "bias")
out = model(torch.randn(2, 1, 28, 28))
hooks = ",".join(sorted({type(h).__module__ for m in model.modules() for h in m._forward_pre_hooks.values()}))
for module, name in params + ((model.conv1, "weight"),):
    prune.remove(module, name)
digest = hashlib.sha256()
for key, value in model.state_dict().items():
    digest.update(key.encode() + value.numpy().tobytes())
digest.update(out.detach().numpy().tobytes())
print("hooks", hooks, "pruned", prune.is_pruned(model), "state", digest.hexdigest())
'''


def test_tutorial_script_same_result_patched(tmp_path):
    path = tmp_path / "tutorial.py"
    path.write_text(TUTORIAL)
    plain = run_python([str(path)], cwd=tmp_path, check_rc=0).stdout.split()
    patched = run_python(["-m", "fastprune", str(path)], cwd=tmp_path, check_rc=0).stdout.split()
    assert plain[:4] == ["hooks", "__main__,torch.nn.utils.prune", "pruned", "True"], plain
    assert patched == ["hooks", "__main__,fastprune.prune", "pruned", "True", "state", plain[-1]]


def test_lightning_model_pruning_same_result_patched():
    """Lightning's ModelPruning callback (local and global L1) trains the same
    model to the same weights patched and unpatched; patched, the kernels run."""
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.callbacks import ModelPruning

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def train(global_prune):
        pl.seed_everything(0, verbose=False)
        model = Tiny()
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
        trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[ModelPruning("l1_unstructured", amount=0.3, verbose=0,
                                                     use_global_unstructured=global_prune)])
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
        return {k: v.clone() for k, v in model.state_dict().items()}

    for global_prune in (False, True):
        plain = train(global_prune)
        with fastprune.patched(), mock.patch.object(fastprune.ops, "global_unstructured_masks",
                                                    wraps=fastprune.ops.global_unstructured_masks) as kernel:
            patched = train(global_prune)
        assert kernel.called
        assert plain.keys() == patched.keys()
        for key in plain:
            assert_mask_equal(patched[key], plain[key])
        assert float((plain["net.0.weight"] == 0).float().mean()) > 0.3
