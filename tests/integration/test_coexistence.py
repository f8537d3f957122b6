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
  region plus once for the background, because the regional hook attends once for each).
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

from concept_attention.attention.chain import AttentionChain
from concept_attention.attention.coexistence import coexistence_wrapper
from concept_attention.attention.patching import (chain_at, install_hook, install_nested, install_regional,
                                                 model_layers, remove_hooks)
from concept_attention.attention.recorder import AttentionRecorder, MapStore
from concept_attention.attention.tokens import locate_words
from concept_attention.training.nested_subjects import SubjectSpec, build_sources, encode_prompt
from support.attn2_pack import AddingReplace, apply_pack, make_callback
from support.synthetic_concepts import synthetic_set

PROMPT = "a photo of a cat and a dog"
STEPS, SIZE = 2, 16  # latent 16x16: every tiny layer keeps at least 4x4 queries
PER_DEPTH = {"sd15": False, "sdxl": True}  # how the other pack keys each architecture
CALLS: Counter = Counter()
FOREIGN = {"A": make_callback("A", CALLS), "B": make_callback("B", CALLS)}
PROCEED_CALLS = {"recorder": 1, "regional": 3, "nested": 1}  # per layer call: see the docstring


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors on a shared machine: one thread is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sample(tiny: Any, model: Any, positive: Any = None, steps: int = STEPS) -> torch.Tensor:
    """comfy.sample.sample as the stock KSampler calls it."""
    import comfy.sample

    latent = torch.zeros(1, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive or tiny.encode(PROMPT),
                               tiny.encode(""), latent, seed=0, disable_pbar=True)


@dataclass
class Feature:
    """One of our patching features: how it installs on a MODEL and what it samples with."""

    install: Callable[[Any], Any]  # MODEL -> patched clone
    positive: Any = None
    stores: list | None = None  # map stores of the installed recorders, newest last


def make_feature(tiny: Any, name: str) -> Feature:
    if name == "recorder":
        stores: list[MapStore] = []
        tokens = [group[0] for group in locate_words(tiny.bundle.clip, PROMPT, ["cat", "dog"])]

        def install(model: Any) -> Any:
            patched, store = model.clone(), MapStore()
            store.set_tokens(tokens)
            install_hook(patched, AttentionRecorder(store=store), "all")
            stores.append(store)
            return patched

        return Feature(install, stores=stores)
    if name == "regional":
        sets = [synthetic_set(tiny.bundle, [t], seed, scale=0.3) for t, seed in (("V1", 1), ("V2", 2))]
        masks = torch.zeros(2, SIZE, SIZE)
        masks[0, :, : SIZE // 2], masks[1, :, SIZE // 2:] = 1, 1

        def install(model: Any) -> Any:
            patched = model.clone()
            install_regional(patched, [s.kv_deltas for s in sets], masks)
            return patched

        return Feature(install)
    conditioning, features = encode_prompt(tiny.bundle.clip, PROMPT)
    bank = 3 * torch.randn(8, features.shape[-1], generator=torch.Generator().manual_seed(5))
    sources = build_sources(tiny.bundle.clip, PROMPT, features, [SubjectSpec("cat", bank=bank)],
                            model_layers(tiny.bundle.model))

    def install(model: Any) -> Any:
        patched = model.clone()
        install_nested(patched, sources)
        return patched

    return Feature(install, positive=conditioning)


@dataclass
class Run:
    latent: torch.Tensor
    calls: Counter
    model: Any


class Stacks:
    """Builds and samples stacks like "A,O,B" (A, B: the other pack's installs; O: ours), cached."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.features: dict[tuple[str, str], Feature] = {}
        self.runs: dict[tuple[str, str, str], Run] = {}

    def feature(self, arch: str, name: str) -> Feature:
        if (arch, name) not in self.features:
            self.features[arch, name] = make_feature(self.request.getfixturevalue(arch), name)
        return self.features[arch, name]

    def build(self, arch: str, name: str, order: str) -> Any:
        tiny = self.request.getfixturevalue(arch)
        model = tiny.bundle.model
        for step in order.split(","):
            model = (self.feature(arch, name).install(model) if step == "O"
                     else apply_pack(model, FOREIGN[step], PER_DEPTH[arch]))
        return model

    def run(self, arch: str, name: str, order: str) -> Run:
        if (arch, name, order) not in self.runs:
            tiny = self.request.getfixturevalue(arch)
            model = self.build(arch, name, order)
            CALLS.clear()
            latent = sample(tiny, model, self.feature(arch, name).positive)
            self.runs[arch, name, order] = Run(latent, Counter(CALLS), model)
        return self.runs[arch, name, order]


@pytest.fixture(scope="module")
def stacks(request: pytest.FixtureRequest) -> Stacks:
    return Stacks(request)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Clearly different: by more than 0.1 % of the latent's range, far beyond float noise (the
    other pack's term moves the tiny models' latents, some hundreds in size, by tens)."""
    return float((a - b).abs().max()) > 1e-3 * float(a.abs().max())


ARCHS = ["sd15", "sdxl"]
FEATURES = ["recorder", "regional", "nested"]


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
    from concept_attention.nodes.common import run_ksampler
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


# ----- stock ComfyUI nodes and patch kinds that touch attention ------------------------------
class ContextShift:
    """Like the stock Hypernetwork Loader's patch (set_model_attn1_patch/attn2_patch): a small
    residual map on the keys' and values' inputs, for layers of its width. The stock loader reads
    pickled files only, so the patch is built here."""

    def __init__(self, width: int, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k = torch.randn(width, width, generator=g) / width ** 0.5
        self.v = torch.randn(width, width, generator=g) / width ** 0.5

    def __call__(self, n, context, value, extra_options):
        if context.shape[-1] != self.k.shape[0]:
            return n, context, value
        return n, context + torch.tanh(context @ self.k), value + torch.tanh(value @ self.v)


def with_context_shift(model: Any, width: int) -> Any:
    patched = model.clone()
    shift = ContextShift(width)
    patched.set_model_attn1_patch(shift)
    patched.set_model_attn2_patch(shift)
    return patched


@pytest.mark.parametrize("arch", ARCHS)
def test_hypernetwork_like_attn2_patch_before_or_after_regional(request, arch):
    """Regional deltas act on the text features as to_k/to_v receive them, after the other patch."""
    tiny = request.getfixturevalue(arch)
    width = tiny.encode("a")[0][0].shape[-1]
    concepts = synthetic_set(tiny.bundle, ["V1"], 1, scale=0.3)
    full = torch.ones(1, SIZE, SIZE)

    def regional(model):
        patched = model.clone()
        install_regional(patched, [concepts.kv_deltas], full)
        return patched

    after = sample(tiny, with_context_shift(regional(tiny.bundle.model), width))
    before = sample(tiny, regional(with_context_shift(tiny.bundle.model, width)))
    assert torch.equal(after, before)
    merged = tiny.bundle.model.clone()
    merged.add_patches({k: ("diff", (d,)) for k, d in concepts.kv_deltas.items()}, 1.0)
    reference = sample(tiny, with_context_shift(merged, width))
    assert differ(reference, sample(tiny, merged))  # the shift matters far beyond the tolerance
    # c (W0 + d)^T vs c W0^T + c d^T: equal up to float rounding, carried through the steps
    torch.testing.assert_close(after, reference, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_hypernetwork_like_attn2_patch_before_or_after_nested(stacks, request, arch):
    tiny = request.getfixturevalue(arch)
    width = tiny.encode("a")[0][0].shape[-1]
    feature = stacks.feature(arch, "nested")
    after = sample(tiny, with_context_shift(feature.install(tiny.bundle.model), width), feature.positive)
    before = sample(tiny, feature.install(with_context_shift(tiny.bundle.model, width)), feature.positive)
    assert torch.equal(after, before)
    assert differ(after, sample(tiny, with_context_shift(tiny.bundle.model, width)))


def _sag(model: Any) -> Any:
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]


def _pag(model: Any) -> Any:
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    return PerturbedAttentionGuidance.execute(model, 3.0).result[0]


def _unet_function_wrapper(model: Any) -> Any:
    patched = model.clone()

    def wrapper(apply_model, args):  # e.g. a pack that rescales the model's input
        return apply_model(args["input"] * 1.05, args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(wrapper)
    return patched


def _tome(model: Any) -> Any:
    from comfy_extras.nodes_tomesd import TomePatchModel

    return TomePatchModel.execute(model, 0.5).result[0]


STOCK = {"sag": _sag, "pag": _pag, "tome": _tome, "model_function_wrapper": _unet_function_wrapper}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("stock", list(STOCK))
def test_stock_attention_patches_in_either_order(stacks, request, stock, feature):
    """Self-attention guidance (attn1 replace + an extra UNet pass), perturbed-attention guidance
    (attn1 replace in its own pass), token merging (attn1 patch + attn1 output patch) and a
    model_function_wrapper, before or after ours (SD1.5, with the other pack installed after ours,
    so our wrapper must find it)."""
    tiny = request.getfixturevalue("sd15")
    patch, ours = STOCK[stock], stacks.feature("sd15", feature)
    stock_first = apply_pack(ours.install(patch(tiny.bundle.model)), FOREIGN["A"], per_depth=False)
    CALLS.clear()
    first = sample(tiny, stock_first, ours.positive)
    calls_first = Counter(CALLS)
    stock_last = patch(apply_pack(ours.install(tiny.bundle.model), FOREIGN["A"], per_depth=False))
    CALLS.clear()
    last = sample(tiny, stock_last, ours.positive)
    assert torch.equal(first, last) and CALLS == calls_first and CALLS["A"] > 0
    without = sample(tiny, apply_pack(ours.install(tiny.bundle.model), FOREIGN["A"], per_depth=False),
                     ours.positive)
    assert differ(first, without)
