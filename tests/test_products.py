"""The CPU's measured product kernels (`drex_hf.products`): each kernel and padding gives the
product F.linear gives; engines running them decode full depth's tokens (greedy, and the same seeded
samples); they apply only inside an engine's step, on this thread, without autograd; the table's
measured choices are well-formed; a tiny model and DREX_CPU_PRODUCTS=off keep F.linear."""

import copy
import pickle
import threading

import pytest
import torch
from test_self_spec import SAMPLING, _full, _model, _prompts
from test_spec_engine import LENGTHS_8, NEW

from drex_hf import products
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.settings import DecodeSettings
from drex_hf.generation.spec.engine import SpecEngine
from drex_hf.products import Choice, ProductTable, install_products, product, use_products

FORCED = {  # every kernel, padded and not, in the layers and the lm_head
    "transposed, padded to 8": {"layers": Choice("transposed", 8), "head": Choice("transposed", 8)},
    "transposed": {"layers": Choice("transposed", 1), "head": Choice("transposed", 1)},
    "linear, padded to 5": {"layers": Choice("linear", 5), "head": Choice("linear", 5)},
}


@pytest.mark.parametrize("choice", [Choice("linear", 3), Choice("linear", 8), Choice("transposed", 3),
                                    Choice("transposed", 8)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_each_kernel_and_padding_gives_the_linear_product(choice, bias):
    torch.manual_seed(0)
    module = torch.nn.Linear(24, 40, bias=bias)
    features = torch.randn(3, 1, 24)  # 3 rows, as a packed verify's [n, 1, hidden]
    with torch.no_grad():
        out = product(module, features, choice)
        assert out.shape == (3, 1, 40) and out.is_contiguous()
        torch.testing.assert_close(out, module(features))
        out.view(3, 40)  # HF's layers view their projections: the result must allow it


@pytest.mark.parametrize("forced", list(FORCED))
def test_engines_with_forced_products_decode_full_depths_tokens(forced):
    model = _model("llama")
    table = install_products(model.arch, ProductTable.given(FORCED[forced]))
    prompts = _prompts(LENGTHS_8)
    called = []
    original = products._run

    def spy(kernel, flat, weight):
        called.append((kernel, flat.shape[0]))
        return original(kernel, flat, weight)

    products._run = spy
    try:
        for settings in (DecodeSettings(max_new_tokens=NEW), DecodeSettings(max_new_tokens=NEW, **SAMPLING)):
            seeds = None if not settings.do_sample else list(range(3))
            full = _full(model, prompts[:3], settings, seeds)
            for name in ("full", "self_spec"):
                runs = []
                for forced_table in (None, table):
                    if name == "full":
                        engine = DrexEngine(model, max_batch=3, max_len=40, policy="full", settings=settings)
                    else:
                        engine = SpecEngine(model, max_batch=3, max_len=40, draft_tokens=3, draft_source="ngram",
                                            settings=settings)  # fmt: skip
                    assert engine.runner.products is None  # a tiny model runs F.linear unless told
                    engine.runner.products = forced_table
                    for i in range(3):
                        engine.add_request(prompts[i], seed=None if seeds is None else seeds[i])
                    runs.append([engine.run()[i].tokens for i in range(3)])
                assert runs[1] == runs[0], (forced, name, settings.do_sample)  # the same tokens, the same draws
                if name == "full" or not settings.do_sample:  # (self_spec's samples are full depth's in law only)
                    assert runs[1] == full, (forced, name, settings.do_sample)
    finally:
        products._run = original
    kernel = FORCED[forced]["layers"].kernel
    assert called and {k for k, _ in called} == {kernel}  # the forced kernel ran every product it was asked to
    assert min(rows for _, rows in called) >= FORCED[forced]["layers"].rows


def test_products_apply_only_inside_use_products_on_this_thread_without_autograd():
    model = _model("llama")
    table = install_products(model.arch, ProductTable.given({"layers": Choice("transposed", 4)}))
    layer = model.arch.layers[0].mlp.gate_proj
    x = torch.randn(2, layer.in_features)
    ran = []
    original = products._run
    products._run = lambda kernel, flat, weight: ran.append(kernel) or original(kernel, flat, weight)
    try:
        with torch.no_grad():
            layer(x)  # outside: F.linear (HF's own generate, training, any other caller)
            assert ran == []
            with use_products(table):
                layer(x)
                assert ran == ["transposed"]
                seen = []
                thread = threading.Thread(target=lambda: (layer(x), seen.append(list(ran))))
                thread.start()
                thread.join()
                assert seen == [["transposed"]]  # another thread's products are its own: F.linear there
            layer(x)
            assert ran == ["transposed"]
        with use_products(table):
            y = layer(x.requires_grad_())  # autograd: F.linear, whatever the table says
            assert ran == ["transposed"] and y.requires_grad
    finally:
        products._run = original


def test_a_tiny_model_or_the_switch_off_keeps_f_linear(monkeypatch):
    model = _model("llama")
    assert install_products(model.arch) is None  # far under MIN_BYTES
    monkeypatch.setenv("DREX_CPU_PRODUCTS", "on")
    table = install_products(model.arch)
    assert isinstance(table, ProductTable) and set(table.groups) == {"layers", "head"}
    assert install_products(model.arch) is table  # one table per model, shared by its engines
    monkeypatch.setenv("DREX_CPU_PRODUCTS", "off")
    assert install_products(model.arch) is None
    monkeypatch.setenv("DREX_CPU_PRODUCTS", "fast")
    with pytest.raises(ValueError, match="DREX_CPU_PRODUCTS must be auto, on or off"):
        install_products(model.arch)


def test_measured_choices_are_well_formed():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32) for _ in range(6)]
    table = ProductTable({"layers": weights, "head": [torch.randn(200, 32)]}, repeats=1)
    for n in (1, 3, 8, 9, 30):
        for group in ("layers", "head"):
            choice = table.choice(group, n)
            assert choice.kernel in products.KERNELS
            most = products.MOST_PADDED_ROWS
            assert (n <= choice.rows <= most) if n <= most else choice.rows == n
    about = table.describe()
    assert "layers/1" in about["choices"] and "linear/1" in about["spent_ms"]["layers"]
    assert "transposed/24" in about["spent_ms"]["head"] and about["measure_s"] > 0  # 30 rows: the nearest probe


def test_an_installed_model_copies_and_pickles():
    model = _model("llama")
    table = install_products(model.arch, ProductTable.given({"layers": Choice("transposed", 2)}))
    layer = model.arch.layers[0].mlp.gate_proj
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.mul_(2)
        x = torch.randn(1, layer.in_features)
        with use_products(table):
            torch.testing.assert_close(twin(x), 2 * layer(x))  # the copy's forward reads its own weight
        again = pickle.loads(pickle.dumps(layer))
        torch.testing.assert_close(again(x), layer(x))


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batch_independence_holds_with_measured_products(batch, monkeypatch):
    """Invariant 1 with the products on (`DREX_CPU_PRODUCTS=on`: measured on the tiny model): each
    request's tokens and exit layers under drex equal the reference decoder's, every exit taken."""
    from conftest import assert_every_exit_taken, covering_thresholds
    from test_engine import LENGTHS, _assert_same_as_reference, _engine_run
    from test_engine import _model as engine_model
    from test_engine import _prompts as engine_prompts

    from drex_hf.generation.scheduler import CostModel

    monkeypatch.setenv("DREX_CPU_PRODUCTS", "on")
    model = engine_model("llama")
    _, _, prompts = engine_prompts(LENGTHS[batch])
    settings = DecodeSettings(max_new_tokens={1: 24, 3: 16, 8: 12}[batch])
    thresholds, (reference,) = covering_thresholds(model, prompts, [(settings, None)])
    results, _ = _engine_run(model, prompts, settings, thresholds, cost_model=CostModel.constant(4))
    _assert_same_as_reference(results, reference)
    assert_every_exit_taken([r.exit_layers for r in results], model, thresholds)
    table = install_products(model.arch)
    assert table is not None and any(n == batch for _, n in table.choices)  # the step's rows ran as it chose
