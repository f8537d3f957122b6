"""Contract: our attention patches share a MODEL with other packs' in any order (docs/reliability.md, "Coexistence").

The other pack is ``support/attn2_pack.py``: it speaks the attn2 replace protocol of the most used
image-prompt packs (an object at each attn2 key that adds each registered callback's term; a
second install calls ``.add`` on whatever object it finds). SD1.5 keys it by block, SDXL by depth,
as those packs do. Each of our features (recorder, regional, nested; the preview node below) is
stacked with it as ``A`` (and a second install ``B``) in every order, up to three deep, and:

* the order-swapped stacks give bit-identical latents (same float operations in the same order);
* the result differs from each side alone, except the pass-through recorder, where it equals the
  other pack alone;
* each foreign callback runs exactly as often as with the other pack alone (regional: once per
  region plus once for the background, because the regional hook attends once for each), and
  always on the whole feature map.

Stock ComfyUI nodes and patch kinds: test_coexistence_stock.py.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch

from concept_attention.attention.chain import AttentionChain
from concept_attention.attention.coexistence import coexistence_wrapper
from concept_attention.attention.patching import install_hook, install_regional, model_layers, remove_hooks
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from support.chains import chain_at
from concept_attention.sampling.nested_subjects import SubjectSpec
from support.attn2_pack import AddingReplace, apply_pack
from support.coexistence_stacks import (ARCHS, CALLS, FEATURES, FOREIGN, PER_DEPTH, PROCEED_CALLS, PROMPT,
                                        SIZE, STEPS, Stacks, differ, sample)
from support.synthetic_concepts import synthetic_set

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stacks(request: pytest.FixtureRequest) -> Stacks:
    return Stacks(request)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("arch", ARCHS)
def test_one_foreign_pack_before_or_after_ours(stacks, arch, feature):
    before, after = stacks.run(arch, feature, "A,O"), stacks.run(arch, feature, "O,A")
    foreign, ours = stacks.run(arch, feature, "A"), stacks.run(arch, feature, "O")
    assert torch.equal(before.latent, after.latent)
    assert foreign.calls["A"] > 0 and set(before.calls) == set(after.calls) == {"A"}  # whole maps only
    assert before.calls["A"] == after.calls["A"] == PROCEED_CALLS[feature] * foreign.calls["A"]
    assert differ(before.latent, ours.latent)
    if feature == "recorder":  # pass-through: exactly the other pack alone
        assert torch.equal(before.latent, foreign.latent)
    else:
        assert differ(before.latent, foreign.latent)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("arch", ARCHS)
def test_three_deep_in_every_order(stacks, arch, feature):
    middle = stacks.run(arch, feature, "A,O,B")
    first = stacks.run(arch, feature, "O,A,B")
    last = stacks.run(arch, feature, "A,B,O")
    foreign = stacks.run(arch, feature, "A,B")
    assert torch.equal(middle.latent, first.latent) and torch.equal(middle.latent, last.latent)
    for name in "AB":
        assert foreign.calls[name] > 0
        assert (middle.calls[name] == first.calls[name] == last.calls[name]
                == PROCEED_CALLS[feature] * foreign.calls[name])
    assert differ(middle.latent, stacks.run(arch, feature, "O").latent)
    assert differ(middle.latent, stacks.run(arch, feature, "A,O").latent)  # B is there too
    if feature == "recorder":
        assert torch.equal(middle.latent, foreign.latent)
    else:
        assert differ(middle.latent, foreign.latent)


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_maps_do_not_depend_on_the_order_or_on_the_other_packs_term(stacks, arch):
    """The recorder reads the layer's own queries and keys: the other pack's term changes only
    what later layers receive, so the first layer of the first step records the same maps."""
    maps = {}
    for order in ("O", "A,O", "O,A", "A,O,B", "O,A,B"):
        stacks.runs.pop((arch, "recorder", order), None)  # each run fills the store it installed
        stacks.run(arch, "recorder", order)
        maps[order] = stacks.feature(arch, "recorder").stores[-1]
    for one, other in (("A,O", "O,A"), ("A,O,B", "O,A,B")):
        assert maps[one].sigmas == maps[other].sigmas
        assert len(maps[one].steps) == STEPS
        for step_one, step_other in zip(maps[one].steps, maps[other].steps):
            assert step_one.keys() == step_other.keys()
            assert all(torch.equal(step_one[key], step_other[key]) for key in step_one)
    first_key = model_layers(stacks.request.getfixturevalue(arch).bundle.model)[0].key
    alone = maps["O"].steps[0][first_key]
    assert torch.equal(maps["A,O"].steps[0][first_key], alone)
    assert torch.equal(maps["A,O,B"].steps[0][first_key], alone)
    assert not torch.equal(maps["A,O"].steps[-1][first_key], maps["O"].steps[-1][first_key])


# ----- the issue's table, as a user builds it: the other pack and Apply Nested Attention ---------
TABLE = {  # row: (stack, the same patches in another order)
    "other pack -> this pack": ("A,O", "O,A"),
    "this pack -> other pack": ("O,A", "A,O"),
    "other pack -> this pack -> other pack": ("A,O,B", "O,A,B"),
}


@pytest.mark.parametrize("row", list(TABLE))
@pytest.mark.parametrize("arch", ARCHS)
def test_issue_table_every_row_correct(request, arch, row):
    from concept_attention.nodes.nested import ApplyNestedAttention

    tiny = request.getfixturevalue(arch)
    bank = 3 * torch.randn(8, tiny.encode("a")[0][0].shape[-1], generator=torch.Generator().manual_seed(5))

    def build(order: str) -> tuple[Any, Any]:
        model, positive = tiny.bundle.model, None
        for step in order.split(","):
            if step == "O":
                model, positive = ApplyNestedAttention.execute(model, tiny.bundle.clip, PROMPT,
                                                               SubjectSpec("cat", bank=bank)).result
            else:
                model = apply_pack(model, FOREIGN[step], PER_DEPTH[arch])
        return model, positive

    def run(order: str) -> tuple[torch.Tensor, Counter]:
        model, positive = build(order)
        CALLS.clear()
        latent = sample(tiny, model, positive)
        return latent, Counter(CALLS)

    stack, swapped = TABLE[row]
    latent, calls = run(stack)
    other_latent, other_calls = run(swapped)
    _, alone_calls = run(",".join(s for s in stack.split(",") if s != "O"))
    ours_alone, _ = run("O")
    foreign_names = [s for s in stack.split(",") if s != "O"]
    for name in foreign_names:
        assert alone_calls[name] > 0
        assert calls[name] == other_calls[name] == alone_calls[name], f"adapter {name} did not run as alone"
    assert torch.equal(latent, other_latent)
    assert differ(latent, ours_alone)


# ----- the preview node downstream of other packs ---------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_preview_node_over_other_packs(request, arch):
    """KSampler with Attention Maps gives the stock KSampler's latent of the model it is given, the
    other packs keep running, and the first layer's maps of the first step are its own."""
    from concept_attention.sampling.ksampler import run_ksampler
    from concept_attention.nodes.preview import AttentionMapSampler

    tiny = request.getfixturevalue(arch)
    first = model_layers(tiny.bundle.model)[0].key
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    args = dict(clip=tiny.bundle.clip, positive_text=PROMPT, words="cat, dog", seed=3, steps=1, cfg=5.0,
                sampler_name="euler", scheduler="normal", negative=tiny.encode(""), latent_image=latent,
                denoise=1.0, layers=":".join(str(part) for part in first), step_start=0.0, step_end=1.0)
    plain = AttentionMapSampler.execute(model=tiny.bundle.model, **args).result
    foreign = apply_pack(apply_pack(tiny.bundle.model, FOREIGN["A"], PER_DEPTH[arch]), FOREIGN["B"],
                         PER_DEPTH[arch])
    CALLS.clear()
    stock = run_ksampler(foreign, 3, 1, 5.0, "euler", "normal", tiny.encode(PROMPT), tiny.encode(""),
                         latent, 1.0)["samples"]
    alone = Counter(CALLS)
    CALLS.clear()
    out = AttentionMapSampler.execute(model=foreign, **args).result
    assert CALLS == alone and alone["A"] > 0 and alone["B"] > 0
    assert torch.equal(out[0]["samples"], stock)
    assert differ(out[0]["samples"], plain[0]["samples"])
    assert torch.equal(out[2], plain[2])  # the maps


# ----- clones share no mutable state --------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_add_on_a_clones_chain_never_reaches_the_original(request, arch):
    from test_isolation import model_state

    tiny = request.getfixturevalue(arch)
    ours = tiny.bundle.model.clone()
    install_hook(ours, AttentionRecorder(store=MapStore(token_index=torch.tensor([1]))), "all")
    before, reference = model_state(ours), sample(tiny, ours)
    key = model_layers(ours)[0].key
    stacked = apply_pack(ours, FOREIGN["A"], PER_DEPTH[arch])
    apply_pack(stacked, FOREIGN["B"], PER_DEPTH[arch])
    assert model_state(ours) == before
    assert chain_at(ours, key).callbacks == []
    assert len(chain_at(stacked, key).callbacks) == (1 if PER_DEPTH[arch] else 0)
    assert torch.equal(sample(tiny, ours), reference)


def test_a_clones_chain_is_its_own_copy_and_keeps_identities():
    block_level = AddingReplace(FOREIGN["A"], weight=torch.tensor(0.3), sigma_start=1e9, sigma_end=0.0)
    inner = AddingReplace(FOREIGN["B"], weight=torch.tensor(0.3), sigma_start=1e9, sigma_end=0.0)
    chain = AttentionChain((), inner=inner, fallback=block_level)
    chain.add(FOREIGN["A"], weight=torch.tensor(0.1), sigma_start=1e9, sigma_end=0.0)
    options = {"attn2": {("input", 1): block_level, ("input", 1, 0): chain}}
    copied = copy.deepcopy(options)
    twin = copied["attn2"][("input", 1, 0)]
    assert twin is not chain and twin.hooks is chain.hooks
    assert twin.inner is not inner and twin.callbacks is not chain.callbacks
    assert twin.fallback is copied["attn2"][("input", 1)]  # one object in the copy, as in the original
    assert twin.callbacks[0][1]["weight"] is not chain.callbacks[0][1]["weight"]
    twin.add(FOREIGN["B"], sigma_start=1e9, sigma_end=0.0)
    assert len(chain.callbacks) == 1 and len(twin.callbacks) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_every_node_leaves_a_model_with_other_packs_alone(request, arch):
    from test_isolation import model_state

    from concept_attention.nodes.compose import ConceptSampler
    from concept_attention.nodes.nested import ApplyNestedAttention
    from concept_attention.nodes.preview import AttentionMapSampler

    tiny = request.getfixturevalue(arch)
    model = apply_pack(tiny.bundle.model, FOREIGN["A"], PER_DEPTH[arch])
    before = model_state(model)
    replaces = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    latent = {"samples": torch.zeros(1, 4, SIZE, SIZE)}
    sampling = dict(seed=1, steps=1, cfg=5.0, sampler_name="euler", scheduler="normal",
                    negative=tiny.encode(""), latent_image=latent, denoise=1.0)
    width = tiny.encode("a")[0][0].shape[-1]
    nested, _ = ApplyNestedAttention.execute(model, tiny.bundle.clip, PROMPT,
                                             SubjectSpec("cat", bank=torch.randn(4, width))).result
    apply_pack(nested, FOREIGN["B"], PER_DEPTH[arch])
    sets = [synthetic_set(tiny.bundle, ["V1"], 1), synthetic_set(tiny.bundle, ["V2"], 2)]
    ConceptSampler.execute(model=model, concepts_1=sets[0], concepts_2=sets[1], composition="regional",
                           strength=1.0, masks=torch.ones(2, SIZE, SIZE) / 2, positive=tiny.encode(PROMPT),
                           **sampling)
    AttentionMapSampler.execute(model=model, clip=tiny.bundle.clip, positive_text=PROMPT, words="cat",
                                layers="all", step_start=0.0, step_end=1.0, **sampling)
    assert model_state(model) == before
    assert all(len(entry.entries) == 1 for entry in replaces.values())


# ----- what is found when the layer runs -----------------------------------------------------
def test_a_plain_replace_written_over_our_key_keeps_our_hooks(request):
    """A pack calling set_model_attn2_replace(fn, block, id, index) after us: fn and our hooks run,
    as when it came first."""
    tiny = request.getfixturevalue("sdxl")
    calls: list = []

    def half(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        calls.append(1)
        return 0.5 * optimized_attention(q, k, v, extra_options["n_heads"])

    key = model_layers(tiny.bundle.model)[0].key
    stores = []

    def ours(model):
        patched, store = model.clone(), MapStore(token_index=torch.tensor([2]))
        install_hook(patched, AttentionRecorder(store=store), "all")
        stores.append(store)
        return patched

    def theirs(model):
        patched = model.clone()
        patched.set_model_attn2_replace(half, *key)
        return patched

    after = sample(tiny, theirs(ours(tiny.bundle.model)))
    calls_after = len(calls)
    before = sample(tiny, ours(theirs(tiny.bundle.model)))
    assert calls_after > 0 and len(calls) == 2 * calls_after
    assert torch.equal(after, before)
    assert key in stores[0].steps[0] and torch.equal(stores[0].steps[0][key], stores[1].steps[0][key])
    # a second hook installed over the written-over key keeps the first one too
    again = theirs(ours(tiny.bundle.model))
    install_hook(again, AttentionRecorder(store=MapStore(token_index=torch.tensor([2]))), [model_layers(again)[0]])
    assert len(chain_at(again, key).hooks) == 2 and chain_at(again, key).inner is half


def test_block_level_replace_is_found_when_the_layer_runs(request):
    """SD1.5: a pack that swaps its own block-level object after ours (instead of adding to it)
    gets the new object run, exactly as without our hooks."""
    tiny = request.getfixturevalue("sd15")
    first = apply_pack(tiny.bundle.model, FOREIGN["A"], per_depth=False)

    def swap(model):
        patched = model.clone()
        patched.set_model_attn2_replace(AddingReplace(FOREIGN["B"], weight=torch.tensor(0.3), sigma_start=1e9,
                                                      sigma_end=0.0), "output", 4)
        return patched

    ours = first.clone()
    install_hook(ours, AttentionRecorder(store=MapStore(token_index=torch.tensor([2]))), "all")
    CALLS.clear()
    alone = sample(tiny, swap(first))
    alone_calls = Counter(CALLS)
    CALLS.clear()
    assert torch.equal(sample(tiny, swap(ours)), alone)  # the recorder passes through
    assert CALLS == alone_calls and CALLS["A"] > 0 and CALLS["B"] > 0


def test_training_loops_direct_unet_call_runs_the_wrapper(request):
    """Our training loop calls apply_model with the model's transformer_options: a block-level
    replace installed after our hooks runs there too."""
    tiny = request.getfixturevalue("sd15")
    ours = tiny.bundle.model.clone()
    install_hook(ours, AttentionRecorder(store=MapStore(token_index=torch.tensor([1]))), "all")
    both = apply_pack(ours, FOREIGN["A"], per_depth=False)
    base = both.model
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([3.0])
    context = tiny.encode(PROMPT)[0][0]
    CALLS.clear()
    with torch.no_grad():
        base.apply_model(x, sigma, c_crossattn=context,
                         transformer_options=dict(both.model_options["transformer_options"]))
    assert CALLS["A"] == len(model_layers(both))  # sigma absent: the open window holds, as alone


def test_chain_without_the_wrapper_falls_back_to_what_it_saw_at_install(request):
    """Some other caller of the UNet that drops transformer_options["wrappers"]: a block-level replace
    seen at install still runs, one installed later cannot be found."""
    tiny = request.getfixturevalue("sd15")
    foreign = apply_pack(tiny.bundle.model, FOREIGN["A"], per_depth=False)
    ours = foreign.clone()
    install_hook(ours, AttentionRecorder(store=MapStore(token_index=torch.tensor([1]))), "all")
    options = dict(ours.model_options["transformer_options"])
    del options["wrappers"]
    x = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    CALLS.clear()
    with torch.no_grad():
        ours.model.apply_model(x, torch.tensor([3.0]), c_crossattn=tiny.encode(PROMPT)[0][0],
                               transformer_options=options)
    assert CALLS["A"] == len(model_layers(ours))


def test_wrapper_is_installed_once_and_merged_once_by_comfyui(request, monkeypatch):
    import comfy.patcher_extension as ext
    import comfy.sampler_helpers
    from comfy.model_patcher import create_model_options_clone

    tiny = request.getfixturevalue("sd15")
    model = tiny.bundle.model.clone()
    seen = []

    def other_wrapper(executor, *args, **kwargs):  # e.g. a cache pack's diffusion_model wrapper
        seen.append(1)
        return executor(*args, **kwargs)

    model.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "other", other_wrapper)
    for _ in range(3):
        install_hook(model, AttentionRecorder(store=MapStore(token_index=torch.tensor([1]))), "latent/2")
    install_regional(model, [synthetic_set(tiny.bundle, ["V1"], 1).kv_deltas], torch.ones(1, 8, 8))
    options = create_model_options_clone(model.model_options)
    comfy.sampler_helpers.prepare_model_patcher(model, {}, options)
    wrappers = ext.get_all_wrappers(ext.WrappersMP.DIFFUSION_MODEL, options["transformer_options"])
    assert wrappers.count(coexistence_wrapper) == 1 and wrappers.count(other_wrapper) == 1
    # ... and ComfyUI's merge happened on its copy: the model's own options did not grow
    assert ext.get_all_wrappers(ext.WrappersMP.DIFFUSION_MODEL, model.model_options,
                                is_model_options=True) == [coexistence_wrapper]
    from concept_attention.attention import coexistence

    ours, per_call = [], coexistence.per_call_options
    monkeypatch.setattr(coexistence, "per_call_options", lambda options: ours.append(1) or per_call(options))
    sample(tiny, model, steps=2)
    assert len(ours) == len(seen) > 0  # ours once per UNet call, like the other wrapper


def test_a_hidden_replace_is_moved_and_its_models_loaded(request):
    """ComfyUI calls .to and .models() on replace objects; ours passes them to the one it hides."""
    tiny = request.getfixturevalue("sdxl")

    class Heavy(AddingReplace):
        moved: list = []

        def to(self, *args):
            Heavy.moved.append(args)
            return self

        def models(self):
            return ["its model"]

    model = tiny.bundle.model.clone()
    key = model_layers(model)[0].key
    heavy = Heavy(FOREIGN["A"], weight=torch.tensor(0.3), sigma_start=1e9, sigma_end=0.0)
    model.set_model_attn2_replace(heavy, *key)
    install_hook(model, AttentionRecorder(store=MapStore(token_index=torch.tensor([1]))), "all")
    chain = chain_at(model, key)
    assert chain.inner is heavy
    assert "its model" in model.model_patches_models()
    model.model_patches_to("cpu")
    assert Heavy.moved and chain_at(model, key).inner is heavy


def test_removing_our_hooks_keeps_what_other_packs_added(request):
    tiny = request.getfixturevalue("sdxl")
    ours = tiny.bundle.model.clone()
    hook = AttentionRecorder(store=MapStore(token_index=torch.tensor([1])))
    install_hook(ours, hook, "all")
    both = apply_pack(ours, FOREIGN["A"], per_depth=True)
    alone = apply_pack(tiny.bundle.model, FOREIGN["A"], per_depth=True)
    remove_hooks(both, [hook])
    assert torch.equal(sample(tiny, both), sample(tiny, alone))
