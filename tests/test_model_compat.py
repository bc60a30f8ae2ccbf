"""agdo.models._compat: the published Dream / LLaDA remote code on transformers 4.56 … 5.x.

Each quirk is checked twice: the fixture (written to behave like the published files) shows the failure
where the published code fails — without that the repair test would prove nothing — and ``load_adapter``
repairs or refuses it. ``unrepaired`` gives a copy of a checkpoint whose code was never repaired in this
process (the adapter repairs a loaded module in place).
"""

import itertools
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from agdo.models import _compat, load_adapter

sys.path.insert(0, str(Path(__file__).parent))
from test_models import (  # noqa: E402
    expected_statistics,
    generic_model,
    last_layer_probabilities,
    pre_october_llada_dir,
    remote_model_class,
    remote_model_dir,
)

TRANSFORMERS_5 = Version(transformers.__version__).major >= 5
DREAM_HEAD_DIM = 16  # hidden 112 / 7 heads


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat_checkpoints")
    return {
        "dream": remote_model_dir(root, "tiny_dream"),
        "llada": remote_model_dir(root, "tiny_llada"),
        "llada_pre_oct2025": pre_october_llada_dir(root),
    }


_copies = itertools.count()


def fresh_copy(root: Path, checkpoint: Path) -> Path:
    """A copy of ``checkpoint`` under a new name whose code differs by a comment: a dynamic module of its
    own on every transformers version, never imported (so never repaired) before in this process. The
    names repeat from run to run, so transformers' module cache does not grow."""
    directory = root / f"{checkpoint.name}_unrepaired_{next(_copies)}"
    shutil.copytree(checkpoint, directory)
    for code in directory.glob("*.py"):
        code.write_text(code.read_text() + f"\n# the unrepaired copy {directory.name}\n")
    return directory


def unrepaired(root: Path, checkpoint: Path):
    """A ``fresh_copy`` of ``checkpoint`` and its model class, loaded by path WITHOUT the adapter's repairs."""
    directory = fresh_copy(root, checkpoint)
    reference = json.loads((directory / "config.json").read_text())["auto_map"]["AutoModel"]
    return directory, get_class_from_dynamic_module(reference, str(directory), local_files_only=True)


def default_inv_freq(theta=10000.0, dim=DREAM_HEAD_DIM):
    return 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)


def inv_freqs(model):
    return {name: buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq")}


def ids(seed=0, shape=(2, 10)):
    return torch.randint(0, 90, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- Dream


def test_dream_needs_the_default_rope_of_transformers_4(tmp_path, checkpoints):
    directory, model_class = unrepaired(tmp_path, checkpoints["dream"])
    config = model_class.config_class.from_pretrained(directory)
    if TRANSFORMERS_5:  # ROPE_INIT_FUNCTIONS has no "default" any more
        with pytest.raises(KeyError, match="default"):
            model_class(config)
    _compat.repair_classes(model_class)
    model = model_class(config)
    assert len(inv_freqs(model)) == 3  # the base model's and one per attention module
    for buffer in inv_freqs(model).values():
        torch.testing.assert_close(buffer, default_inv_freq(), rtol=1e-6, atol=0)


def test_dream_generation_config_validate_takes_newer_keywords(tmp_path, checkpoints):
    directory, model_class = unrepaired(tmp_path, checkpoints["dream"])
    generation_class = sys.modules[model_class.__module__].DreamGenerationConfig
    if TRANSFORMERS_5:  # every load: validate(user_set_attributes=...)
        with pytest.raises(TypeError, match="user_set_attributes"):
            generation_class.from_pretrained(directory)
    with pytest.raises(TypeError, match="strict"):  # every save, on every version: validate(strict=...)
        generation_class(alg="entropy").save_pretrained(tmp_path / "generation")
    _compat.repair_classes(model_class)
    loaded = generation_class.from_pretrained(directory)
    loaded.save_pretrained(tmp_path / "generation")
    assert generation_class.from_pretrained(tmp_path / "generation").alg == loaded.alg == "entropy"


def test_dream_list_of_tied_keys_breaks_save_on_transformers_5(tmp_path, checkpoints):
    directory, model_class = unrepaired(tmp_path, checkpoints["dream"])
    _compat._restore_default_rope(sys.modules[model_class.__module__])  # only what construction needs
    model = model_class(model_class.config_class.from_pretrained(directory))
    if TRANSFORMERS_5:  # it reads {tied: source}
        with pytest.raises(AttributeError, match="keys"):
            model.save_pretrained(tmp_path / "broken")
    _compat.repair_classes(model_class)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@torch.no_grad()
def test_dream_rotary_buffers_after_from_pretrained_are_recomputed_and_verified(tmp_path, checkpoints):
    """The silent one: on transformers 5 RoPE is garbage after from_pretrained and nothing fails."""
    directory, model_class = unrepaired(tmp_path, checkpoints["dream"])
    _compat.repair_classes(model_class)  # every class repair: loading works, the buffers are left as loaded
    loaded = model_class.from_pretrained(directory).eval()
    built = model_class(model_class.config_class.from_pretrained(directory)).eval()  # RoPE computed on build
    built.load_state_dict(loaded.state_dict())
    expected = built(ids(), use_cache=False).logits
    stale = not torch.allclose(loaded(ids(), use_cache=False).logits, expected)
    assert stale == TRANSFORMERS_5

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = load_adapter(loaded)  # a model the user built: repaired in place
    assert any("inv_freq" in str(w.message) for w in caught) == TRANSFORMERS_5
    for buffer in inv_freqs(adapter.model).values():
        torch.testing.assert_close(buffer, default_inv_freq(), rtol=1e-6, atol=0)
    torch.testing.assert_close(adapter.model(ids(), use_cache=False).logits, expected)


@torch.no_grad()
def test_dream_loaded_by_load_adapter_matches_the_built_model_and_eager_attention(checkpoints):
    adapter = load_adapter(checkpoints["dream"])
    model_class = type(adapter.model)
    built = model_class(model_class.config_class.from_pretrained(checkpoints["dream"])).eval()
    built.load_state_dict(adapter.model.state_dict())
    torch.testing.assert_close(adapter.forward(ids()).logits, adapter.token_logits(built(ids()).logits))

    input_ids = ids(seed=1, shape=(2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[1, :3] = False
    unmasked = torch.rand(2, 12, generator=torch.Generator().manual_seed(2)) < 0.5
    queries = torch.zeros(2, 12, dtype=torch.bool)
    queries[:, 7:] = True
    out = adapter.forward(input_ids, attention_mask, unmasked=unmasked, response_start=5, influence_query_mask=queries)
    probs = last_layer_probabilities(adapter, input_ids, attention_mask)  # eager, per-layer RoPE
    expected = expected_statistics(probs, attention_mask, unmasked, queries, True, "sum", response_start=5)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(out, name).double(), value, atol=2e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_save_pretrained_of_a_loaded_dream_reloads_the_same_model(tmp_path, checkpoints):
    """SFT's final save: model and Dream's generation config."""
    adapter = load_adapter(checkpoints["dream"])
    adapter.model.save_pretrained(tmp_path / "saved")
    reloaded = load_adapter(tmp_path / "saved")
    assert reloaded.model.generation_config.alg == "entropy"
    original, again = adapter.model.state_dict(), reloaded.model.state_dict()
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    torch.testing.assert_close(reloaded.forward(ids()).logits, adapter.forward(ids()).logits)


@torch.no_grad()
def test_dream_with_tied_word_embeddings_loads_ties_and_saves(tmp_path):
    directory = remote_model_dir(tmp_path, "tiny_dream", tie_word_embeddings=True)
    adapter = load_adapter(directory)
    model = adapter.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_adapter(tmp_path / "saved").model
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_rope_scaling_linear_is_verified_and_unknown_types_are_refused(tmp_path):
    linear = remote_model_dir(tmp_path / "linear", "tiny_dream", rope_scaling={"rope_type": "linear", "factor": 2.0})
    for buffer in inv_freqs(load_adapter(linear).model).values():
        torch.testing.assert_close(buffer, default_inv_freq() / 2.0, rtol=1e-6, atol=0)
    dynamic = remote_model_dir(tmp_path / "dynamic", "tiny_dream", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE type 'dynamic'"):
        load_adapter(dynamic)


# ------------------------------------------------------------------------------------------- LLaDA


@torch.no_grad()
def test_llada_without_post_init_and_with_an_old_tie_weights_loads_its_weights(tmp_path, checkpoints):
    directory, model_class = unrepaired(tmp_path, checkpoints["llada"])
    if TRANSFORMERS_5:
        with pytest.raises(AttributeError, match="all_tied_weights_keys"):  # LLaDAModelLM never calls post_init
            model_class.from_pretrained(directory)
        _compat._run_missing_post_init(model_class)
        with pytest.raises(TypeError, match="missing_keys"):  # tie_weights(self)
            model_class.from_pretrained(directory)
    _compat.repair_classes(model_class)
    model = model_class.from_pretrained(directory)
    checkpoint = load_file(directory / "model.safetensors")
    state = model.state_dict()
    assert state.keys() == checkpoint.keys() and all(torch.equal(state[k], checkpoint[k]) for k in state)


@torch.no_grad()
def test_llada_config_without_use_cache_gets_the_files_default(checkpoints):
    model = remote_model_class(checkpoints["llada"]).from_pretrained(checkpoints["llada"])  # classes repaired only
    assert hasattr(model.config, "use_cache") != TRANSFORMERS_5  # a generation parameter there: dropped
    if TRANSFORMERS_5:
        with pytest.raises(AttributeError, match="use_cache"):
            model(ids())
    load_adapter(model)
    assert model.config.use_cache is False
    assert model(ids()).logits.shape == (2, 10, 96)


def test_auto_registration_hands_a_second_checkpoint_the_first_ones_classes(tmp_path, checkpoints):
    first, second = fresh_copy(tmp_path, checkpoints["llada"]), fresh_copy(tmp_path, checkpoints["llada_pre_oct2025"])
    AutoConfig.from_pretrained(first, trust_remote_code=True, local_files_only=True)  # "llada" is registered now
    config = AutoConfig.from_pretrained(second, trust_remote_code=True, local_files_only=True)
    ran = Path(sys.modules[type(config).__module__].__file__).read_text()
    hijacked = ran != (second / "configuration_llada.py").read_text()
    assert hijacked == TRANSFORMERS_5  # transformers 5 prefers the registered classes to the directory's code

    if TRANSFORMERS_5:  # such a model is refused: it would not be the checkpoint's
        model = AutoModel.from_config(config, trust_remote_code=True)
        model.load_state_dict(load_file(second / "model.safetensors"))
        with pytest.raises(RuntimeError, match="another checkpoint's code"):
            load_adapter(model)


def test_two_llada_checkpoints_in_one_process_each_run_their_own_code(checkpoints):
    october = load_adapter(checkpoints["llada"])
    before = load_adapter(checkpoints["llada_pre_oct2025"])
    again = load_adapter(checkpoints["llada"])
    assert type(october.model) is not type(before.model)
    for adapter, name in ((october, "llada"), (before, "llada_pre_oct2025"), (again, "llada")):
        for cls, code in ((type(adapter.model), "modeling_llada.py"), (type(adapter.model.config), "configuration_llada.py")):
            ran = Path(sys.modules[cls.__module__].__file__).read_text()
            assert ran == (checkpoints[name] / code).read_text(), (name, code)
    assert not _compat.ignores_padding_mask(october.model) and not _compat.ignores_padding_mask(again.model)
    assert _compat.ignores_padding_mask(before.model)


@torch.no_grad()
def test_pre_october_llada_attends_to_padding_and_a_padded_batch_is_refused(checkpoints):
    input_ids = ids(seed=3, shape=(2, 10))
    right_padded = torch.ones(2, 10, dtype=torch.bool)
    right_padded[1, 7:] = False  # real tokens keep their positions: only masking can tell the runs apart
    for name, honours_mask in (("llada", True), ("llada_pre_oct2025", False)):
        adapter = load_adapter(checkpoints[name])
        padded = adapter.model(input_ids, attention_mask=right_padded.long()).logits[1, :7]
        alone = adapter.model(input_ids[1:, :7]).logits[0]
        assert torch.allclose(padded, alone, atol=1e-5) == honours_mask, name

    adapter = load_adapter(checkpoints["llada_pre_oct2025"])
    unmasked = torch.rand(2, 10, generator=torch.Generator().manual_seed(4)) < 0.5
    for request in ({}, dict(unmasked=unmasked)):
        with pytest.raises(ValueError, match="October 2025"):
            adapter.forward(input_ids, right_padded, **request)
    no_padding = torch.ones(2, 10, dtype=torch.bool)  # the unpadded path keeps working
    out = adapter.forward(input_ids, no_padding, unmasked=unmasked)
    probs = last_layer_probabilities(adapter, input_ids, no_padding)
    expected = expected_statistics(probs, no_padding, unmasked, torch.zeros_like(unmasked), False, "sum")
    torch.testing.assert_close(out.s.double(), expected["s"], atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- every family


@pytest.mark.parametrize("case", ["dream", "llada", "generic"])
def test_every_adapter_forward_passes_use_cache_false(checkpoints, case, monkeypatch):
    adapter = load_adapter(generic_model("llama_mha") if case == "generic" else checkpoints[case])
    seen = []
    forward = adapter.model.forward

    def recording_forward(*args, **kwargs):
        seen.append(kwargs.get("use_cache"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(adapter.model, "forward", recording_forward)
    attention_mask = torch.ones(2, 10, dtype=torch.bool)
    attention_mask[1, :2] = False
    with torch.no_grad():
        adapter.forward(ids(), attention_mask)
        adapter.forward(ids(), unmasked=attention_mask)
    assert seen == [False, False]


def test_remote_code_must_be_trusted(checkpoints):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_adapter(checkpoints["dream"], trust_remote_code=False)
